"""Directional ablation and activation addition, as maths and as TransformerLens hooks.

The maths (``unit``, ``ablate``, ``affine_ablate``, ``add``) are plain tensor
functions. :func:`intervention_hooks` is the one place that turns an
:class:`Intervention` into ``(hook_name, fn)`` pairs, and :func:`intervene` applies
them with ``model.hooks(...)``, which always removes them on exit::

    with intervene(model, Intervention("ablate", "lce", r)):
        logits = model(tokens, attention_mask=mask)
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

from cosmic_tl.config import Mode

Kind = Literal["ablate", "add"]
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
      attention/MLP output (``layer`` is ignored).
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

    def __post_init__(self) -> None:
        if self.kind not in ("ablate", "add"):
            raise ValueError(f"kind must be 'ablate' or 'add', not {self.kind!r}")
        if self.mode not in ("ace", "lce"):
            raise ValueError(f"mode must be 'ace' or 'lce', not {self.mode!r}")
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


def intervention_hooks(
    intervention: Intervention, n_layers: int, d_model: int
) -> list[tuple[str, HookFn]]:
    """The ``(hook_name, fn)`` list that applies ``intervention`` to a model."""
    iv = intervention
    if iv.direction.shape[0] != d_model:
        raise ValueError(f"direction has size {iv.direction.shape[0]}, the model's d_model is {d_model}")
    if iv.reference is not None and iv.reference.shape[0] != d_model:
        raise ValueError(f"reference has size {iv.reference.shape[0]}, d_model is {d_model}")
    if not 0 <= iv.layer < n_layers:
        raise ValueError(f"layer {iv.layer} out of range for a model with {n_layers} blocks")
    r = iv.direction.detach().float()
    r_hat = unit(r)
    at_layer = f"blocks.{iv.layer}.hook_resid_pre"
    if iv.mode == "lce" and iv.kind == "ablate":
        fn = partial(_apply, op=ablate, r_hat=r_hat)
        names = [
            f"blocks.{i}.{point}"
            for i in range(n_layers)
            for point in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")
        ]
        return [(name, fn) for name in names]
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
    hooks = [
        h for iv in interventions for h in intervention_hooks(iv, model.cfg.n_layers, model.cfg.d_model)
    ]
    with model.hooks(fwd_hooks=hooks):
        yield model
