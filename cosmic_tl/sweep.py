"""The (position, layer) sweep, the metrics it runs, and which cells need them.

:func:`sweep` is the one generic loop: it calls a *metric* for each candidate cell
and returns ``[pos, layer]`` grids. :func:`score_candidates` builds COSMIC's and
the baseline's metrics on the engine's :class:`~cosmic_tl.engine.Runner` and
plans which cells need them.

**Lazy cells.** Cells that no filter outcome can make the pick are not scored: KL is
computed down each method's ranking until the first candidate that passes (the same
walk the selection makes, :func:`~cosmic_tl.selection.walk_ranking`), position -1
cells pruned by the last-position rule are skipped, and late-layer cells are scored
only where the last-position rule reads them. ``full=True`` scores all.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from cosmic_tl.candidates import Candidates
from cosmic_tl.config import Mode, SelectionSettings
from cosmic_tl.engine import Runner, clean_logits
from cosmic_tl.interventions import Intervention, Kind
from cosmic_tl.models import model_id
from cosmic_tl.scoring import (
    Scores,
    cosine,
    default_refusal_tokens,
    encode_refusal_tokens,
    evaluation_layers,
    kl_divergence,
    layer_cosines,
    pooled,
    refusal_score,
    refusal_token_gap,
)
from cosmic_tl.selection import (
    Cell,
    baseline_prefilter,
    cosmic_prefilter,
    last_position_bounds,
    max_layer,
    ranked,
    walk_ranking,
)
from cosmic_tl.templates import Prompts, prompts_for

Metric = Callable[[int, int], dict[str, float]]


def sweep(
    metric: Metric,
    cells: Iterable[Cell],
    shape: tuple[int, int],
    *,
    progress: bool = True,
    desc: str = "sweep",
) -> tuple[dict[str, Float[Tensor, "pos layer"]], dict[str, Bool[Tensor, "pos layer"]]]:
    """Call ``metric(pos_index, layer)`` for each cell and collect ``[pos, layer]`` grids.

    Returns the grids (NaN where the metric gave no value) and, per grid, a mask of
    the cells the metric filled in (a metric may itself return NaN).

    >>> grids, filled = sweep(lambda i, l: {"x": i + l}, [(0, 0), (1, 2)], (2, 3))
    >>> grids["x"][1, 2].item(), bool(filled["x"][0, 1])
    (3.0, False)
    """
    todo = list(cells)
    grids: dict[str, Tensor] = {}
    filled: dict[str, Tensor] = {}
    for i, j in tqdm(todo, desc=desc, disable=not progress, leave=False):
        for name, value in metric(i, j).items():
            if name not in grids:
                grids[name] = torch.full(shape, math.nan, dtype=torch.float64)
                filled[name] = torch.zeros(shape, dtype=torch.bool)
            grids[name][i, j] = value
            filled[name][i, j] = True
    return grids, filled


# ---------------------------------------------------------------------- scoring


@dataclass
class _Context:
    candidates: Candidates
    mode: Mode
    alpha: float
    eval_layers: tuple[int, ...]
    harmful: Runner
    harmless: Runner
    b_harmful: Tensor
    b_harmless: Tensor
    token_ids: tuple[int, ...]

    def intervention(self, kind: Kind, i: int, layer: int) -> Intervention:
        p = self.candidates.positions[i]
        return Intervention(
            kind,
            self.mode,
            self.candidates.direction(p, layer).float(),
            layer,
            self.candidates.reference(p, layer).float(),
            self.alpha,
        )


def _pass_metric(
    ctx: _Context, i: int, layer: int, *, kind: Kind, cos: bool, tokens: bool
) -> dict[str, float]:
    """Ablation pass on harmful prompts (``S_abl``, ``bypass``) or addition pass on
    harmless prompts (``S_add``, ``induce``)."""
    runner, target, names = (
        (ctx.harmful, ctx.b_harmless, ("S_abl", "bypass"))
        if kind == "ablate"
        else (ctx.harmless, ctx.b_harmful, ("S_add", "induce"))
    )
    iv = ctx.intervention(kind, i, layer)
    out: dict[str, float] = {}
    res = runner.run(iv, eval_layers=ctx.eval_layers if cos else (), logits=tokens)
    if cos:
        assert res.eval_sums is not None
        out[names[0]] = cosine(pooled(res.eval_sums, ctx.eval_layers), target)
    if tokens:
        assert res.logits is not None
        out[names[1]] = float(refusal_score(res.logits, ctx.token_ids).mean())
    return out


def _kl_metric(ctx: _Context, i: int, layer: int) -> dict[str, float]:
    """KL(P_clean ‖ P_ablated) of the next token on harmless prompts."""
    res = ctx.harmless.run(ctx.intervention("ablate", i, layer), eval_layers=(), logits=True)
    assert res.logits is not None and ctx.harmless.clean.logits is not None
    return {"KL": float(kl_divergence(ctx.harmless.clean.logits, res.logits).mean())}


def score_candidates(
    model: Any,
    candidates: Candidates,
    harmful_val: Sequence[str] | Prompts,
    harmless_val: Sequence[str] | Prompts,
    *,
    mode: Mode = "ace",
    alpha: float = 1.0,
    settings: SelectionSettings | None = None,
    baseline: bool = True,
    refusal_tokens: Sequence[str] | None = None,
    full: bool = False,
    batch_size: int = 32,
    reuse_prefix: bool = True,
    share_prefix: bool = True,
    progress: bool = True,
) -> Scores:
    """Score every candidate for COSMIC (and the refusal-token baseline).

    With ``full=False`` only cells that can change a pick are scored (see the module
    docstring); the picks are the same as with ``full=True``. ``refusal_tokens``
    ``("auto",)`` lets :func:`suggest_refusal_tokens` choose them; ``None`` takes the
    model family's (:func:`~cosmic_tl.scoring.default_refusal_tokens`).
    """
    settings = settings or SelectionSettings()
    candidates.check_compatible(model)
    if mode not in ("ace", "lce"):
        raise ValueError(f"mode must be 'ace' or 'lce', not {mode!r}")
    if not harmful_val or not harmless_val:
        raise ValueError("the validation sets must not be empty")
    harmful_val, harmless_val = prompts_for(model, harmful_val), prompts_for(model, harmless_val)
    curve = layer_cosines(candidates.eval_harmful, candidates.eval_harmless)
    if not torch.isfinite(curve).all():
        bad = [j for j in range(curve.shape[0]) if not math.isfinite(float(curve[j]))]
        raise ValueError(f"non-finite training activations at layers {bad}; cannot score")
    eval_layers = evaluation_layers(curve, settings.eval_layer_fraction)
    kw: dict[str, Any] = {
        "batch_size": batch_size,
        "reuse_prefix": reuse_prefix,
        "share_prefix": share_prefix,
    }
    harmful = Runner(model, harmful_val, **kw)
    harmless = Runner(model, harmless_val, **kw)
    assert harmful.clean.eval_sums is not None and harmless.clean.eval_sums is not None
    for name, runner in (("harmful", harmful), ("harmless", harmless)):
        assert runner.clean.logits is not None
        if not torch.isfinite(runner.clean.logits).all():
            raise ValueError(f"the model produces non-finite logits on the {name} validation set")
    names = resolve_refusal_tokens(model, refusal_tokens, harmful_val, harmless_val, batch_size)
    token_ids = encode_refusal_tokens(model.tokenizer, names) if baseline else ()
    ctx = _Context(
        candidates,
        mode,
        alpha,
        eval_layers,
        harmful,
        harmless,
        pooled(harmful.clean.eval_sums, eval_layers),
        pooled(harmless.clean.eval_sums, eval_layers),
        token_ids,
    )
    clean: dict[str, float] = {"cos_harmful_harmless": cosine(ctx.b_harmful, ctx.b_harmless)}
    if baseline:
        assert harmful.clean.logits is not None and harmless.clean.logits is not None
        clean["refusal_score_harmful"] = float(refusal_score(harmful.clean.logits, token_ids).mean())
        clean["refusal_score_harmless"] = float(refusal_score(harmless.clean.logits, token_ids).mean())
    sheet = _Sheet(ctx, names if baseline else (), clean, baseline, progress)
    started = time.perf_counter()
    if full:
        sheet.fill_all()
    else:
        sheet.fill_needed(settings)
    return dataclasses.replace(
        sheet.scores(),
        stats={
            "passes": float(harmful.passes + harmless.passes),
            "gflop": (harmful.flops + harmless.flops) / 1e9,
            "sweep_seconds": time.perf_counter() - started,
        },
    )


def resolve_refusal_tokens(
    model: Any,
    refusal_tokens: Sequence[str] | None,
    harmful: Sequence[str] | Prompts,
    harmless: Sequence[str] | Prompts,
    batch_size: int = 32,
) -> tuple[str, ...]:
    """The refusal-token strings a run uses: as given, suggested by the model for
    ``("auto",)`` (on these prompts), or the model family's default for ``None``."""
    if refusal_tokens and tuple(refusal_tokens) == ("auto",):
        return suggest_refusal_tokens(model, harmful, harmless, batch_size=batch_size)
    if refusal_tokens:
        return tuple(refusal_tokens)
    return default_refusal_tokens(model_id(model))


