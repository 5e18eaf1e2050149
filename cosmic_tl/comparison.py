"""COSMIC's pick beside a baseline's: same pick, ranks under each other's score, cosine."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from cosmic_tl.scoring import cosine
from cosmic_tl.selection import Selection


@dataclass(frozen=True)
class Comparison:
    """COSMIC's pick beside one baseline's.

    A rank is 1 for the best score; ``*_rank_among`` says among how many candidates
    (those whose score was computed: every candidate with full grids, fewer with the
    lazy engine, which computes at least both picks under both scores).
    """

    same_pick: bool
    cosmic_pick: tuple[int, int] | None
    baseline_pick: tuple[int, int] | None
    cosmic_rank_under_baseline: int | None  # 1 = best baseline score (lowest bypass)
    baseline_rank_under_cosmic: int | None  # 1 = best S_abl + S_add
    direction_cosine: float | None
    baseline: str = "refusal_tokens"
    cosmic_rank_among: int = 0  # candidates with a baseline score
    baseline_rank_among: int = 0  # candidates with a COSMIC score

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rank(ranking: Tensor, cell: tuple[int, int], descending: bool) -> int | None:
    value = float(ranking[cell])
    if math.isnan(value):
        return None
    finite = ranking[~torch.isnan(ranking)]
    better = (finite > value) if descending else (finite < value)
    return int(better.sum()) + 1


def compare(cosmic: Selection, baseline: Selection) -> Comparison:
    """Same pick? Each pick's rank under the other method's score; cosine of directions."""
    c_cell = b_cell = None
    if cosmic.pick:
        c_cell = (cosmic.positions.index(cosmic.pick[0]), cosmic.pick[1])
    if baseline.pick:
        b_cell = (baseline.positions.index(baseline.pick[0]), baseline.pick[1])
    cos = None
    if cosmic.direction is not None and baseline.direction is not None:
        cos = cosine(cosmic.direction, baseline.direction)
    return Comparison(
        same_pick=cosmic.pick is not None and cosmic.pick == baseline.pick,
        cosmic_pick=cosmic.pick,
        baseline_pick=baseline.pick,
        cosmic_rank_under_baseline=_rank(baseline.ranking, c_cell, False) if c_cell else None,
        baseline_rank_under_cosmic=_rank(cosmic.ranking, b_cell, True) if b_cell else None,
        direction_cosine=cos,
        baseline=baseline.method,
        cosmic_rank_among=int((~torch.isnan(baseline.ranking)).sum()),
        baseline_rank_among=int((~torch.isnan(cosmic.ranking)).sum()),
    )
