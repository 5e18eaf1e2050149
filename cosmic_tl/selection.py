"""The selection methods: filters and ranking on score grids (pure logic, no model).

- :func:`select_cosmic` — COSMIC (cosmic-method.md §3): maximum ``S_abl + S_add``.
- :func:`select_refusal_tokens` — Arditi et al.'s refusal-token baseline (§4a):
  minimum ``bypass`` under linear interventions, whatever COSMIC's mode is.
- :func:`select_substring` — the COSMIC paper's own refusal-token comparison (§4b):
  minimum ``bypass`` under the mode's interventions, with its own filters.

Each takes a :class:`~cosmic_tl.scoring.Scores` and returns a :class:`Selection` that
records the pick and, for every candidate, whether and why it was discarded. Zero
(numerically negligible) directions are discarded by every method (§4c), and a pick
whose scores do not beat no intervention carries a warning. COSMIC raises
:class:`NoCandidateError` when nothing survives (as the reference asserts); for the
baselines an empty result is a normal outcome and is returned.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from cosmic_tl.config import Mode, Placement, SelectionSettings
from cosmic_tl.interventions import Intervention, Kind
from cosmic_tl.scoring import Scores
from cosmic_tl.store import load_record, save_record

Method = Literal["cosmic", "refusal_tokens", "substring"]
METHODS: tuple[Method, ...] = ("cosmic", "refusal_tokens", "substring")
KEPT = ""
# A cell that passes every other filter but whose KL was never computed (lazy scoring).
KL_NOT_SCORED = "kl_not_scored"
# In the order they are checked; a candidate is counted under the first that applies.
COSMIC_FILTERS = ("late_layer", "last_position", "zero_direction", "nan", "kl")
BASELINE_FILTERS = ("late_layer", "zero_direction", "nan", "induce", "kl")
SUBSTRING_FILTERS = ("late_last_position", "zero_direction", "nan", "kl")
RELAX = {
    "late_layer": "max_layer_fraction",
    "last_position": "last_position_rule",
    "late_last_position": "substring_layer_fraction",
    "zero_direction": "(none: a zero direction changes nothing)",
    "nan": "(none: NaN scores come from the model's activations)",
    "kl": "kl_threshold",
    "induce": "induce_threshold",
}
# The grids each method ranks by and reads its KL from.
RANKING = {"cosmic": "S_abl+S_add", "refusal_tokens": "bypass", "substring": "bypass_mode"}
KL_GRID = {"cosmic": "KL", "refusal_tokens": "KL_linear", "substring": "KL"}
# A direction is numerically zero if its norm is at most this share of the largest.
ZERO_NORM = 1e-6

Cell = tuple[int, int]  # (pos index, layer)


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
    # Why the pick may not be worth having (its scores do not beat no intervention).
    warnings: tuple[str, ...] = ()
    # What else a reader of the pick should know (higher-ranked candidates the KL filter dropped).
    notes: tuple[str, ...] = ()

    @property
    def found(self) -> bool:
        return self.position is not None and self.layer is not None

    @property
    def pick(self) -> tuple[int, int] | None:
        if self.position is None or self.layer is None:
            return None
        return (self.position, self.layer)

    def intervention(
        self,
        kind: Kind,
        *,
        alpha: float = 1.0,
        mode: Mode | None = None,
        placement: Placement = "residual",
    ) -> Intervention:
        """The pick as an intervention (``kind`` ``"ablate"`` or ``"add"``) in the selection's
        mode, or in ``mode``; ``placement`` as in :class:`~cosmic_tl.interventions.Intervention`.

        >>> with intervene(model, cosmic.intervention("ablate")):  # doctest: +SKIP
        ...     completions = generate(model, harmful)
        """
        if self.direction is None or self.layer is None:
            raise ValueError(f"{self.method} has no picked direction: {self.message}")
        ref = self.reference.float() if self.reference is not None else None
        return Intervention(
            kind,
            mode or self.mode,
            self.direction.float(),
            layer=self.layer,
            reference=ref,
            alpha=alpha,
            placement=placement,
        )

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
            "warnings": list(self.warnings),
            "notes": list(self.notes),
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
            tuple(meta.get("warnings", ())),
            tuple(meta.get("notes", ())),
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


def substring_max_layer(n_layers: int, settings: SelectionSettings) -> int:
    """The substring method discards position -1 at layers ``>= int(substring_layer_fraction·n)``."""
    return int(settings.substring_layer_fraction * n_layers)


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


def _cells(shape: tuple[int, int]) -> Iterator[Cell]:
    for i in range(shape[0]):
        for j in range(shape[1]):
            yield i, j


def zero_directions(scores: Scores) -> Bool[Tensor, "pos layer"]:
    """Candidates whose direction is zero or numerically negligible (cosmic-method.md §4c).

    Read from the ``norm`` grid (every candidate's ‖r‖); all False where it is absent.
    """
    norm = scores.grids.get("norm")
    if norm is None:
        return torch.zeros(len(scores.positions), scores.n_layers, dtype=torch.bool)
    return norm <= ZERO_NORM * float(torch.nan_to_num(norm, nan=0.0).max())


def _nan(*values: Tensor) -> bool:
    return any(math.isnan(float(v)) for v in values)


Check = tuple[str, Callable[[int, int], bool]]  # (reason, does it discard cell (i, j)?)


def _reasons(scores: Scores, checks: Sequence[Check]) -> list[list[str]]:
    """Every cell's reason: the first check that discards it, else ``KEPT``."""
    reasons = [[KEPT] * scores.n_layers for _ in scores.positions]
    for i, j in _cells((len(scores.positions), scores.n_layers)):
        reasons[i][j] = next((reason for reason, hit in checks if hit(i, j)), KEPT)
    return reasons


def cosmic_prefilter(scores: Scores, settings: SelectionSettings) -> list[list[str]]:
    """Reasons from every COSMIC filter except KL (which needs the ranking order)."""
    s_abl, s_add = scores.grids["S_abl"], scores.grids["S_add"]
    top = max_layer(scores.n_layers, settings)
    a, s = last_position_bounds(s_abl, s_add, scores.positions)
    zero = zero_directions(scores)
    last = [p == -1 for p in scores.positions]
    return _reasons(
        scores,
        [
            ("late_layer", lambda i, j: j >= top),
            ("last_position", lambda i, j: settings.last_position_rule and last[i] and j > a and j > s),
            ("zero_direction", lambda i, j: bool(zero[i, j])),
            ("nan", lambda i, j: _nan(s_abl[i, j], s_add[i, j])),
        ],
    )


def _grid(scores: Scores, name: str, method: str) -> Tensor:
    if name not in scores.grids:
        raise ValueError(
            f"these scores have no {name!r} grid, which {method} needs: score with that "
            f"baseline enabled (score_candidates(..., baseline=[{method!r}]))"
        )
    return scores.grids[name]


def baseline_prefilter(scores: Scores, settings: SelectionSettings) -> list[list[str]]:
    """Reasons from the refusal-token baseline's filters except KL."""
    top = max_layer(scores.n_layers, settings)
    induce = _grid(scores, "induce", "refusal_tokens")
    bypass = _grid(scores, "bypass", "refusal_tokens")
    zero = zero_directions(scores)
    return _reasons(
        scores,
        [
            ("late_layer", lambda i, j: j >= top),
            ("zero_direction", lambda i, j: bool(zero[i, j])),
            ("nan", lambda i, j: _nan(induce[i, j])),
            ("induce", lambda i, j: float(induce[i, j]) < settings.induce_threshold),
            ("nan", lambda i, j: _nan(bypass[i, j])),
        ],
    )


def substring_prefilter(scores: Scores, settings: SelectionSettings) -> list[list[str]]:
    """Reasons from the substring method's filters except KL: position -1 at late layers,
    zero directions, NaN ``bypass_mode`` / ``induce_mode``; no induce threshold."""
    top = substring_max_layer(scores.n_layers, settings)
    bypass = _grid(scores, "bypass_mode", "substring")
    induce = _grid(scores, "induce_mode", "substring")
    zero = zero_directions(scores)
    last = [p == -1 for p in scores.positions]
    return _reasons(
        scores,
        [
            ("late_last_position", lambda i, j: last[i] and j >= top),
            ("zero_direction", lambda i, j: bool(zero[i, j])),
            ("nan", lambda i, j: _nan(bypass[i, j], induce[i, j])),
        ],
    )


PREFILTERS: dict[str, Callable[[Scores, SelectionSettings], list[list[str]]]] = {
    "cosmic": cosmic_prefilter,
    "refusal_tokens": baseline_prefilter,
    "substring": substring_prefilter,
}


def ranking_grid(scores: Scores, method: str) -> Float[Tensor, "pos layer"]:
    """The grid ``method`` ranks candidates by (COSMIC: higher is better; the baselines: lower)."""
    if method == "cosmic":
        return scores.grids["S_abl"] + scores.grids["S_add"]
    return _grid(scores, RANKING[method], method)


def ranked(
    ranking: Float[Tensor, "pos layer"], reasons: list[list[str]], descending: bool
) -> list[Cell]:
    """Surviving cells from best to worst (ties broken by position, then layer)."""
    shape = (int(ranking.shape[0]), int(ranking.shape[1]))
    cells = [(i, j) for i, j in _cells(shape) if reasons[i][j] == KEPT]
    sign = -1.0 if descending else 1.0
    return sorted(cells, key=lambda c: (sign * float(ranking[c]), c))


def ranking_order(scores: Scores, method: str, settings: SelectionSettings) -> list[Cell]:
    """``method``'s candidates that pass every filter but KL, best first."""
    return ranked(ranking_grid(scores, method), PREFILTERS[method](scores, settings), method == "cosmic")


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


def _kl_grid(scores: Scores, method: str) -> str:
    name = KL_GRID[method]
    if name == "KL_linear" and name not in scores.grids and scores.mode == "lce":
        return "KL"  # in LCE mode the baseline's linear ablation is the mode's
    _grid(scores, name, method)
    return name


def filter_reasons(
    scores: Scores, method: str, settings: SelectionSettings | None = None
) -> list[list[str]]:
    """Every cell's fate under ``method``'s filters, as far as the scores tell (``[pos][layer]``).

    The first filter that removes a cell, as in the selection, with the KL filter applied
    wherever KL was computed (also below the pick, where the selection's walk stopped);
    :data:`KL_NOT_SCORED` where it passes the other filters but its KL was not computed;
    else :data:`KEPT`.
    """
    settings = settings or SelectionSettings()
    reasons = PREFILTERS[method](scores, settings)
    name = _kl_grid(scores, method)
    kl, done = scores.grids[name], scores.computed[name]
    for i, j in _cells((len(scores.positions), scores.n_layers)):
        if reasons[i][j] != KEPT:
            continue
        if not bool(done[i, j]):
            reasons[i][j] = KL_NOT_SCORED
        elif math.isnan(float(kl[i, j])):
            reasons[i][j] = "nan"
        elif float(kl[i, j]) > settings.kl_threshold:
            reasons[i][j] = "kl"
    return reasons


def _apply_kl(
    scores: Scores, method: str, order: list[Cell], reasons: list[list[str]], threshold: float
) -> Cell | None:
    """The selection's KL walk over computed grids; records the reasons in ``reasons``."""
    name = _kl_grid(scores, method)
    kl, done = scores.grids[name], scores.computed[name]

    def computed(cell: Cell) -> float:
        if not bool(done[cell]):
            raise ValueError(
                f"{name} was not computed for candidate (pos {scores.positions[cell[0]]}, layer "
                f"{cell[1]}), which could be the pick; score with full grids or let the engine choose"
            )
        return float(kl[cell])

    pick, discarded = walk_ranking(order, computed, threshold)
    for (i, j), reason in discarded.items():
        reasons[i][j] = reason
    return pick


def _no_better_than_clean(method: str, values: dict[str, float], clean: dict[str, float]) -> list[str]:
    """Why a pick's scores do not beat doing nothing (empty if they do)."""
    checks: list[tuple[str, str, bool]] = []  # (score, clean key, higher is better)
    if method == "cosmic":
        checks = [("S_abl", "cos_harmful_harmless", True), ("S_add", "cos_harmful_harmless", True)]
    else:
        suffix = "" if method == "refusal_tokens" else "_mode"
        checks = [
            (f"bypass{suffix}", "refusal_score_harmful", False),
            (f"induce{suffix}", "refusal_score_harmless", True),
        ]
    out = []
    for name, key, higher in checks:
        if name not in values or key not in clean:
            continue
        v, c = values[name], clean[key]
        if (v <= c) if higher else (v >= c):
            relation = "≤" if higher else "≥"
            out.append(
                f"{name} = {v:.4g} does not beat no intervention ({relation} {c:.4g}): "
                f"the pick may not move refusal"
            )
    return out


def _dropped_by_kl(
    scores: Scores, method: str, order: list[Cell], reasons: list[list[str]], threshold: float
) -> list[str]:
    """A note on the candidates ranked above the pick that the KL filter dropped (empty if none).

    ``order`` is the ranking the KL walk went down, best first. The KL is measured on the
    harmless validation prompts: a few of them that the model refuses, or nearly refuses,
    can lift the true refusal direction's KL over the threshold.
    """
    dropped = [(i, j) for i, j in order if reasons[i][j] == "kl"]
    if not dropped:
        return []
    i, j = dropped[0]
    kl = float(scores.grids[_kl_grid(scores, method)][i, j])
    n = len(dropped)
    return [
        f"{n} higher-ranked candidate{'s were' if n > 1 else ' was'} dropped by the KL filter, "
        f"the best at position {scores.positions[i]}, layer {j} (KL {kl:.3g} > {threshold:g} "
        "on the harmless validation prompts)"
    ]


def _finish(
    method: Method,
    scores: Scores,
    ranking: Tensor,
    reasons: list[list[str]],
    pick: Cell | None,
    filters: tuple[str, ...],
    candidates: Any | None,
    order: list[Cell],
    threshold: float,
) -> Selection:
    counts = {f: sum(r.count(f) for r in reasons) for f in filters}
    total = len(scores.positions) * scores.n_layers
    position = layer = direction = reference = None
    values: dict[str, float] = {}
    warnings: list[str] = []
    notes: list[str] = []
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
        warnings = _no_better_than_clean(method, values, scores.clean)
        notes = _dropped_by_kl(scores, method, order, reasons, threshold)
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
        tuple(warnings),
        tuple(notes),
    )


