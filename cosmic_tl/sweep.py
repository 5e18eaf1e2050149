"""The (position, layer) sweep and the engine that scores candidates fast.

:func:`sweep` is the one generic loop: it calls a *metric* for each candidate cell
and returns ``[pos, layer]`` grids. :func:`score_candidates` builds COSMIC's and
the baseline's metrics on a :class:`Runner` and decides which cells need them.

Why the runner is fast without changing any number:

- **Prefix reuse.** A one-layer intervention at block ``l`` leaves blocks ``< l``
  untouched, so the runner caches each block's clean input once and replays only
  blocks ``l..`` (TransformerLens's ``start_at_layer`` still runs the prefix). The
  replay calls the bridge's own block modules with the arguments the model passed
  them in the clean pass, so every hook point fires as in a full forward.
- **Early stop.** Cosine scores need layers up to ``max(L_low)`` only.
- **Last-position unembedding.** KL and refusal scores read the last position only.
- **Length bucketing.** Batches are sorted by length, so little padding is computed.
- **Lazy cells.** Cells that no filter outcome can make the pick are not scored:
  KL is computed down the ranking until the first candidate that passes, position
  -1 cells pruned by the last-position rule are skipped, and late-layer cells are
  scored only where the last-position rule reads them. ``full=True`` scores all.
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

from cosmic_tl.activations import eval_hook_names, prompt_batches, resid_pre_names
from cosmic_tl.candidates import Candidates
from cosmic_tl.config import SelectionSettings
from cosmic_tl.interventions import Intervention, intervention_hooks
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
    baseline_prefilter,
    cosmic_prefilter,
    last_position_bounds,
    max_layer,
    ranked,
)
from cosmic_tl.templates import Batch

Cell = tuple[int, int]  # (pos index, layer)
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


@dataclass
class _PreparedBatch:
    batch: Batch
    block_inputs: list[Tensor | None]  # clean input of each block (None if not kept)
    block_kwargs: list[dict[str, Any]]  # what the model passed each block
    clean_eval: Tensor  # [layer, d_model] float64 sums over the batch's prompts
    clean_logits: Tensor  # [batch, d_vocab] at the last position


@dataclass(frozen=True)
class RunOutput:
    """What one pass over a prompt set produced."""

    eval_sums: Float[Tensor, "layer d_model"] | None  # sum over prompts, eval layers filled
    logits: Float[Tensor, "prompt d_vocab"] | None  # last position, in prompt order


class Runner:
    """Runs a prompt set under an intervention, replaying blocks from clean caches.

    One clean forward per batch records each block's input and keyword arguments
    (attention mask, position embeddings, ...); :meth:`run` then replays blocks
    ``start..stop`` through the bridge's block modules with the intervention's hooks.
    """

    def __init__(
        self,
        model: Any,
        instructions: Sequence[str],
        *,
        batch_size: int = 32,
        system: str | None = None,
        reuse_prefix: bool = True,
    ) -> None:
        if not instructions:
            raise ValueError("need at least one prompt")
        self.model = model
        self.n_layers: int = model.cfg.n_layers
        self.n_prompts = len(instructions)
        self.reuse_prefix = reuse_prefix
        self.flops = 0.0  # weight-matmul FLOPs executed by run() (padding included)
        self.passes = 0  # calls of run()
        self._params_per_block = _block_params(model)
        self._unembed_params = int(model.cfg.d_model) * int(model.cfg.d_vocab)
        self._batches = [
            self._prepare(b) for b in prompt_batches(model, instructions, batch_size, system)
        ]
        self.clean = RunOutput(
            torch.stack([b.clean_eval for b in self._batches]).sum(0),
            self._in_prompt_order([b.clean_logits for b in self._batches]),
        )

    @torch.no_grad()
    def _prepare(self, batch: Batch) -> _PreparedBatch:
        kwargs: list[dict[str, Any]] = [{} for _ in range(self.n_layers)]

        def record(i: int, _module: Any, _args: Any, kw: dict[str, Any]) -> None:
            # Cache-free replay: drop the KV cache the model threads through blocks.
            kwargs[i] = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value")}
            kwargs[i]["use_cache"] = False

        handles = [
            block.register_forward_pre_hook(lambda m, a, kw, i=i: record(i, m, a, kw), with_kwargs=True)
            for i, block in enumerate(self.model.blocks)
        ]
        pre = resid_pre_names(self.n_layers) if self.reuse_prefix else ["blocks.0.hook_resid_pre"]
        evals = eval_hook_names(self.n_layers)
        names = set(pre) | set(evals)
        try:
            logits, cache = self.model.run_with_cache(
                batch.tokens.to(self.device),
                attention_mask=batch.attention_mask.to(self.device),
                names_filter=lambda n: n in names,
            )
        finally:
            for h in handles:
                h.remove()
        tokens = batch.tokens.numel()
        self.flops += 2.0 * tokens * (self._params_per_block * self.n_layers + self._unembed_params)
        kept = {n: cache[n] for n in pre}
        inputs: list[Tensor | None] = [
            kept.get(f"blocks.{i}.hook_resid_pre") for i in range(self.n_layers)
        ]
        clean_eval = torch.stack([cache[n][:, -1].double().sum(0).cpu() for n in evals])
        return _PreparedBatch(batch, inputs, kwargs, clean_eval, logits[:, -1].float().cpu())

    def _in_prompt_order(self, rows: list[Tensor]) -> Tensor:
        """Concatenate per-batch rows and put them back in the caller's prompt order."""
        order = torch.tensor([i for b in self._batches for i in b.batch.index])
        stacked = torch.cat(rows)
        out = torch.empty_like(stacked)
        out[order] = stacked
        return out

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def run(
        self, intervention: Intervention | None, *, eval_layers: Iterable[int], logits: bool
    ) -> RunOutput:
        """Evaluation-activation sums at ``eval_layers`` and/or last-position logits."""
        layers = sorted(set(eval_layers))
        touched = intervention.start_layer if intervention is not None else self.n_layers
        if not logits and layers and touched > layers[-1]:
            # The intervention starts after every requested layer: nothing to compute.
            return RunOutput(self.clean.eval_sums, None)
        self.passes += 1
        start = touched if self.reuse_prefix and intervention is not None else 0
        stop = self.n_layers if logits or not layers else layers[-1] + 1
        hooks = (
            intervention_hooks(intervention, self.n_layers, self.model.cfg.d_model)
            if intervention is not None
            else []
        )
        d_model = self.model.cfg.d_model
        sums = torch.zeros(self.n_layers, d_model, dtype=torch.float64) if layers else None
        rows: list[Tensor] = []
        with self.model.hooks(fwd_hooks=hooks):
            for prep in self._batches:
                early = [j for j in layers if j < start]
                if early and sums is not None:
                    # Blocks before the intervention are clean: reuse the clean sums.
                    sums[early] += prep.clean_eval[early]
                x = prep.block_inputs[start]
                assert x is not None
                last_norm: Tensor | None = None
                for i in range(start, stop):
                    out = self.model.blocks[i](x, **prep.block_kwargs[i])
                    x = out[0] if isinstance(out, tuple) else out
                    if sums is not None and i in layers:
                        act = x[:, -1]
                        if i == self.n_layers - 1:
                            last_norm = self.model.ln_final(x[:, -1:])
                            act = last_norm[:, -1]
                        sums[i] += act.double().sum(0).cpu()
                n_tok = prep.batch.tokens.numel()  # padding is computed too
                self.flops += 2.0 * n_tok * self._params_per_block * (stop - start)
                if logits:
                    if last_norm is None:
                        last_norm = self.model.ln_final(x[:, -1:])
                    rows.append(self.model.unembed(last_norm)[:, -1].float().cpu())
                    self.flops += 2.0 * x.shape[0] * self._unembed_params
        out_logits = self._in_prompt_order(rows) if logits else None
        return RunOutput(sums, out_logits)


