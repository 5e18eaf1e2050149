"""Filters and ranking of COSMIC and of the refusal-token baseline (pure logic on grids).

Both take a :class:`~cosmic_tl.scoring.Scores` and return a :class:`Selection` that
records the pick and, for every candidate, whether and why it was discarded.
COSMIC raises :class:`NoCandidateError` when nothing survives (as the reference
asserts); for the baseline an empty result is a normal outcome and is returned.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from cosmic_tl.config import Mode, SelectionSettings
from cosmic_tl.interventions import Intervention, Kind
from cosmic_tl.scoring import Scores, cosine
from cosmic_tl.store import load_record, save_record

Method = Literal["cosmic", "refusal_tokens"]
KEPT = ""
# In the order they are checked; a candidate is counted under the first that applies.
COSMIC_FILTERS = ("late_layer", "last_position", "nan", "kl")
BASELINE_FILTERS = ("late_layer", "nan", "induce", "kl")
RELAX = {
    "late_layer": "max_layer_fraction",
    "last_position": "last_position_rule",
    "nan": "(none: NaN scores come from the model's activations)",
    "kl": "kl_threshold",
    "induce": "induce_threshold",
}


@dataclass(frozen=True)
class Selection:
    """A method's pick on a score grid and the fate of every candidate."""

    method: Method
    position: int | None
    layer: int | None
    scores: dict[str, float]
    ranking: Float[Tensor, "pos layer"]
    reasons: tuple[tuple[str, ...], ...]  # [pos][layer]: "" if kept, else the filter
    counts: dict[str, int]
    positions: tuple[int, ...]
    mode: Mode
    model_id: str
    direction: Float[Tensor, " d_model"] | None = None
    reference: Float[Tensor, " d_model"] | None = None
    message: str = ""

    @property
    def found(self) -> bool:
        return self.position is not None and self.layer is not None

    @property
    def pick(self) -> tuple[int, int] | None:
        if self.position is None or self.layer is None:
            return None
        return (self.position, self.layer)

    def intervention(self, kind: Kind, *, alpha: float = 1.0, mode: Mode | None = None) -> Intervention:
        """The pick as an intervention (``kind`` ``"ablate"`` or ``"add"``) in the selection's
        mode, or in ``mode``.

        >>> with intervene(model, cosmic.intervention("ablate")):  # doctest: +SKIP
        ...     completions = generate(model, harmful)
        """
        if self.direction is None or self.layer is None:
            raise ValueError(f"{self.method} has no picked direction: {self.message}")
        ref = self.reference.float() if self.reference is not None else None
        return Intervention(kind, mode or self.mode, self.direction.float(), self.layer, ref, alpha)

    def save(self, path: str | os.PathLike[str]) -> Path:
        tensors = {"ranking": self.ranking}
        if self.direction is not None:
            tensors["direction"] = self.direction
        if self.reference is not None:
            tensors["reference"] = self.reference
        meta = {
            "method": self.method,
            "position": self.position,
            "layer": self.layer,
            "scores": self.scores,
            "reasons": [list(r) for r in self.reasons],
            "counts": self.counts,
            "positions": list(self.positions),
            "mode": self.mode,
            "model_id": self.model_id,
            "message": self.message,
        }
        return save_record(path, KIND, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Selection:
        t, meta = load_record(path, KIND)
        return cls(
            meta["method"],
            meta["position"],
            meta["layer"],
            dict(meta["scores"]),
            t["ranking"],
            tuple(tuple(r) for r in meta["reasons"]),
            dict(meta["counts"]),
            tuple(meta["positions"]),
            meta["mode"],
            meta["model_id"],
            t.get("direction"),
            t.get("reference"),
            meta["message"],
        )


KIND = "cosmic_tl.Selection"


class NoCandidateError(RuntimeError):
    """Every candidate was discarded; ``.selection`` still records why."""

    def __init__(self, selection: Selection) -> None:
        super().__init__(selection.message)
        self.selection = selection


def max_layer(n_layers: int, settings: SelectionSettings) -> int:
    """Candidates at layers ``>= ⌊max_layer_fraction·n⌋`` are discarded."""
    return math.floor(settings.max_layer_fraction * n_layers)


def _nan_argmax(row: Tensor) -> float:
    if torch.isnan(row).all():
        return math.nan
    return float(torch.nan_to_num(row, nan=-math.inf).argmax())


def last_position_bounds(
    s_abl: Float[Tensor, "pos layer"], s_add: Float[Tensor, "pos layer"], positions: tuple[int, ...]
) -> tuple[float, float]:
    """``(A, S)``: lower medians over positions ``-k..-2`` of the argmax layer of each score.

    NaN when there is no position other than -1 (nothing is then pruned).
    """
    rows = [i for i, p in enumerate(positions) if p != -1]
    if not rows:
        return math.nan, math.nan
    a = torch.tensor([_nan_argmax(s_abl[i]) for i in rows], dtype=torch.float64)
    s = torch.tensor([_nan_argmax(s_add[i]) for i in rows], dtype=torch.float64)
    return float(torch.nanmedian(a)), float(torch.nanmedian(s))


def _cells(shape: tuple[int, int]) -> Iterator[tuple[int, int]]:
    for i in range(shape[0]):
        for j in range(shape[1]):
            yield i, j


def cosmic_prefilter(scores: Scores, settings: SelectionSettings) -> list[list[str]]:
    """Reasons from every COSMIC filter except KL (which needs the ranking order)."""
    s_abl, s_add = scores.grids["S_abl"], scores.grids["S_add"]
    top = max_layer(scores.n_layers, settings)
    a, s = last_position_bounds(s_abl, s_add, scores.positions)
    reasons = [[KEPT] * scores.n_layers for _ in scores.positions]
    for i, j in _cells(tuple(s_abl.shape)):  # type: ignore[arg-type]
        if j >= top:
            reasons[i][j] = "late_layer"
        elif settings.last_position_rule and scores.positions[i] == -1 and j > a and j > s:
            reasons[i][j] = "last_position"
        elif math.isnan(float(s_abl[i, j])) or math.isnan(float(s_add[i, j])):
            reasons[i][j] = "nan"
    return reasons


def baseline_prefilter(scores: Scores, settings: SelectionSettings) -> list[list[str]]:
    """Reasons from the baseline's filters except KL."""
    top = max_layer(scores.n_layers, settings)
    induce, bypass = scores.grids["induce"], scores.grids["bypass"]
    reasons = [[KEPT] * scores.n_layers for _ in scores.positions]
    for i, j in _cells(tuple(induce.shape)):  # type: ignore[arg-type]
        if j >= top:
            reasons[i][j] = "late_layer"
        elif math.isnan(float(induce[i, j])):
            reasons[i][j] = "nan"
        elif float(induce[i, j]) < settings.induce_threshold:
            reasons[i][j] = "induce"
        elif math.isnan(float(bypass[i, j])):
            reasons[i][j] = "nan"
    return reasons


def ranked(
    ranking: Float[Tensor, "pos layer"], reasons: list[list[str]], descending: bool
) -> list[tuple[int, int]]:
    """Surviving cells from best to worst (ties broken by position, then layer)."""
    cells = [(i, j) for i, j in _cells(tuple(ranking.shape)) if reasons[i][j] == KEPT]  # type: ignore[arg-type]
    sign = -1.0 if descending else 1.0
    return sorted(cells, key=lambda c: (sign * float(ranking[c]), c))


Cell = tuple[int, int]  # (pos index, layer)


def walk_ranking(
    order: Iterable[Cell], kl: Callable[[Cell], float], threshold: float
) -> tuple[Cell | None, dict[Cell, str]]:
    """Walk a ranking from its best cell; discard by KL until the first that passes.

    ``kl(cell)`` gives a cell's KL (the selection reads it from the grid, the engine's
    planner computes it on demand). Returns the pick (or None) and the discarded
    cells with their reason (``"nan"`` or ``"kl"``). This one walk decides both which
    KL cells the engine computes and which cell a selection picks.
    """
    discarded: dict[Cell, str] = {}
    for cell in order:
        value = kl(cell)
        if math.isnan(value):
            discarded[cell] = "nan"
        elif value > threshold:
            discarded[cell] = "kl"
        else:
            return cell, discarded
    return None, discarded


def _apply_kl(
    scores: Scores, order: list[Cell], reasons: list[list[str]], threshold: float
) -> Cell | None:
    """The selection's KL walk over computed grids; records the reasons in ``reasons``."""
    kl, done = scores.grids["KL"], scores.computed["KL"]

    def computed(cell: Cell) -> float:
        if not bool(done[cell]):
            raise ValueError(
                f"KL was not computed for candidate (pos {scores.positions[cell[0]]}, layer "
                f"{cell[1]}), which could be the pick; score with full grids or let the engine choose"
            )
        return float(kl[cell])

    pick, discarded = walk_ranking(order, computed, threshold)
    for (i, j), reason in discarded.items():
        reasons[i][j] = reason
    return pick


def _finish(
    method: Method,
    scores: Scores,
    ranking: Tensor,
    reasons: list[list[str]],
    pick: tuple[int, int] | None,
    filters: tuple[str, ...],
    candidates: Any | None,
) -> Selection:
    counts = {f: sum(r.count(f) for r in reasons) for f in filters}
    total = len(scores.positions) * scores.n_layers
    position = layer = direction = reference = None
    values: dict[str, float] = {}
    if pick is None:
        detail = ", ".join(f"{counts[f]} by {f} (setting: {RELAX[f]})" for f in filters)
        message = f"{method}: all {total} candidates were discarded: {detail}"
    else:
        i, layer = pick
        position = scores.positions[i]
        values = {
            k: float(g[i, layer]) for k, g in scores.grids.items() if bool(scores.computed[k][i, layer])
        }
        if candidates is not None:
            direction = candidates.direction(position, layer)
            reference = candidates.reference(position, layer)
        message = f"{method}: picked position {position}, layer {layer} of {total} candidates"
    return Selection(
        method,
        position,
        layer,
        values,
        ranking,
        tuple(map(tuple, reasons)),
        counts,
        scores.positions,
        scores.mode,
        scores.model_id,
        direction,
        reference,
        message,
    )


def select_cosmic(
    scores: Scores, settings: SelectionSettings | None = None, candidates: Any | None = None
) -> Selection:
    """COSMIC: filters of §3, then the maximum of ``S_abl + S_add``.

    Raises :class:`NoCandidateError` (with the per-filter counts) if nothing survives.
    """
    settings = settings or SelectionSettings()
    ranking = scores.grids["S_abl"] + scores.grids["S_add"]
    reasons = cosmic_prefilter(scores, settings)
    pick = _apply_kl(scores, ranked(ranking, reasons, True), reasons, settings.kl_threshold)
    out = _finish("cosmic", scores, ranking, reasons, pick, COSMIC_FILTERS, candidates)
    if not out.found:
        raise NoCandidateError(out)
    return out


def select_refusal_tokens(
    scores: Scores, settings: SelectionSettings | None = None, candidates: Any | None = None
) -> Selection:
    """Arditi's baseline: drop late layers, ``induce < 0`` and ``KL > 0.1``; minimum bypass.

    An empty result (``selection.found`` is False) is a normal outcome.
    """
    settings = settings or SelectionSettings()
    if "bypass" not in scores.grids:
        raise ValueError("these scores have no refusal-token grids (baseline disabled)")
    ranking = scores.grids["bypass"]
    reasons = baseline_prefilter(scores, settings)
    pick = _apply_kl(scores, ranked(ranking, reasons, False), reasons, settings.kl_threshold)
    return _finish("refusal_tokens", scores, ranking, reasons, pick, BASELINE_FILTERS, candidates)


@dataclass(frozen=True)
class Comparison:
    """COSMIC's pick beside the baseline's."""

    same_pick: bool
    cosmic_pick: tuple[int, int] | None
    baseline_pick: tuple[int, int] | None
    cosmic_rank_under_baseline: int | None  # 1 = best bypass score among all candidates
    baseline_rank_under_cosmic: int | None  # 1 = best S_abl + S_add
    direction_cosine: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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
    )
