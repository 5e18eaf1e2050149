"""The model cache: an :class:`Alias` materialised once into a directory, atomically.

The cache lives in ``$COSMIC_TL_CACHE`` if set, else ``$XDG_CACHE_HOME/cosmic_tl``,
else ``~/.cache/cosmic_tl``. Every entry is written to a temporary folder and
renamed into place, with a ``cosmic_tl_complete.json`` marker listing its files and
sizes; an entry without a valid marker is treated as corrupt and rebuilt, and so is
one whose card records another recipe than the alias asks for.

Functions here take :class:`Alias` objects; which names exist is the business of
:mod:`cosmic_tl.models.catalogue`. ::

    alias = Alias("my-model", "a test model", write_my_model)
    path = ensure(alias)          # builds once, then returns the cached directory
    is_built(alias), read_card("my-model")
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosmic_tl.store import write_json

logger = logging.getLogger(__name__)

MARKER = "cosmic_tl_complete.json"
CACHE_ENV = "COSMIC_TL_CACHE"


class CacheError(OSError):
    """The model cache cannot be written or read."""


@dataclass(frozen=True)
class Alias:
    """A model name and the recipe that materialises it into a directory."""

    name: str
    description: str
    # Writes a HF directory and returns card info. A callable that also takes a
    # ``progress`` keyword is told whether to show its progress bars.
    build: Callable[..., dict[str, Any]]
    base: str | None = None  # alias or directory this one is derived from (organisms)
    recipe: dict[str, Any] | None = None  # what the build depends on; a cached card must match
    build_seconds: float | None = None  # a measured build time, announced before a build


def cache_dir() -> Path:
    """The root of cosmic_tl's user cache (not created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cosmic_tl"


def alias_dir(name: str) -> Path:
    """Where the materialised model for alias ``name`` lives."""
    return cache_dir() / "models" / name


def is_built(alias: Alias) -> bool:
    """Whether ``alias`` is materialised in the cache with a valid marker and, for an
    alias with a recipe (an organism), was built from that recipe."""
    return _valid_entry(alias_dir(alias.name)) and not _stale(alias)


def _stale(alias: Alias) -> bool:
    """A valid entry whose card records another recipe than ``alias``'s."""
    if alias.recipe is None:
        return False
    card = json.loads((alias_dir(alias.name) / MARKER).read_text()).get("card") or {}
    return bool(card.get("recipe") != alias.recipe)


def read_card(name: str) -> dict[str, Any]:
    """The JSON card recorded when alias ``name`` was built."""
    marker = alias_dir(name) / MARKER
    if not _valid_entry(marker.parent):
        raise CacheError(f"model {name!r} is not built; run `cosmic-tl build {name}`")
    return dict(json.loads(marker.read_text())["card"])


def _valid_entry(path: Path) -> bool:
    marker = path / MARKER
    try:
        meta = json.loads(marker.read_text())
        files: dict[str, int] = meta["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((path / f).is_file() and (path / f).stat().st_size == size for f, size in files.items())


def _run_build(build: Callable[..., dict[str, Any]], out: Path, progress: bool) -> dict[str, Any]:
    """``build(out)``, with ``progress=`` when the callable takes that keyword."""
    try:
        takes = "progress" in inspect.signature(build).parameters
    except (TypeError, ValueError):  # a callable without an inspectable signature
        takes = False
    return build(out, progress=progress) if takes else build(out)


def ensure(alias: Alias, *, rebuild: bool = False, progress: bool = True) -> Path:
    """Materialise ``alias`` in the cache if needed and return its directory.

    The build writes into a temporary sibling folder which is renamed into place
    only once complete, so an interrupted build never leaves a usable-looking entry.
    ``progress`` is passed on to a build callable that takes that keyword (the
    built-in ones then show no progress bars); other callables are called as before.
    """
    name = alias.name
    target = alias_dir(name)
    valid = _valid_entry(target)
    if not rebuild and valid and not _stale(alias):
        return target
    if valid and not rebuild:
        logger.warning("cached %s was built from another recipe; rebuilding", name)
    elif target.exists() and not valid:
        logger.warning("cache entry %s is incomplete or corrupt; rebuilding", target)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=parent))
    except OSError as err:
        raise CacheError(
            f"cannot write the model cache at {parent} ({err}); set {CACHE_ENV} to a writable directory"
        ) from err
    try:
        card = _run_build(alias.build, tmp, progress)
        files = {
            str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        write_json(tmp / MARKER, {"alias": name, "files": files, "card": card})
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, CacheError):
            raise CacheError(f"could not build {name!r} in {parent}: {err}") from err
        raise
    return target
