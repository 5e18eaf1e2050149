"""The metrics the planner sweeps: one candidate's pass scores and KL, on the engine.

Each metric runs one pass of the :class:`~cosmic_tl.engine.Runner` under a candidate's
intervention and turns what it returns into grid values with the pure maths of
:mod:`cosmic_tl.scoring` (cosine of pooled activations, refusal log-odds, KL).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from cosmic_tl.candidates import Candidates
from cosmic_tl.config import Mode, Placement
from cosmic_tl.engine import Runner
from cosmic_tl.interventions import Intervention, Kind
from cosmic_tl.scoring import cosine, kl_divergence, pooled, refusal_score
from cosmic_tl.sweep import Cell


@dataclass
class Context:
    """What every metric of one scoring run reads: candidates, runners, baseline vectors."""

    candidates: Candidates
    mode: Mode
    alpha: float
    eval_layers: tuple[int, ...]
    harmful: Runner
    harmless: Runner
    b_harmful: Tensor
    b_harmless: Tensor
    token_ids: tuple[int, ...]
    inplace_addition: bool = False
    placement: Placement = "residual"

    def runner(self, kind: Kind) -> Runner:
        """The prompts a pass of ``kind`` runs on: ablation on harmful, addition on harmless."""
        return self.harmful if kind == "ablate" else self.harmless

    def intervention(self, kind: Kind, mode: Mode, i: int, layer: int) -> Intervention:
        p = self.candidates.positions[i]
        return Intervention(
            kind,
            mode,
            self.candidates.direction(p, layer).float(),
            layer=layer,
            reference=self.candidates.reference(p, layer).float(),
            alpha=self.alpha,
            placement=self.placement,
        )


# What each pass grid needs: (intervention kind, whose interventions, what is read).
# "mode": the run's mode (COSMIC and the substring method); "lce": linear interventions,
# which Arditi's baseline uses in every mode. In LCE mode both are the same passes.
OUTPUTS: dict[str, tuple[Kind, str, str]] = {
    "S_abl": ("ablate", "mode", "cos"),
    "S_add": ("add", "mode", "cos"),
    "bypass_mode": ("ablate", "mode", "tokens"),
    "induce_mode": ("add", "mode", "tokens"),
    "bypass": ("ablate", "lce", "tokens"),
    "induce": ("add", "lce", "tokens"),
}
# The grids each method reads.
GRIDS: dict[str, tuple[str, ...]] = {
    "cosmic": ("S_abl", "S_add", "KL"),
    "refusal_tokens": ("bypass", "induce", "KL_linear"),
    "substring": ("bypass_mode", "induce_mode", "KL"),
}


def pass_metrics(
    ctx: Context,
    cells: Sequence[Cell],
    *,
    kind: Kind,
    mode: Mode,
    cos: bool,
    tokens: bool,
    wanted: Collection[str],
) -> list[dict[str, float]]:
    """One pass per candidate cell ``(i, layer)``: ablation on harmful prompts
    (``S_abl``, the bypass scores) or addition on harmless prompts (``S_add``, the
    induce scores), with ``mode``'s interventions; fills every ``wanted`` grid that
    pass gives. The cells' logits share one unembedding
    (:meth:`~cosmic_tl.engine.Runner.run_many`)."""
    target = ctx.b_harmless if kind == "ablate" else ctx.b_harmful
    results = ctx.runner(kind).run_many(
        [ctx.intervention(kind, mode, i, layer) for i, layer in cells],
        eval_layers=ctx.eval_layers if cos else (),
        logits=tokens,
    )
    names = [
        (name, what)
        for name, (k, whose, what) in OUTPUTS.items()
        if name in wanted and k == kind and (ctx.mode if whose == "mode" else "lce") == mode
    ]
    out: list[dict[str, float]] = []
    for (i, layer), res in zip(cells, results, strict=True):
        values: dict[str, float] = {}
        for name, what in names:
            if what == "cos" and cos:
                assert res.eval_sums is not None
                sums = res.eval_sums
                if (
                    ctx.inplace_addition
                    and (kind, mode) == ("add", "lce")
                    and layer - 1 in ctx.eval_layers
                ):
                    sums = _published_inplace_reading(ctx, sums, i, layer)
                values[name] = cosine(pooled(sums, ctx.eval_layers), target)
            elif what == "tokens" and tokens:
                assert res.logits is not None
                values[name] = float(refusal_score(res.logits, ctx.token_ids).mean())
        out.append(values)
    return out


def _published_inplace_reading(
    ctx: Context, sums: Float[Tensor, "layer d_model"], i: int, layer: int
) -> Float[Tensor, "layer d_model"]:
    """Evaluation sums as the published linear-addition hook reads them (§4d).

    That hook adds ``α r`` to block ``layer``'s input tensor in place, and Hugging Face
    keeps that same tensor as the evaluation activation of layer ``layer - 1``, so every
    prompt's activation there carries ``+α r`` too.
    """
    assert ctx.harmless.clean.logits is not None
    n_prompts = ctx.harmless.clean.logits.shape[0]
    r = ctx.candidates.directions[i, layer].double()
    out = sums.clone()
    out[layer - 1] += n_prompts * ctx.alpha * r.to(out.device)
    return out


def kl_metric(
    ctx: Context, i: int, layer: int, *, mode: Mode, wanted: Collection[str]
) -> dict[str, float]:
    """KL(P_clean ‖ P_ablated) of the next token on harmless prompts, ablating with
    ``mode``'s interventions (``KL``: the run's mode; ``KL_linear``: linear)."""
    res = ctx.harmless.run(ctx.intervention("ablate", mode, i, layer), eval_layers=(), logits=True)
    assert res.logits is not None and ctx.harmless.clean.logits is not None
    value = float(kl_divergence(ctx.harmless.clean.logits, res.logits).mean())
    names = [n for n in ("KL", "KL_linear") if n in wanted]
    return {n: value for n in names if (ctx.mode if n == "KL" else "lce") == mode}
