"""Which candidates to score, the metrics that score them, and :func:`score_candidates`.

:func:`score_candidates` runs COSMIC's and the baselines' metrics through the generic
:func:`~cosmic_tl.sweep.sweep` on the engine's :class:`~cosmic_tl.engine.Runner`, and
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
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import torch

from cosmic_tl.candidates import Candidates
from cosmic_tl.config import BASELINE_METHODS, Mode, Placement, SelectionSettings
from cosmic_tl.engine import UNEMBED_ROWS, Runner, clean_logits
from cosmic_tl.interventions import Kind
from cosmic_tl.metrics import GRIDS, OUTPUTS, Context, kl_metric, pass_metrics
from cosmic_tl.models.boot import model_id
from cosmic_tl.scoring import (
    Scores,
    cosine,
    default_refusal_tokens,
    encode_refusal_tokens,
    evaluation_layers,
    layer_cosines,
    pooled,
    refusal_score,
    refusal_token_gap,
)
from cosmic_tl.selection import (
    KL_GRID,
    RANKING,
    Cell,
    last_position_bounds,
    max_layer,
    ranking_order,
    substring_max_layer,
    walk_ranking,
)
from cosmic_tl.sweep import Metric, cellwise, sweep
from cosmic_tl.templates import Prompts, prompts_for


def score_candidates(
    model: Any,
    candidates: Candidates,
    harmful_val: Sequence[str] | Prompts,
    harmless_val: Sequence[str] | Prompts,
    *,
    mode: Mode = "ace",
    alpha: float = 1.0,
    settings: SelectionSettings | None = None,
    baseline: bool | Sequence[str] = True,
    refusal_tokens: Sequence[str] | None = None,
    full: bool = False,
    batch_size: int = 32,
    reuse_prefix: bool = True,
    share_prefix: bool = True,
    inplace_addition: bool = False,
    placement: Placement = "residual",
    progress: bool = True,
) -> Scores:
    """Score every candidate for COSMIC (and the refusal-token baseline).

    With ``full=False`` only cells that can change a pick are scored (see the module
    docstring); the picks are the same as with ``full=True``. ``baseline``: ``True`` for
    Arditi et al.'s refusal-token baseline (linear interventions in every mode),
    ``False`` for none, or the names of the baselines to score (``"refusal_tokens"``,
    ``"substring"``: the COSMIC paper's comparison, with the mode's interventions). Each
    baseline pick's COSMIC score and COSMIC's pick under each baseline's score are
    always computed, so that picks can be compared. ``inplace_addition`` reproduces the
    published code's reading of LCE ``S_add`` (cosmic-method.md §4d: the in-place
    addition is seen at evaluation layer ``l - 1`` too); the default reads clean
    activations there, as the formulas say. ``placement`` is where LCE ablation hooks on
    post-norm architectures (:class:`~cosmic_tl.interventions.Intervention`).
    ``refusal_tokens``
    ``("auto",)`` lets :func:`suggest_refusal_tokens` choose them; ``None`` takes the
    model family's (:func:`~cosmic_tl.scoring.default_refusal_tokens`).
    """
    candidates.check_compatible(model)
    _check_settings(mode, alpha, baseline)
    if not harmful_val or not harmless_val:
        raise ValueError("the validation sets must not be empty")
    harmful_val, harmless_val = prompts_for(model, harmful_val), prompts_for(model, harmless_val)
    _eval_layers(candidates, settings or SelectionSettings())
    kw: dict[str, Any] = {
        "batch_size": batch_size,
        "reuse_prefix": reuse_prefix,
        "share_prefix": share_prefix,
    }
    harmful = Runner(model, harmful_val, **kw)
    harmless = Runner(model, harmless_val, **kw)
    names = resolve_refusal_tokens(model, refusal_tokens, harmful_val, harmless_val, batch_size)
    return score_runners(
        candidates,
        harmful,
        harmless,
        refusal_tokens=names,
        mode=mode,
        alpha=alpha,
        settings=settings,
        baseline=baseline,
        full=full,
        inplace_addition=inplace_addition,
        placement=placement,
        progress=progress,
    )


def _check_settings(mode: Mode, alpha: float, baseline: bool | Sequence[str]) -> tuple[str, ...]:
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, not {alpha!r}")
    if mode not in ("ace", "lce"):
        raise ValueError(f"mode must be 'ace' or 'lce', not {mode!r}")
    return _baselines(baseline)


def _eval_layers(candidates: Candidates, settings: SelectionSettings) -> tuple[int, ...]:
    """COSMIC's evaluation layers from the training means, or a ``ValueError``."""
    curve = layer_cosines(candidates.eval_harmful, candidates.eval_harmless)
    if not torch.isfinite(curve).all():
        bad = [j for j in range(curve.shape[0]) if not math.isfinite(float(curve[j]))]
        raise ValueError(f"non-finite training activations at layers {bad}; cannot score")
    return evaluation_layers(curve, settings.eval_layer_fraction)


