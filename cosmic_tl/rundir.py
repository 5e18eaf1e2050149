"""A resumable run directory: every artifact's name, which stages and methods a run has,
the stages' bookkeeping and a lock.

Each stage has a *key*: a hash of the settings it depends on, the model identity, the
prompt hashes and the keys of the stages before it. ``stages.json`` records the key of
every finished stage; a stage whose key matches and whose files exist is reused, any
other is recomputed (and with it everything downstream, since keys chain). Every file
is written atomically, so an interrupted run loses at most the stage in progress.

Only one process may work on a run directory at a time: :meth:`RunDir.lock` takes
``.lock`` (holding the process id) and refuses a directory that a live process holds;
a lock whose process is gone is taken over with a warning.

Every file name lives here (:class:`RunDir`'s properties), so the pipeline that writes
an artifact and the report that reads it cannot disagree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosmic_tl.config import Config
from cosmic_tl.selection import METHODS
from cosmic_tl.store import read_json, record_paths, write_json

log = logging.getLogger("cosmic_tl")

# The settings each stage reads (beside its upstream stages' keys).
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "candidates": ("model", "system_prompt", "prompt_format", "dtype", "n_train", "seed", "sampling"),
    "filter": (
        "model",
        "system_prompt",
        "prompt_format",
        "dtype",
        "n_train",
        "n_val",
        "seed",
        "sampling",
        "refusal_tokens",
    ),
    "candidates_baseline": (),
    "scores": (
        "mode",
        "alpha",
        "n_val",
        "baseline",
        "baselines",
        "refusal_tokens",
        "filter_prompts",
        "full_grids",
        "inplace_addition",
        "ablation_placement",
        "selection",
    ),
    "select": ("selection", "baseline", "baselines"),
    "evaluate": ("n_test", "max_new_tokens"),
    # Bootstrap resamples of the train and val sets; the scores' key carries the rest.
    "stability": (),
    "audit": ("n_test", "max_new_tokens", "ablation_placement"),
}
LOCK = ".lock"


class RunDirError(RuntimeError):
    """The run directory cannot be used for this run (other model, not writable, in use, ...)."""


class RunDirBusy(RunDirError):
    """Another live process holds the run directory's lock."""


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


_HELD: set[Path] = set()  # lock files this process holds


