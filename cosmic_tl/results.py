"""The evaluation's results record: ``metrics.json`` of a run directory, typed.

The pipeline writes it and the report reads it through the same two classes, so the
file's keys are a format of one module, not a protocol between two.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cosmic_tl.evaluation import Rate
from cosmic_tl.selection import METHODS
from cosmic_tl.store import read_json, write_json

# metrics.json keys (kept as first published, so that older run directories still read).
_CLEAN = {"harmful": "harmful, no intervention", "harmless": "harmless, no intervention"}
# A model whose harmless refusal rate is surely above this (the Wilson interval's lower
# bound) over-refuses; the organisms' quality bar is at most 5 %.
OVER_REFUSAL = 0.05


def _rate(d: dict[str, Any] | None) -> Rate | None:
    return Rate.from_dict(d) if d else None


@dataclass(frozen=True)
class MethodMetrics:
    """What evaluation measured for one method's pick (or that it had none)."""

    found: bool
    message: str = ""
    pick: tuple[int, int] | None = None
    harmful_ablated: Rate | None = None  # refusal rate on harmful prompts, direction ablated
    attack_success: Rate | None = None  # 1 - the above (judged items)
    harmless_added: Rate | None = None  # refusal rate on harmless prompts, direction added
    kl: float | None = None

    def to_dict(self) -> dict[str, Any]:
        if not self.found:
            return {"found": False, "message": self.message}
        assert self.harmful_ablated and self.attack_success and self.harmless_added
        return {
            "found": True,
            "pick": list(self.pick) if self.pick else None,
            "harmful, ablated": self.harmful_ablated.to_dict(),
            "attack success rate": self.attack_success.to_dict(),
            "harmless, added": self.harmless_added.to_dict(),
            "KL": self.kl,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MethodMetrics:
        if not d.get("found"):
            return cls(False, str(d.get("message", "")))
        pick = d.get("pick")
        return cls(
            True,
            pick=(int(pick[0]), int(pick[1])) if pick else None,
            harmful_ablated=_rate(d.get("harmful, ablated")),
            attack_success=_rate(d.get("attack success rate")),
            harmless_added=_rate(d.get("harmless, added")),
            kl=d.get("KL"),
        )


@dataclass(frozen=True)
class RunMetrics:
    """``metrics.json``: refusal rates without intervention and under each method's pick."""

    judge_phrases: tuple[str, ...]
    harmful_clean: Rate
    harmless_clean: Rate
    methods: dict[str, MethodMetrics] = field(default_factory=dict)

    @property
    def warnings(self) -> tuple[str, ...]:
        """What these rates say about the run's validity, as sentences (none if all is well).

        COSMIC's KL filter is measured on the harmless validation prompts; a model that
        refuses many harmless prompts changes its answers to them when its refusal
        direction is ablated, so the filter can drop that direction.
        """
        clean = self.harmless_clean
        if clean.n == 0 or clean.low <= OVER_REFUSAL:
            return ()
        return (
            f"the model refuses {clean.k} of {clean.n} harmless test prompts without any "
            f"intervention (95% interval from {clean.low:.0%}); if it refuses the harmless "
            "validation prompts as often, COSMIC's KL filter, measured on them, can drop its "
            "refusal direction: use harmless validation prompts it answers",
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "judge_phrases": list(self.judge_phrases),
            _CLEAN["harmful"]: self.harmful_clean.to_dict(),
            _CLEAN["harmless"]: self.harmless_clean.to_dict(),
        }
        out |= {name: m.to_dict() for name, m in self.methods.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunMetrics:
        return cls(
            tuple(d.get("judge_phrases", ())),
            Rate.from_dict(d[_CLEAN["harmful"]]),
            Rate.from_dict(d[_CLEAN["harmless"]]),
            {m: MethodMetrics.from_dict(d[m]) for m in METHODS if m in d},
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunMetrics:
        return cls.from_dict(dict(read_json(path)))