def _block_params(model: Any) -> int:
    """Weights of one block (for the FLOP count: 2 FLOPs per weight per token)."""
    return sum(p.numel() for p in model.blocks[0].parameters())


# ---------------------------------------------------------------------- scoring


@dataclass
class _Context:
    candidates: Candidates
    mode: str
    alpha: float
    eval_layers: tuple[int, ...]
    harmful: Runner
    harmless: Runner
    b_harmful: Tensor
    b_harmless: Tensor
    token_ids: tuple[int, ...]

    def intervention(self, kind: str, i: int, layer: int) -> Intervention:
        p = self.candidates.positions[i]
        return Intervention(
            kind,  # type: ignore[arg-type]
            self.mode,  # type: ignore[arg-type]
            self.candidates.direction(p, layer).float(),
            layer,
            self.candidates.reference(p, layer).float(),
            self.alpha,
        )


def _pass_metric(
    ctx: _Context, i: int, layer: int, *, kind: str, cos: bool, tokens: bool
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
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    *,
    mode: str = "ace",
    alpha: float = 1.0,
    settings: SelectionSettings | None = None,
    baseline: bool = True,
    refusal_tokens: Sequence[str] | None = None,
    full: bool = False,
    batch_size: int = 32,
    system: str | None = None,
    reuse_prefix: bool = True,
    progress: bool = True,
) -> Scores:
    """Score every candidate for COSMIC (and the refusal-token baseline).

    With ``full=False`` only cells that can change a pick are scored (see the module
    docstring); the picks are the same as with ``full=True``.
    """
    settings = settings or SelectionSettings()
    candidates.check_compatible(model)
    if mode not in ("ace", "lce"):
        raise ValueError(f"mode must be 'ace' or 'lce', not {mode!r}")
    if not harmful_val or not harmless_val:
        raise ValueError("the validation sets must not be empty")
    curve = layer_cosines(candidates.eval_harmful, candidates.eval_harmless)
    if not torch.isfinite(curve).all():
        bad = [j for j in range(curve.shape[0]) if not math.isfinite(float(curve[j]))]
        raise ValueError(f"non-finite training activations at layers {bad}; cannot score")
    eval_layers = evaluation_layers(curve, settings.eval_layer_fraction)
    kw: dict[str, Any] = {"batch_size": batch_size, "system": system, "reuse_prefix": reuse_prefix}
    harmful = Runner(model, harmful_val, **kw)
    harmless = Runner(model, harmless_val, **kw)
    assert harmful.clean.eval_sums is not None and harmless.clean.eval_sums is not None
    for name, runner in (("harmful", harmful), ("harmless", harmless)):
        assert runner.clean.logits is not None
        if not torch.isfinite(runner.clean.logits).all():
            raise ValueError(f"the model produces non-finite logits on the {name} validation set")
    if refusal_tokens and tuple(refusal_tokens) == ("auto",):
        refusal_tokens = suggest_refusal_tokens(
            model, harmful_val, harmless_val, batch_size=batch_size, system=system
        )
    names = tuple(refusal_tokens) if refusal_tokens else default_refusal_tokens(model_id(model))
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
            for cell in order:
                if not bool(self.done["KL"][cell]):
                    self.record(lambda i, j: _kl_metric(self.ctx, i, j), [cell], "KL")
                value = float(self.grids["KL"][cell])
                if not math.isnan(value) and value <= settings.kl_threshold:
                    break


def suggest_refusal_tokens(
    model: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    k: int = 2,
    batch_size: int = 32,
    system: str | None = None,
) -> tuple[str, ...]:
    """Refusal tokens suggested by the model itself: the ``k`` first tokens whose
    probability rises most from harmless to harmful prompts (as strings)."""
    kw: dict[str, Any] = {"batch_size": batch_size, "system": system, "reuse_prefix": False}
    h = Runner(model, harmful, **kw).clean.logits
    l_ = Runner(model, harmless, **kw).clean.logits
    assert h is not None and l_ is not None
    ids = refusal_token_gap(h, l_, k)
    return tuple(model.tokenizer.decode([int(i)]) for i in ids)
