"""Activation means and candidate directions: batching, padding, planted differences, I/O."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import HARMFUL, HARMLESS

from cosmic_tl.activations import mean_activations
from cosmic_tl.candidates import Candidates, IncompatibleError, compute_candidates
from cosmic_tl.templates import end_of_instruction


def test_batched_means_equal_unbatched(tiny):
    k = len(end_of_instruction(tiny.tokenizer).token_ids)
    whole = mean_activations(tiny, HARMFUL, n_eoi=k, batch_size=6, progress=False)
    single = mean_activations(tiny, HARMFUL, n_eoi=k, batch_size=1, progress=False)
    torch.testing.assert_close(whole.eoi, single.eoi, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole.eval, single.eval, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_a_prompt(tiny):
    """A short prompt's activations are the same alone and padded beside a long one."""
    k = len(end_of_instruction(tiny.tokenizer).token_ids)
    short, long_ = "Hi", "Tell me a very long story about " + "dragons and castles " * 20
    alone = mean_activations(tiny, [short], n_eoi=k, batch_size=1, progress=False)
    both = mean_activations(tiny, [short, long_], n_eoi=k, batch_size=2, progress=False)
    other = mean_activations(tiny, [long_], n_eoi=k, batch_size=1, progress=False)
    torch.testing.assert_close(2 * both.eoi - other.eoi, alone.eoi, atol=1e-4, rtol=1e-4)


def test_candidates_recover_planted_difference(tiny):
    """Plant a vector into the harmful prompts' residual stream: r recovers it."""
    d, planted_layer = tiny.cfg.d_model, 2
    torch.manual_seed(1)
    v = torch.randn(d)
    base = compute_candidates(tiny, HARMLESS, HARMLESS, batch_size=6, progress=False)
    assert float(base.directions.abs().max()) < 1e-9  # same prompts: no difference

    def plant(act, hook):
        return act + v

    with tiny.hooks(fwd_hooks=[(f"blocks.{planted_layer}.hook_resid_pre", plant)]):
        harmful = mean_activations(
            tiny, HARMLESS, n_eoi=len(base.positions), progress=False, batch_size=6
        )
    r = harmful.eoi[:, planted_layer] - base.harmless_mean[:, planted_layer]
    torch.testing.assert_close(r, v.double().expand_as(r), atol=1e-4, rtol=1e-4)


def test_shapes_and_round_trip(tiny, tmp_path):
    c = compute_candidates(tiny, HARMFUL, HARMLESS, batch_size=4, progress=False)
    k = len(end_of_instruction(tiny.tokenizer).token_ids)
    assert c.directions.shape == (k, tiny.cfg.n_layers, tiny.cfg.d_model)
    torch.testing.assert_close(c.directions, c.harmful_mean - c.harmless_mean)
    c.save(tmp_path / "cands")
    back = Candidates.load(tmp_path / "cands", tiny)
    for name in ("directions", "harmful_mean", "harmless_mean", "eval_harmful", "eval_harmless"):
        assert torch.equal(getattr(back, name), getattr(c, name))
    assert back.positions == c.positions and back.position_labels == c.position_labels
    assert back.model_id == c.model_id


def test_load_rejects_other_model_and_bad_files(tiny, smollm2, tmp_path):
    c = compute_candidates(tiny, HARMFUL[:2], HARMLESS[:2], batch_size=2, progress=False)
    c.save(tmp_path / "c")
    with pytest.raises(IncompatibleError, match="layers"):
        Candidates.load(tmp_path / "c", smollm2)
    meta = json.loads((tmp_path / "c.json").read_text())
    meta["tensors"]["directions"][2] += 1
    (tmp_path / "c.json").write_text(json.dumps(meta))
    with pytest.raises(IncompatibleError, match="do not belong together"):
        Candidates.load(tmp_path / "c")


def test_smollm2_candidates_and_ablation(smollm2):
    """The issue's acceptance check on the real model, small."""
    from cosmic_tl.interventions import Intervention, intervene, unit
    from cosmic_tl.prompts import load_bundled
    from cosmic_tl.templates import batches

    harmful, harmless = load_bundled("harmful", "train")[:8], load_bundled("harmless", "train")[:8]
    c = compute_candidates(smollm2, harmful, harmless, batch_size=8, progress=False)
    assert c.directions.shape == (6, 30, 576)
    r = c.direction(-1, 12).float()
    names = [
        f"blocks.{i}.{p}" for i in range(30) for p in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")
    ]
    worst = []

    def check(act, hook):
        worst.append(float(((act @ unit(r)).abs() / act.norm(dim=-1).clamp_min(1e-6)).max()))

    b = batches(smollm2.tokenizer, harmful[:4], 4)[0]
    with (
        torch.no_grad(),
        intervene(smollm2, Intervention("ablate", "lce", r)),
        smollm2.hooks(fwd_hooks=[(n, check) for n in names]),
    ):
        smollm2(b.tokens, attention_mask=b.attention_mask)
    assert len(worst) == len(names) and max(worst) < 1e-4