def score_runners(
    candidates: Candidates,
    harmful: Runner,
    harmless: Runner,
    *,
    refusal_tokens: Sequence[str],
    mode: Mode = "ace",
    alpha: float = 1.0,
    settings: SelectionSettings | None = None,
    baseline: bool | Sequence[str] = True,
    full: bool = False,
    inplace_addition: bool = False,
    placement: Placement = "residual",
    progress: bool = True,
) -> Scores:
    """:func:`score_candidates` on validation sets already held by runners.

    The runners may be :meth:`~cosmic_tl.engine.Runner.resampled` views, so that many
    resamples of the validation prompts share one set of clean caches. ``refusal_tokens``
    are strings, as :func:`resolve_refusal_tokens` returns them. ``stats`` count the
    passes and FLOP of this call only.
    """
    settings = settings or SelectionSettings()
    model = harmful.model
    candidates.check_compatible(model)
    baselines = _check_settings(mode, alpha, baseline)
    eval_layers = _eval_layers(candidates, settings)
    assert harmful.clean.eval_sums is not None and harmless.clean.eval_sums is not None
    for name, runner in (("harmful", harmful), ("harmless", harmless)):
        assert runner.clean.logits is not None
        if not torch.isfinite(runner.clean.logits).all():
            raise ValueError(f"the model produces non-finite logits on the {name} validation set")
    names = tuple(refusal_tokens)
    token_ids = encode_refusal_tokens(model.tokenizer, names) if baselines else ()
    ctx = Context(
        candidates,
        mode,
        alpha,
        eval_layers,
        harmful,
        harmless,
        pooled(harmful.clean.eval_sums, eval_layers),
        pooled(harmless.clean.eval_sums, eval_layers),
        token_ids,
        inplace_addition,
        placement,
    )
    clean: dict[str, float] = {"cos_harmful_harmless": cosine(ctx.b_harmful, ctx.b_harmless)}
    if baselines:
        assert harmful.clean.logits is not None and harmless.clean.logits is not None
        clean["refusal_score_harmful"] = float(refusal_score(harmful.clean.logits, token_ids).mean())
        clean["refusal_score_harmless"] = float(refusal_score(harmless.clean.logits, token_ids).mean())
    sheet = _Sheet(ctx, names if baselines else (), clean, ("cosmic", *baselines), progress)
    with _Work(harmful, harmless) as work:
        if full:
            sheet.fill_all()
        else:
            sheet.fill_needed(settings)
    return dataclasses.replace(sheet.scores(), stats=work.stats)


def ranking_grids(method: str) -> tuple[str, ...]:
    """The pass grids a method's ranking score is made of (``S_abl+S_add``: both)."""
    return tuple(RANKING[method].split("+"))


def unranked(scores: Scores, method: str) -> int:
    """How many candidates lack ``method``'s ranking score (lazy scoring skipped them)."""
    missing = torch.zeros((len(scores.positions), scores.n_layers), dtype=torch.bool)
    for name in ranking_grids(method):
        missing |= ~scores.computed[name] if name in scores.computed else torch.ones_like(missing)
    return int(missing.sum())


