"""A resumable run directory: every stage's outputs, and the inputs they were made from.

Each stage has a *key*: a hash of the settings it depends on, the model identity, the
prompt hashes and the keys of the stages before it. ``stages.json`` records the key of
every finished stage; a stage whose key matches and whose files exist is reused, any
other is recomputed (and with it everything downstream, since keys chain). Every file
is written atomically, so an interrupted run loses at most the stage in progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosmic_tl.config import Config
from cosmic_tl.store import read_json, write_json

# The settings each stage reads (beside its upstream stages' keys).
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "candidates": ("model", "system_prompt", "dtype", "n_train", "seed"),
    "scores": (
        "mode",
        "alpha",
        "n_val",
        "baseline",
        "refusal_tokens",
        "filter_prompts",
        "full_grids",
        "selection",
    ),
    "select": ("selection",),
    "evaluate": ("n_test", "max_new_tokens"),
}
STAGES = ("candidates", "scores", "select", "evaluate", "report")


class RunDirError(RuntimeError):
    """The run directory cannot be used for this run (other model, not writable, ...)."""


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunDir:
    """Paths of a run directory and its stage bookkeeping."""

    root: Path

    # ---------------------------------------------------------------- paths
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def stages(self) -> Path:
        return self.root / "stages.json"

    def path(self, name: str) -> Path:
        return self.root / name

    # ---------------------------------------------------------------- setup
    def open(self, config: Config, *, force: bool = False) -> None:
        """Create the directory or check it belongs to this model; write config.json."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise RunDirError(f"cannot write to the run directory {self.root}: {err}") from err
        if self.config.exists() and not force:
            old = read_json(self.config)
            if old.get("model") != config.model:
                raise RunDirError(
                    f"{self.root} holds a run of model {old.get('model')!r}, not {config.model!r}; "
                    "use another --out directory (or --force to overwrite it)"
                )
        write_json(self.config, config.to_dict())

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

    def done(self, stage: str, key: str, outputs: Iterable[str]) -> bool:
        """Whether ``stage`` finished with this key and its output files all exist."""
        rec = self._records().get(stage)
        return bool(rec and rec.get("key") == key and all(self.path(o).exists() for o in outputs))

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


def relative_links(root: Path) -> list[str]:
    """Files of the run directory, relative, for the report's list of raw files."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name != "report.html"
    )


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p