class _Sheet:
    """Grids being filled in; knows which metric shares which pass."""

    def __init__(
        self,
        ctx: _Context,
        names: tuple[str, ...],
        clean: dict[str, float],
        baseline: bool,
        progress: bool,
    ) -> None:
        self.ctx, self.names, self.clean = ctx, names, clean
        self.baseline, self.progress = baseline, progress
        self.shape = (len(ctx.candidates.positions), ctx.candidates.n_layers)
        keys = ("S_abl", "S_add", "KL") + (("bypass", "induce") if baseline else ())
        self.grids = {k: torch.full(self.shape, math.nan, dtype=torch.float64) for k in keys}
        self.done = {k: torch.zeros(self.shape, dtype=torch.bool) for k in keys}

    def scores(self) -> Scores:
        c = self.ctx
        return Scores(
            {k: v.clone() for k, v in self.grids.items()},
            {k: v.clone() for k, v in self.done.items()},
            c.candidates.positions,
            c.candidates.position_labels,
            c.eval_layers,
            layer_cosines(c.candidates.eval_harmful, c.candidates.eval_harmless),
            c.b_harmful,
            c.b_harmless,
            c.mode,
            c.alpha,
            c.candidates.model_id,
            self.names,
            c.token_ids,
            self.clean,
        )

    def record(self, metric: Metric, cells: Sequence[Cell], desc: str) -> None:
        grids, filled = sweep(metric, cells, self.shape, progress=self.progress, desc=desc)
        for name, grid in grids.items():
            mask = filled[name]
            self.grids[name][mask] = grid[mask]
            self.done[name] |= mask

    def passes(self, cos: set[Cell], tokens: set[Cell], bypass: Callable[[Cell], bool]) -> None:
        """Addition passes then ablation passes for the given needs."""
        ctx = self.ctx
        add_cells = sorted(cos | tokens)
        self.record(
            lambda i, j: _pass_metric(ctx, i, j, kind="add", cos=(i, j) in cos, tokens=(i, j) in tokens),
            add_cells,
            "addition passes",
        )
        abl_cells = sorted(cos | {c for c in tokens if bypass(c)})
        self.record(
            lambda i, j: _pass_metric(
                ctx,
                i,
                j,
                kind="ablate",
                cos=(i, j) in cos,
                tokens=(i, j) in tokens and bypass((i, j)),
            ),
            abl_cells,
            "ablation passes",
        )

    def fill_all(self) -> None:
        cells = {(i, j) for i in range(self.shape[0]) for j in range(self.shape[1])}
        self.passes(cells, cells if self.baseline else set(), lambda c: True)
        self.record(lambda i, j: _kl_metric(self.ctx, i, j), sorted(cells), "KL")

    def fill_needed(self, settings: SelectionSettings) -> None:
        n_pos, n_layers = self.shape
        top = max_layer(n_layers, settings)
        positions = self.ctx.candidates.positions
        last = positions.index(-1) if -1 in positions else None
        tokens = {(i, j) for i in range(n_pos) for j in range(top)} if self.baseline else set()
        thr = settings.induce_threshold

        def bypass(c: Cell) -> bool:
            return float(self.grids["induce"][c]) >= thr

        rule = settings.last_position_rule
        first = {
            (i, j) for i in range(n_pos) for j in range(n_layers) if i != last and (rule or j < top)
        }
        self.passes(first, {c for c in tokens if c[0] != last}, bypass)
        if last is not None:
            keep = range(top)
            if rule:
                a, s = last_position_bounds(self.grids["S_abl"], self.grids["S_add"], positions)
                keep = [j for j in range(top) if not (j > a and j > s)]  # type: ignore[assignment]
            self.passes({(last, j) for j in keep}, {c for c in tokens if c[0] == last}, bypass)
        # KL down each method's ranking until the first candidate that passes.
        view = self.scores()
        orders = [
            ranked(view.grids["S_abl"] + view.grids["S_add"], cosmic_prefilter(view, settings), True)
        ]
        if self.baseline:
            orders.append(ranked(view.grids["bypass"], baseline_prefilter(view, settings), False))
        for order in orders:
            walk_ranking(order, self.kl, settings.kl_threshold)

    def kl(self, cell: Cell) -> float:
        """The cell's KL, computed now if it was not yet."""
        if not bool(self.done["KL"][cell]):
            self.record(lambda i, j: _kl_metric(self.ctx, i, j), [cell], "KL")
        return float(self.grids["KL"][cell])


def suggest_refusal_tokens(
    model: Any,
    harmful: Sequence[str] | Prompts,
    harmless: Sequence[str] | Prompts,
    *,
    k: int = 2,
    batch_size: int = 32,
) -> tuple[str, ...]:
    """Refusal tokens suggested by the model itself: the ``k`` first tokens whose
    probability rises most from harmless to harmful prompts (as strings)."""
    h = clean_logits(model, harmful, batch_size=batch_size)
    l_ = clean_logits(model, harmless, batch_size=batch_size)
    ids = refusal_token_gap(h, l_, k)
    return tuple(model.tokenizer.decode([int(i)]) for i in ids)
