"""The engine: shared prompt tokens, zero directions, and the plain clean forward."""

from __future__ import annotations

import pytest
import torch
from conftest import HARMFUL, HARMLESS

from cosmic_tl.candidates import Candidates, compute_candidates

VAL_H = HARMFUL[:4]


@pytest.fixture(scope="module")
def cands(tiny) -> Candidates:
    return compute_candidates(tiny, HARMFUL, HARMLESS, batch_size=4, progress=False)


def _interventions(d_model: int) -> list:
    from cosmic_tl.interventions import Intervention

    g = torch.Generator().manual_seed(1)
    r, ref = torch.randn(d_model, generator=g), torch.randn(d_model, generator=g)
    return [
        Intervention("ablate", "lce", r),
        Intervention("add", "lce", 2 * r, layer=1),
        Intervention("ablate", "ace", r, layer=2, reference=ref),
        Intervention("add", "ace", r, layer=1, reference=ref),
    ]


def test_shared_prompt_tokens_match_whole_prompts(tiny):
    from cosmic_tl.engine import Runner

    whole = Runner(tiny, VAL_H, batch_size=2, share_prefix=False)
    shared = Runner(tiny, VAL_H, batch_size=2)
    assert whole.shared_tokens == 0 and shared.shared_tokens > 10
    for iv in [None, *_interventions(tiny.cfg.d_model)]:
        f0, f1 = whole.flops, shared.flops
        a = whole.run(iv, eval_layers=(1, 3), logits=True)
        b = shared.run(iv, eval_layers=(1, 3), logits=True)
        assert a.eval_sums is not None and b.eval_sums is not None
        assert a.logits is not None and b.logits is not None
        scale = float(a.logits.abs().max())
        torch.testing.assert_close(b.logits, a.logits, atol=1e-5 * scale, rtol=0)
        torch.testing.assert_close(b.eval_sums[[1, 3]], a.eval_sums[[1, 3]], atol=1e-4, rtol=1e-5)
        assert shared.flops - f1 < whole.flops - f0


def test_shared_prompt_tokens_only_when_they_save_enough(tiny, monkeypatch):
    import importlib

    sweep_mod = importlib.import_module("cosmic_tl.engine")
    monkeypatch.setattr(sweep_mod, "_MIN_SHARED_SAVING", 0.99)
    assert sweep_mod.Runner(tiny, VAL_H, batch_size=2).shared_tokens == 0


def test_shared_prompt_tokens_fall_back_when_the_check_fails(tiny, monkeypatch):
    """If attention ignored the shared tokens' keys, the build-time check must notice."""
    import importlib

    sweep_mod = importlib.import_module("cosmic_tl.engine")

    def forgetful(self, k, v, layer_idx, *args, **kwargs):
        if self.past is None:
            self.kv[layer_idx] = (k, v)
        return k, v  # the shared tokens' keys and values are left out

    monkeypatch.setattr(sweep_mod._PrefixKV, "update", forgetful)
    with pytest.warns(UserWarning, match="differ by up to .* replaying whole prompts"):
        runner = sweep_mod.Runner(tiny, VAL_H, batch_size=2)
    assert runner.shared_tokens == 0
    whole = sweep_mod.Runner(tiny, VAL_H, batch_size=2, share_prefix=False)
    iv = _interventions(tiny.cfg.d_model)[0]
    a = whole.run(iv, eval_layers=(3,), logits=True).logits
    b = runner.run(iv, eval_layers=(3,), logits=True).logits
    assert a is not None and b is not None and torch.equal(a, b)


def test_zero_direction_needs_no_pass(tiny, cands):
    from cosmic_tl.engine import Runner
    from cosmic_tl.interventions import Intervention

    # Block 0's input at template tokens is the same embedding in every prompt.
    assert not bool(cands.directions[:, 0].any())
    runner = Runner(tiny, VAL_H, batch_size=2)
    zero = torch.zeros(tiny.cfg.d_model)
    out = runner.run(Intervention("ablate", "lce", zero), eval_layers=(3,), logits=True)
    assert runner.passes == 0 and out.logits is not None and runner.clean.logits is not None
    assert torch.equal(out.logits, runner.clean.logits)
    # ... and a full pass with the zero direction's (identity) hooks gives the same numbers.
    ones = Intervention("ablate", "lce", torch.full((tiny.cfg.d_model,), 1e-30))
    assert not ones.is_identity
    full = runner.run(ones, eval_layers=(3,), logits=True)
    assert runner.passes == 1 and full.logits is not None
    torch.testing.assert_close(full.logits, out.logits, atol=1e-4, rtol=1e-5)


def test_clean_logits_equal_the_runner_clean_pass_in_prompt_order(tiny):
    from cosmic_tl.engine import Runner, clean_logits

    prompts = [*VAL_H, "Hi", "Name one prime number, please, and say why it is prime."]
    plain = clean_logits(tiny, prompts, batch_size=2)
    runner = Runner(tiny, prompts, batch_size=3, share_prefix=False)
    assert runner.clean.logits is not None and plain.shape == runner.clean.logits.shape
    torch.testing.assert_close(plain, runner.clean.logits, atol=1e-4, rtol=1e-4)
    # in prompt order: each row equals that prompt run alone
    alone = clean_logits(tiny, [prompts[-1]], batch_size=1)
    torch.testing.assert_close(plain[-1:], alone, atol=1e-4, rtol=1e-4)


def test_run_many_equals_one_run_per_intervention(tiny, monkeypatch):
    """Many passes share one unembedding; each still gets its own logits and sums."""
    import importlib

    from cosmic_tl.interventions import Intervention

    engine = importlib.import_module("cosmic_tl.engine")
    monkeypatch.setattr(engine, "UNEMBED_ROWS", 5)  # several products, one split mid-pass
    prompts = [*VAL_H, "Hi", "Name one prime number, please."]
    ivs = [
        *_interventions(tiny.cfg.d_model),
        None,
        Intervention("ablate", "lce", torch.zeros(tiny.cfg.d_model)),  # no pass
    ]
    for runner in (
        engine.Runner(tiny, prompts, batch_size=4),
        engine.Runner(tiny, prompts, batch_size=4).resampled([5, 0, 0, 3]),
    ):
        many = runner.run_many(ivs, eval_layers=(1, 3), logits=True)
        assert len(many) == len(ivs)
        for iv, got in zip(ivs, many, strict=True):
            one = runner.run(iv, eval_layers=(1, 3), logits=True)
            assert got.logits is not None and one.logits is not None
            assert got.logits.shape == one.logits.shape == (len(runner.clean.logits), tiny.cfg.d_vocab)
            scale = float(one.logits.abs().max())
            torch.testing.assert_close(got.logits, one.logits, atol=1e-5 * scale, rtol=0)
            assert got.eval_sums is not None and one.eval_sums is not None
            torch.testing.assert_close(got.eval_sums, one.eval_sums, atol=1e-6, rtol=1e-6)
        # the interventions' logits differ from each other, so none was swapped
        assert not torch.allclose(many[0].logits, many[1].logits)
