"""Interventions: invariants of the maths, and the hooks on a real forward pass."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from beartype import beartype
from conftest import HARMFUL
from jaxtyping import Float, TypeCheckError, jaxtyped
from torch import Tensor

from cosmic_tl.interventions import (
    HookPoints,
    Intervention,
    ablate,
    affine_ablate,
    affine_add,
    intervene,
    intervention_hooks,
    unit,
)
from cosmic_tl.templates import batches

torch.manual_seed(0)
D = 16
V = torch.randn(5, 7, D, dtype=torch.float64)
R = torch.randn(D, dtype=torch.float64)
REF = torch.randn(D, dtype=torch.float64)


def test_ablation_removes_projection():
    out = ablate(V, unit(R))
    # unit() divides by ‖r‖ + 1e-8 as the reference does, so r̂ is unit only to ~1e-8.
    assert float((out @ unit(R)).abs().max()) < 1e-7
    assert float((out @ (R / R.norm())).abs().max()) < 1e-7
    # and leaves the orthogonal part alone
    torch.testing.assert_close(out - V, -(V @ unit(R)).unsqueeze(-1) * unit(R))


def test_affine_ablation_sets_projection_to_reference():
    out = affine_ablate(V, unit(R), REF)
    torch.testing.assert_close(
        out @ unit(R), torch.full((5, 7), float(REF @ unit(R)), dtype=torch.float64)
    )


def test_affine_addition_moves_projection_by_alpha_norm():
    for alpha in (1.0, 2.5):
        out = affine_add(V, R, REF, alpha)
        expected = float(REF @ unit(R)) + alpha * float(R.norm())
        torch.testing.assert_close(out @ unit(R), torch.full((5, 7), expected, dtype=torch.float64))


def test_batched_equals_unbatched():
    whole = affine_ablate(V, unit(R), REF)
    for b in range(V.shape[0]):
        torch.testing.assert_close(whole[b], affine_ablate(V[b], unit(R), REF))


def test_shapes_are_checked_at_runtime():
    checked = jaxtyped(typechecker=beartype)(ablate)
    with pytest.raises(TypeCheckError):
        checked(V, torch.randn(D + 1, dtype=torch.float64))
    out: Float[Tensor, "5 7 16"] = checked(V, unit(R))
    assert out.shape == V.shape


def test_bad_direction_rejected():
    with pytest.raises(ValueError, match="1-D floating-point"):
        Intervention("ablate", "lce", torch.ones(D, dtype=torch.long))
    with pytest.raises(ValueError, match="1-D floating-point"):
        Intervention("ablate", "lce", torch.ones(2, D))
    with pytest.raises(ValueError, match="reference"):
        Intervention("ablate", "ace", torch.ones(D))
    with pytest.raises(ValueError, match="d_model"):
        intervention_hooks(Intervention("ablate", "lce", torch.ones(D)), HookPoints(4, D + 3))
    with pytest.raises(ValueError, match="out of range"):
        intervention_hooks(Intervention("add", "lce", torch.ones(D), layer=9), HookPoints(4, D))


def _capture(model, names, iv):
    store: dict[str, Tensor] = {}

    def grab(act, hook, name):
        store[name] = act.detach().clone()

    hooks = [(n, partial(grab, name=n)) for n in names]
    b = batches(model.tokenizer, HARMFUL[:3], 3)[0]
    with torch.no_grad(), intervene(model, iv), model.hooks(fwd_hooks=hooks):
        model(b.tokens, attention_mask=b.attention_mask)
    return store


def test_linear_ablation_hooks_on_model(tiny):
    n, d = tiny.cfg.n_layers, tiny.cfg.d_model
    r = torch.randn(d)
    names = [
        f"blocks.{i}.{p}"
        for i in range(n)
        for p in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
    ]
    store = _capture(tiny, names, Intervention("ablate", "lce", r))
    for name, act in store.items():
        rel = (act @ unit(r)).abs().max() / act.norm(dim=-1).max()
        assert float(rel) < 1e-4, name
    # hooks are gone after the context exits
    assert all(len(hp.fwd_hooks) == 0 for hp in tiny.hook_dict.values() if hasattr(hp, "fwd_hooks"))


def test_affine_hooks_on_model(tiny):
    d = tiny.cfg.d_model
    r, ref = torch.randn(d), torch.randn(d)
    name = "blocks.2.hook_resid_pre"
    abl = _capture(tiny, [name], Intervention("ablate", "ace", r, 2, ref))[name]
    torch.testing.assert_close(
        abl @ unit(r), torch.full(abl.shape[:2], float(ref @ unit(r))), atol=1e-4, rtol=1e-4
    )
    add = _capture(tiny, [name], Intervention("add", "ace", r, 2, ref, alpha=2.0))[name]
    expected = float(ref @ unit(r)) + 2.0 * float(r.norm())
    torch.testing.assert_close(add @ unit(r), torch.full(add.shape[:2], expected), atol=1e-3, rtol=1e-4)
    lin = _capture(tiny, [name], Intervention("add", "lce", r, 2))[name]
    clean = _capture(tiny, [name], Intervention("add", "lce", torch.zeros(d), 2))[name]
    torch.testing.assert_close(lin - clean, r.expand_as(lin), atol=1e-4, rtol=1e-4)