def rank_all(
    scores: Scores,
    candidates: Candidates,
    harmful: Runner,
    harmless: Runner,
    methods: Sequence[str],
    *,
    inplace_addition: bool = False,
    placement: Placement = "residual",
    progress: bool = True,
) -> Scores:
    """``scores`` with every method's ranking score computed at every candidate.

    Lazy scoring leaves a method's ranking score out where no filter outcome can make a
    cell the pick (a baseline's ``bypass`` where ``induce`` fails, say); an audit that
    ranks *all* candidates by a method's own proxy needs it everywhere. The runners hold
    the run's validation sets (the ones ``scores`` was made on); cells already computed
    are kept as they are. ``stats`` count the passes and FLOP of this call only.
    """
    model = harmful.model
    candidates.check_compatible(model)
    ctx = Context(
        candidates,
        scores.mode,
        scores.alpha,
        scores.eval_layers,
        harmful,
        harmless,
        scores.b_harmful,
        scores.b_harmless,
        scores.refusal_token_ids,
        inplace_addition,
        placement,
    )
    known = tuple(m for m in methods if all(g in scores.grids for g in ranking_grids(m)))
    sheet = _Sheet(ctx, scores.refusal_tokens, dict(scores.clean), known, progress)
    for name, grid in scores.grids.items():
        sheet.grids[name] = grid.clone()
        sheet.done[name] = scores.computed[name].clone()
    names = {g for m in known for g in ranking_grids(m)}
    with _Work(harmful, harmless) as work:
        sheet.compute({c: set(names) for c in sheet._all()})
    return dataclasses.replace(sheet.scores(), stats=work.stats)


