"""Directional ablation and activation addition, as maths and as TransformerLens hooks.

The maths (``unit``, ``ablate``, ``affine_ablate``, ``add``) are plain tensor
functions. :func:`intervention_hooks` is the one place that turns an
:class:`Intervention` into ``(hook_name, fn)`` pairs, choosing the names from the
model's hook points (:class:`HookPoints`), and :func:`intervene` applies them with
``model.hooks(...)``, which always removes them on exit::

    with intervene(model, Intervention("ablate", "lce", r)):
        logits = model(tokens, attention_mask=mask)

Where LCE ablation edits the attention and MLP outputs is its ``placement``. On
blocks with post-sub-layer norms (Gemma 2 and 3 add ``post_norm(attn(x))`` and
``post_norm(mlp(x))`` to the residual stream) the two placements differ:

- ``"residual"`` (default): what the block adds to the residual stream, after the
  post-norms (the bridge's ``hook_attn_out`` / ``hook_mlp_out``), so every block's
  input and output is orthogonal to r̂;
- ``"published"``: the attention and MLP modules' own outputs, before any post-norm
  (``attn.hook_out`` / ``mlp.hook_out``), as the published code hooks them; the
  norm's elementwise scale can then put some r̂ back into the residual stream.

Without post-norms (Llama, Qwen2, Mistral, Phi-3) both name the same hook points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from cosmic_tl.activations import check_hook_points
from cosmic_tl.config import Mode, Placement
from cosmic_tl.models.boot import model_id

Kind = Literal["ablate", "add"]
PLACEMENTS: tuple[Placement, ...] = ("residual", "published")
HookFn = Callable[[Tensor, Any], Tensor]

EPS = 1e-8


def unit(r: Float[Tensor, " d_model"]) -> Float[Tensor, " d_model"]:
    """``r / (‖r‖ + 1e-8)``, as the reference normalises directions."""
    return r / (r.norm() + EPS)


def ablate(
    v: Float[Tensor, "... d_model"], r_hat: Float[Tensor, " d_model"]
) -> Float[Tensor, "... d_model"]:
    """Linear directional ablation: ``v − (v·r̂) r̂``."""
    return v - (v @ r_hat).unsqueeze(-1) * r_hat


def affine_ablate(
    v: Float[Tensor, "... d_model"],
    r_hat: Float[Tensor, " d_model"],
    reference: Float[Tensor, " d_model"],
) -> Float[Tensor, "... d_model"]:
    """Affine ablation: ``v − (v·r̂) r̂ + (μ⁻·r̂) r̂`` (projection moved to the reference's)."""
    return ablate(v, r_hat) + (reference @ r_hat) * r_hat


def add(
    v: Float[Tensor, "... d_model"], r: Float[Tensor, " d_model"], alpha: float = 1.0
) -> Float[Tensor, "... d_model"]:
    """Activation addition: ``v + α r``."""
    return v + alpha * r


def affine_add(
    v: Float[Tensor, "... d_model"],
    r: Float[Tensor, " d_model"],
    reference: Float[Tensor, " d_model"],
    alpha: float = 1.0,
) -> Float[Tensor, "... d_model"]:
    """Affine addition: affine ablation followed by ``+ α r``."""
    return add(affine_ablate(v, unit(r), reference), r, alpha)


@dataclass(frozen=True)
class Intervention:
    """What to do to the residual stream.

    - ``("ablate", "lce")``: linear ablation at every block input and every
      attention/MLP output (``layer`` is ignored); ``placement`` says which
      attention/MLP outputs (see the module docstring): ``"residual"`` what is added
      to the residual stream, ``"published"`` the sub-layers' outputs before any
      post-norm. Other kinds and modes ignore it.
    - ``("add", "lce")``: ``+ α r`` at the input of block ``layer``.
    - ``("ablate", "ace")``: affine ablation at the input of block ``layer``.
    - ``("add", "ace")``: affine ablation then ``+ α r`` at the input of block ``layer``.

    ``reference`` (the harmless mean at the candidate's position and layer) is
    required in ACE mode.
    """

    kind: Kind
    mode: Mode
    # Plain ``Tensor`` so that __post_init__ can explain a wrong shape or dtype itself.
    direction: Tensor  # [d_model]
    layer: int = 0
    reference: Tensor | None = None  # [d_model]
    alpha: float = 1.0
    placement: Placement = "residual"

    def __post_init__(self) -> None:
        if self.kind not in ("ablate", "add"):
            raise ValueError(f"kind must be 'ablate' or 'add', not {self.kind!r}")
        if self.mode not in ("ace", "lce"):
            raise ValueError(f"mode must be 'ace' or 'lce', not {self.mode!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be 'residual' or 'published', not {self.placement!r}")
        for name, t in (("direction", self.direction), ("reference", self.reference)):
            if t is None:
                continue
            if not isinstance(t, Tensor) or t.ndim != 1 or not t.is_floating_point():
                raise ValueError(
                    f"{name} must be a 1-D floating-point tensor [d_model], got "
                    f"{getattr(t, 'dtype', type(t))} of shape {tuple(getattr(t, 'shape', ()))}"
                )
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, not {self.alpha!r}")
        if self.mode == "ace" and self.reference is None:
            raise ValueError("ACE (affine) interventions need the harmless mean as reference")

    @property
    def is_identity(self) -> bool:
        """True for a zero direction: every kind and mode then leaves activations as they are
        (``r̂ = r / (‖r‖ + 1e-8)`` is zero too, so nothing is projected out or added)."""
        return not bool(self.direction.any())

    @property
    def start_layer(self) -> int:
        """The first block whose input this intervention changes."""
        return 0 if (self.kind, self.mode) == ("ablate", "lce") else self.layer


def _apply(act: Tensor, hook: Any, *, op: Callable[..., Tensor], **vectors: Tensor) -> Tensor:
    """Hook body: run ``op`` in float32 or better, on the activation's device."""
    dtype = act.dtype if act.dtype in (torch.float32, torch.float64) else torch.float32
    moved = {k: v.to(device=act.device, dtype=dtype) for k, v in vectors.items()}
    return op(act.to(dtype), **moved).to(act.dtype)


# Per block, the attention and MLP outputs that LCE ablation edits at each placement.
# TransformerBridge points hook_attn_out / hook_mlp_out at what the block adds to the
# residual stream: after ln1_post / ln2_post where a block has them (Gemma 2 and 3),
# the scaled contribution on Granite's blocks, else the same hook points as
# attn.hook_out / mlp.hook_out.
_SUBLAYER_OUTPUTS: dict[Placement, tuple[str, str]] = {
    "residual": ("hook_attn_out", "hook_mlp_out"),
    "published": ("attn.hook_out", "mlp.hook_out"),
}


# The bridge's post-sub-layer norms (Gemma 2 and 3: post_attention_layernorm and
# post_feedforward_layernorm).
_POST_NORMS = ("ln1_post.hook_out", "ln2_post.hook_out")


@dataclass(frozen=True)
class HookPoints:
    """The hook points a model offers, which :func:`intervention_hooks` chooses from.

    ``names`` are the model's ``hook_dict`` keys; ``None`` (built from the sizes
    alone) assumes a TransformerBridge's standard names without checking them.
    ``model`` names the model in errors. ::

        points = HookPoints.of(model)
        points.ablation_names("published")[:3]
        # ['blocks.0.hook_resid_pre', 'blocks.0.attn.hook_out', 'blocks.0.mlp.hook_out']
    """

    n_layers: int
    d_model: int
    names: frozenset[str] | None = None
    model: str = "the model"

    @classmethod
    def of(cls, model: Any) -> HookPoints:
        """The hook points of a booted model (a ``TransformerBridge``)."""
        return cls(
            int(model.cfg.n_layers), int(model.cfg.d_model), frozenset(model.hook_dict), model_id(model)
        )

    @property
    def has_post_norms(self) -> bool:
        """Whether blocks norm their sub-layers' outputs before adding them (Gemma 2 and 3),
        so that the two LCE ablation placements differ (``False`` when unknown)."""
        return any(n.endswith(_POST_NORMS) for n in self.names or ())

    def ablation_names(self, placement: Placement = "residual") -> list[str]:
        """Where LCE ablation applies: every block's input and its attention and MLP outputs."""
        points = ("hook_resid_pre", *_SUBLAYER_OUTPUTS[placement])
        return self.require(
            [f"blocks.{i}.{p}" for i in range(self.n_layers) for p in points],
            f"LCE ablation with placement={placement!r}",
        )

    def require(self, names: list[str], purpose: str) -> list[str]:
        """``names``, or a ``ValueError`` naming the model and the hook points it lacks."""
        return check_hook_points(self.model, self.names, names, purpose)


def intervention_hooks(
    intervention: Intervention, model: Any, d_model: int | None = None
) -> list[tuple[str, HookFn]]:
    """The ``(hook_name, fn)`` list that applies ``intervention`` to ``model``.

    ``model`` is the booted model or its :class:`HookPoints`; the hook names are
    chosen from the hook points it offers (a missing one is a ``ValueError`` that
    names it). The older form ``intervention_hooks(iv, n_layers, d_model)`` still
    works and assumes the bridge's standard names.
    """
    if d_model is not None:
        points = HookPoints(int(model), d_model)
    else:
        points = model if isinstance(model, HookPoints) else HookPoints.of(model)
    iv, n_layers = intervention, points.n_layers
    if iv.direction.shape[0] != points.d_model:
        raise ValueError(
            f"direction has size {iv.direction.shape[0]}, the model's d_model is {points.d_model}"
        )
    if iv.reference is not None and iv.reference.shape[0] != points.d_model:
        raise ValueError(f"reference has size {iv.reference.shape[0]}, d_model is {points.d_model}")
    if not 0 <= iv.layer < n_layers:
        raise ValueError(f"layer {iv.layer} out of range for a model with {n_layers} blocks")
    r = iv.direction.detach().float()
    r_hat = unit(r)
    if iv.mode == "lce" and iv.kind == "ablate":
        fn = partial(_apply, op=ablate, r_hat=r_hat)
        return [(name, fn) for name in points.ablation_names(iv.placement)]
    [at_layer] = points.require(
        [f"blocks.{iv.layer}.hook_resid_pre"], f"{iv.mode.upper()} {iv.kind} at block {iv.layer}"
    )
    if iv.mode == "lce":
        return [(at_layer, partial(_apply, op=partial(add, alpha=iv.alpha), r=r))]
    assert iv.reference is not None
    ref = iv.reference.detach().float()
    if iv.kind == "ablate":
        return [(at_layer, partial(_apply, op=affine_ablate, r_hat=r_hat, reference=ref))]
    return [(at_layer, partial(_apply, op=partial(affine_add, alpha=iv.alpha), r=r, reference=ref))]


@contextmanager
def intervene(model: Any, *interventions: Intervention) -> Iterator[Any]:
    """Apply interventions to every forward pass (and ``generate``) inside the block."""
    points = HookPoints.of(model)
    hooks = [h for iv in interventions for h in intervention_hooks(iv, points)]
    with model.hooks(fwd_hooks=hooks):
        yield model


Rows = tuple[Intervention | None, int]  # an intervention (None: none) and how many batch rows


def _on_rows(act: Tensor, hook: Any, *, parts: tuple[tuple[int, HookFn | None], ...]) -> Tensor:
    """Hook body: each consecutive block of batch rows through its own hook (or unchanged)."""
    total = sum(n for n, _ in parts)
    if act.shape[0] != total:
        raise ValueError(f"{hook.name}: a batch of {act.shape[0]} rows, the row groups cover {total}")
    pieces, start = [], 0
    for n, fn in parts:
        rows = act[start : start + n]
        pieces.append(rows if fn is None else fn(rows, hook))
        start += n
    return torch.cat(pieces)


def row_hooks(groups: list[Rows], model: Any) -> list[tuple[str, HookFn]]:
    """One hook list that applies a different intervention to each block of batch rows.

    ``groups`` is ``[(intervention or None, n_rows), ...]`` in batch order: the first
    ``n_rows`` rows get the first intervention, and so on. Each block goes through
    exactly the hooks :func:`intervention_hooks` builds for its intervention, so a row
    sees what it would see in a batch of its own; this stacks candidates along the batch
    to generate for many at once.
    """
    points = model if isinstance(model, HookPoints) else HookPoints.of(model)
    by_name: dict[str, list[tuple[int, HookFn | None]]] = {}
    for g, (iv, n) in enumerate(groups):
        if n < 0:
            raise ValueError(f"row group {g} has {n} rows")
        hooks = intervention_hooks(iv, points) if iv is not None and not iv.is_identity else []
        for name, fn in hooks:
            by_name.setdefault(name, [(m, None) for _, m in groups])[g] = (n, fn)
    return [(name, partial(_on_rows, parts=tuple(parts))) for name, parts in by_name.items()]


@contextmanager
def intervene_rows(model: Any, groups: list[Rows]) -> Iterator[Any]:
    """Apply :func:`row_hooks` to every forward pass (and ``generate``) inside the block."""
    with model.hooks(fwd_hooks=row_hooks(groups, model)):
        yield model