@dataclass(frozen=True)
class RunDir:
    """Paths of a run directory and its stage bookkeeping."""

    root: Path

    # ---------------------------------------------------------------- artifact names
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def stages(self) -> Path:
        return self.root / "stages.json"

    def candidates(self, *, filtered: bool = False) -> Path:
        """The candidates record (``.safetensors`` + ``.json``); ``filtered``: those of
        Arditi's baseline, from the filtered training prompts."""
        return self.root / ("candidates_baseline" if filtered else "candidates")

    @property
    def filtered_prompts(self) -> Path:
        """Arditi's prompt filter's output: the kept prompts of the four sets, and the
        refusal tokens it used."""
        return self.root / "filtered_prompts.json"

    def scores(self, *, filtered: bool = False) -> Path:
        """The scores record; ``filtered``: the baseline's, on the filtered prompts."""
        return self.root / ("scores_baseline" if filtered else "scores")

    def scores_for(self, method: str, cfg: Config) -> Path:
        """The scores record that ``method``'s selection is made from in a run of ``cfg``."""
        return self.scores(filtered=filtered_method(method, cfg))

    def candidates_for(self, method: str, cfg: Config) -> Path:
        """The candidates whose directions ``method``'s pick is taken from."""
        return self.candidates(filtered=filtered_method(method, cfg))

    def selection(self, method: str) -> Path:
        """``method``'s selection record."""
        if method not in METHODS:
            raise ValueError(f"unknown selection method {method!r}; known: {METHODS}")
        return self.root / f"selection_{method}"

    @property
    def comparison(self) -> Path:
        return self.root / "comparison.json"

    @property
    def direction(self) -> Path:
        """The picked direction's record (COSMIC's pick), for export and reuse."""
        return self.root / "direction"

    @property
    def stability(self) -> Path:
        """The pick-stability record over bootstrap resamples (``cosmic-tl stability``)."""
        return self.root / "stability"

    def resample(self, index: int) -> Path:
        """Bootstrap resample ``index``'s record, kept so that a stopped stage resumes."""
        return self.root / "stability_resamples" / f"resample_{index:03d}"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    def completions(self, name: str) -> Path:
        return self.root / "completions" / f"{name}.jsonl"

    @property
    def audit(self) -> Path:
        """The behavioural audit's record (:class:`~cosmic_tl.audit.Audit`)."""
        return self.root / "audit"

    @property
    def audit_parts(self) -> Path:
        """The audit's finished groups of candidates, kept until the audit is done."""
        return self.root / "audit_parts"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK

    def outputs(self, stage: str, cfg: Config) -> list[Path]:
        """The files a finished ``stage`` of a run of ``cfg`` has written."""
        records: list[Path] = []
        if stage == "candidates":
            records = [self.candidates()]
        elif stage == "filter":
            return [self.filtered_prompts]
        elif stage == "candidates_baseline":
            records = [self.candidates(filtered=True)]
        elif stage == "scores":
            records = [self.scores()]
            if filtering(cfg):
                records.append(self.scores(filtered=True))
        elif stage == "select":
            records = [self.selection(m) for m in run_methods(cfg)]
            return [p for r in records for p in record_paths(r)] + [self.comparison]
        elif stage == "evaluate":
            return [self.metrics]
        elif stage == "stability":
            records = [self.stability]
        elif stage == "audit":
            records = [self.audit]
        return [p for r in records for p in record_paths(r)]

    # ---------------------------------------------------------------- setup
    def open(self, config: Config, *, force: bool = False) -> None:
        """Create the directory or check it belongs to this model; write config.json."""
        self._ensure_writable()
        if self.config.exists() and not force:
            old = read_json(self.config)
            if old.get("model") != config.model:
                raise RunDirError(
                    f"{self.root} holds a run of model {old.get('model')!r}, not {config.model!r}; "
                    "use another --out directory (or --force to overwrite it)"
                )
        write_json(self.config, config.to_dict())

    def _ensure_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise RunDirError(f"cannot write to the run directory {self.root}: {err}") from err

    # ---------------------------------------------------------------- lock
    def acquire(self) -> None:
        """Take the directory's lock, or raise :class:`RunDirBusy` naming the holder."""
        self._ensure_writable()
        path = self.lock_file
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                pid = holder.get("pid")
                mine = pid == os.getpid() and path.resolve() in _HELD
                same_host = holder.get("host") in (None, me["host"])
                if isinstance(pid, int) and (
                    mine or (pid != os.getpid() and _alive(pid)) or not same_host
                ):
                    where = "" if same_host else f" on host {holder.get('host')}"
                    raise RunDirBusy(
                        f"{self.root} is in use by process {pid}{where} (since {holder.get('started')}: "
                        f"{holder.get('command') or '?'}); wait for it to finish or use another "
                        f"--out directory. If that process is gone, delete {path}"
                    ) from None
                log.warning(
                    "taking over the lock of %s: process %s that held it is no longer running",
                    self.root,
                    pid,
                )
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            _HELD.add(path.resolve())
            return
        raise RunDirBusy(f"could not take the lock {path}: another process keeps taking it")

    def release(self) -> None:
        """Give the lock back (only if this process holds it)."""
        path = self.lock_file
        if path.resolve() in _HELD:
            _HELD.discard(path.resolve())
            if self._holder().get("pid") == os.getpid():
                path.unlink(missing_ok=True)

    @contextmanager
    def lock(self) -> Iterator[RunDir]:
        """Hold the directory's lock inside the block."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def _holder(self) -> dict[str, Any]:
        try:
            data = json.loads(self.lock_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    # ---------------------------------------------------------------- stages
    def stage_key(self, stage: str, config: Config, upstream: Iterable[str], extra: Any = None) -> str:
        cfg = config.to_dict()
        fields = {f: cfg[f] for f in STAGE_FIELDS.get(stage, ())}
        return digest({"stage": stage, "fields": fields, "upstream": list(upstream), "extra": extra})

    def _records(self) -> dict[str, Any]:
        if not self.stages.exists():
            return {}
        try:
            return dict(read_json(self.stages))
        except ValueError:
            return {}

    def done(self, stage: str, key: str, outputs: Iterable[Path]) -> bool:
        """Whether ``stage`` finished with this key and its output files all exist."""
        rec = self._records().get(stage)
        return bool(rec and rec.get("key") == key and all(p.exists() for p in outputs))

    def finish(self, stage: str, key: str, seconds: float, info: dict[str, Any] | None = None) -> None:
        records = self._records()
        records[stage] = {
            "key": key,
            "seconds": round(seconds, 2),
            "finished": time.time(),
            **(info or {}),
        }
        write_json(self.stages, records)

    def timings(self) -> dict[str, float]:
        return {k: float(v.get("seconds", 0.0)) for k, v in self._records().items()}


def run_methods(cfg: Config) -> tuple[str, ...]:
    """The selection methods a run of ``cfg`` makes: COSMIC and its baselines."""
    return ("cosmic", *(cfg.baselines if cfg.baseline else ()))


def filtering(cfg: Config) -> bool:
    """Whether Arditi's prompt filter runs (it serves his baseline only)."""
    return cfg.filter_prompts and "refusal_tokens" in run_methods(cfg)


def filtered_method(method: str, cfg: Config) -> bool:
    """Whether ``method`` works on the filtered prompts in a run of ``cfg``."""
    return method == "refusal_tokens" and filtering(cfg)


def relative_links(root: Path) -> list[str]:
    """Files of the run directory, relative, for the report's list of raw files."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name != "report.html"
    )