def _select(
    method: Method,
    filters: tuple[str, ...],
    scores: Scores,
    settings: SelectionSettings | None,
    candidates: Any | None,
) -> Selection:
    settings = settings or SelectionSettings()
    ranking = ranking_grid(scores, method)
    reasons = PREFILTERS[method](scores, settings)
    order = ranked(ranking, reasons, method == "cosmic")
    pick = _apply_kl(scores, method, order, reasons, settings.kl_threshold)
    return _finish(
        method, scores, ranking, reasons, pick, filters, candidates, order, settings.kl_threshold
    )


def select_cosmic(
    scores: Scores, settings: SelectionSettings | None = None, candidates: Any | None = None
) -> Selection:
    """COSMIC: filters of §3 (and zero directions), then the maximum of ``S_abl + S_add``.

    Raises :class:`NoCandidateError` (with the per-filter counts) if nothing survives.
    """
    out = _select("cosmic", COSMIC_FILTERS, scores, settings, candidates)
    if not out.found:
        raise NoCandidateError(out)
    return out


def select_refusal_tokens(
    scores: Scores, settings: SelectionSettings | None = None, candidates: Any | None = None
) -> Selection:
    """Arditi et al.'s baseline (§4a): drop late layers, zero directions, ``induce < 0``
    and ``KL > 0.1`` (linear-ablation KL); minimum ``bypass``.

    Its grids use linear interventions in every mode. An empty result
    (``selection.found`` is False) is a normal outcome.
    """
    return _select("refusal_tokens", BASELINE_FILTERS, scores, settings, candidates)


def select_substring(
    scores: Scores, settings: SelectionSettings | None = None, candidates: Any | None = None
) -> Selection:
    """The COSMIC paper's refusal-token comparison (§4b): the mode's interventions; NaN
    out; position -1 at layers ``>= int(0.6·n)`` out; zero directions out; ``KL > 0.1``
    out; no induce filter; minimum ``bypass_mode``. An empty result is a normal outcome."""
    return _select("substring", SUBSTRING_FILTERS, scores, settings, candidates)


SELECT: dict[str, Callable[..., Selection]] = {
    "cosmic": select_cosmic,
    "refusal_tokens": select_refusal_tokens,
    "substring": select_substring,
}