class _Work:
    """The passes, FLOP and seconds the runners spend inside a ``with`` block."""

    def __init__(self, *runners: Runner) -> None:
        self.runners, self.stats = runners, dict[str, float]()

    def _totals(self) -> tuple[float, float]:
        return float(sum(r.passes for r in self.runners)), float(sum(r.flops for r in self.runners))

    def __enter__(self) -> _Work:
        self.start, self.started = self._totals(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        passes, flops = self._totals()
        self.stats = {
            "passes": passes - self.start[0],
            "gflop": (flops - self.start[1]) / 1e9,
            "sweep_seconds": time.perf_counter() - self.started,
        }


def _baselines(baseline: bool | Sequence[str]) -> tuple[str, ...]:
    if baseline is True:
        return ("refusal_tokens",)
    if baseline is False:
        return ()
    names = tuple(dict.fromkeys(baseline))
    bad = [b for b in names if b not in BASELINE_METHODS]
    if bad:
        raise ValueError(f"unknown baseline {bad[0]!r}; choose from {BASELINE_METHODS}")
    return names


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
    """Grids being filled in; knows which grid shares which pass."""

    def __init__(
        self,
        ctx: Context,
        names: tuple[str, ...],
        clean: dict[str, float],
        methods: tuple[str, ...],
        progress: bool,
    ) -> None:
        self.ctx, self.names, self.clean = ctx, names, clean
        self.methods, self.progress = methods, progress
        self.shape = (len(ctx.candidates.positions), ctx.candidates.n_layers)
        keys = tuple(dict.fromkeys(g for m in methods for g in GRIDS[m]))
        self.grids = {k: torch.full(self.shape, math.nan, dtype=torch.float64) for k in keys}
        self.done = {k: torch.zeros(self.shape, dtype=torch.bool) for k in keys}
        self.grids["norm"] = ctx.candidates.directions.double().norm(dim=-1)
        self.done["norm"] = torch.ones(self.shape, dtype=torch.bool)

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

    def record(self, metric: Metric, cells: Sequence[Cell], desc: str, chunk: int = 1) -> None:
        grids, filled = sweep(metric, cells, self.shape, chunk=chunk, progress=self.progress, desc=desc)
        for name, grid in grids.items():
            mask = filled[name]
            self.grids[name][mask] = grid[mask]
            self.done[name] |= mask

    def compute(self, needs: dict[Cell, set[str]]) -> None:
        """Fill the pass grids ``needs`` names per cell, one pass per cell and intervention."""
        groups: dict[tuple[Kind, Mode], dict[Cell, tuple[bool, bool]]] = {}
        for cell, names in needs.items():
            for name in names:
                if name not in self.grids or bool(self.done[name][cell]):
                    continue
                kind, whose, what = OUTPUTS[name]
                mode: Mode = self.ctx.mode if whose == "mode" else "lce"
                cos, tokens = groups.setdefault((kind, mode), {}).get(cell, (False, False))
                groups[kind, mode][cell] = (cos or what == "cos", tokens or what == "tokens")
        wanted = set(self.grids)
        for (kind, mode), flags in sorted(groups.items(), key=lambda kv: (kv[0][0] != "add", kv[0][1])):
            label = "addition" if kind == "add" else "ablation"
            # Passes that read the same things go through the engine together, so that
            # the logit passes share their unembedding (Runner.run_many).
            for cos, tokens in sorted(set(flags.values())):
                cells = sorted(c for c, f in flags.items() if f == (cos, tokens))
                metric = partial(
                    pass_metrics, self.ctx, kind=kind, mode=mode, cos=cos, tokens=tokens, wanted=wanted
                )
                chunk = _chunk(self.ctx.runner(kind), tokens)
                self.record(metric, cells, f"{label} passes ({mode.upper()})", chunk)

    def kl(self, cell: Cell, name: str = "KL") -> float:
        """The cell's KL grid ``name`` (``KL`` or ``KL_linear``), computed now if it was not yet."""
        if not bool(self.done[name][cell]):
            mode: Mode = self.ctx.mode if name == "KL" else "lce"
            wanted = set(self.grids)
            metric = cellwise(lambda i, j: kl_metric(self.ctx, i, j, mode=mode, wanted=wanted))
            self.record(metric, [cell], name)
        return float(self.grids[name][cell])

    def _all(self) -> list[Cell]:
        return [(i, j) for i in range(self.shape[0]) for j in range(self.shape[1])]

    def fill_all(self) -> None:
        passes = set(self.grids) & set(OUTPUTS)
        self.compute({c: set(passes) for c in self._all()})
        for name in ("KL", "KL_linear"):
            if name in self.grids:
                for c in self._all():
                    self.kl(c, name)

    def fill_needed(self, settings: SelectionSettings) -> None:
        n_pos, n_layers = self.shape
        top = max_layer(n_layers, settings)
        positions = self.ctx.candidates.positions
        last = positions.index(-1) if -1 in positions else None
        rule = settings.last_position_rule
        needs: dict[Cell, set[str]] = {c: set() for c in self._all()}
        for i, j in self._all():
            if "cosmic" in self.methods and i != last and (rule or j < top):
                needs[i, j] |= {"S_abl", "S_add"}  # the last-position rule reads every layer
            if "refusal_tokens" in self.methods and j < top:
                needs[i, j].add("induce")
            if "substring" in self.methods and not (
                i == last and j >= substring_max_layer(n_layers, settings)
            ):
                needs[i, j] |= {"bypass_mode", "induce_mode"}
        self.compute(needs)
        later: dict[Cell, set[str]] = {c: set() for c in self._all()}
        if "cosmic" in self.methods and last is not None:
            keep: Iterable[int] = range(top)
            if rule:
                a, s = last_position_bounds(self.grids["S_abl"], self.grids["S_add"], positions)
                keep = [j for j in range(top) if not (j > a and j > s)]
            for j in keep:
                later[last, j] |= {"S_abl", "S_add"}
        if "refusal_tokens" in self.methods:
            for i, j in self._all():
                if j < top and float(self.grids["induce"][i, j]) >= settings.induce_threshold:
                    later[i, j].add("bypass")
        self.compute(later)
        # KL down each method's ranking until the first candidate that passes.
        view = self.scores()
        picks: dict[str, Cell | None] = {}
        for method in self.methods:
            order = ranking_order(view, method, settings)
            kl = partial(self.kl, name=KL_GRID[method])
            picks[method], _ = walk_ranking(order, kl, settings.kl_threshold)
        self._comparison_cells(picks)

    def _comparison_cells(self, picks: dict[str, Cell | None]) -> None:
        """Each baseline's pick under COSMIC's score, COSMIC's pick under each baseline's."""
        needs: dict[Cell, set[str]] = {}
        for method, pick in picks.items():
            if pick is None:
                continue
            if method == "cosmic":
                for other in self.methods[1:]:
                    needs.setdefault(pick, set()).add(RANKING[other])
            else:
                needs.setdefault(pick, set()).update({"S_abl", "S_add"})
        self.compute(needs)


def _chunk(runner: Runner, logits: bool) -> int:
    """How many cells' passes go to the engine at once: enough for about ``UNEMBED_ROWS``
    prompts' logits to share one unembedding; one at a time when no logits are read."""
    return max(1, UNEMBED_ROWS // runner.n_prompts) if logits else 1


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
