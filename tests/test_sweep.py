"""The fast engine against the straightforward reference loop, and its invariants."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HARMFUL, HARMLESS
from reference_impl import as_scores, reference_scores

from cosmic_tl.candidates import Candidates, compute_candidates
from cosmic_tl.config import SelectionSettings
from cosmic_tl.planner import score_candidates
from cosmic_tl.scoring import encode_refusal_tokens
from cosmic_tl.selection import NoCandidateError, select_cosmic, select_refusal_tokens, select_substring
from cosmic_tl.sweep import cellwise, sweep

TRAIN_H, TRAIN_L = HARMFUL, HARMLESS
VAL_H, VAL_L = HARMFUL[:4], HARMLESS[2:]
BOTH = ("refusal_tokens", "substring")


@pytest.fixture(scope="module")
def cands(tiny) -> Candidates:
    return compute_candidates(tiny, TRAIN_H, TRAIN_L, batch_size=4, progress=False)


@pytest.fixture(scope="module", params=["ace", "lce"])
def both(request, tiny, cands):
    mode = request.param
    ids = encode_refusal_tokens(tiny.tokenizer, ["I"])
    ref = reference_scores(
        tiny,
        cands.directions,
        cands.harmless_mean,
        TRAIN_H,
        TRAIN_L,
        VAL_H,
        VAL_L,
        mode=mode,
        token_ids=ids,
        batch_size=3,
    )
    full = score_candidates(
        tiny,
        cands,
        VAL_H,
        VAL_L,
        mode=mode,
        full=True,
        batch_size=3,
        progress=False,
        refusal_tokens=["I"],
        baseline=BOTH,
    )
    lazy = score_candidates(
        tiny,
        cands,
        VAL_H,
        VAL_L,
        mode=mode,
        full=False,
        batch_size=2,
        progress=False,
        refusal_tokens=["I"],
        baseline=BOTH,
    )
    return mode, ref, full, lazy


def test_generic_sweep_fills_only_called_cells():
    grids, filled = sweep(
        cellwise(lambda i, j: {"x": 10 * i + j}), [(0, 1), (1, 2)], (2, 3), progress=False
    )
    assert grids["x"][0, 1] == 1 and grids["x"][1, 2] == 12
    assert filled["x"].sum() == 2 and math.isnan(float(grids["x"][0, 0]))


def test_chunked_sweep_gives_chunks_and_the_same_grids():
    seen: list[int] = []

    def metric(cells):
        seen.append(len(cells))
        return [{"x": 10 * i + j, "y": float(i == j)} for i, j in cells]

    cells = [(i, j) for i in range(2) for j in range(3)]
    one, one_filled = sweep(metric, cells, (2, 3), progress=False)
    assert seen == [1] * 6
    seen.clear()
    four, four_filled = sweep(metric, cells, (2, 3), chunk=4, progress=False)
    assert seen == [4, 2]
    for name in ("x", "y"):
        assert torch.equal(one[name], four[name]) and torch.equal(one_filled[name], four_filled[name])
        assert bool(four_filled[name].all())
    assert four["x"][1, 2] == 12
    with pytest.raises(ValueError, match="returned 1 results for 2 cells"):
        sweep(lambda cs: [{"x": 0.0}], cells, (2, 3), chunk=2, progress=False)
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        sweep(metric, cells, (2, 3), chunk=0, progress=False)


def test_full_grids_match_reference_loop(both):
    _, ref, full, _ = both
    assert full.eval_layers == ref["eval_layers"]
    for name in ("S_abl", "S_add", "KL", "bypass", "induce", "KL_linear", "bypass_mode", "induce_mode"):
        torch.testing.assert_close(full.grids[name], ref["grids"][name], atol=1e-4, rtol=1e-4)
        assert bool(full.computed[name].all())


def test_lazy_cells_agree_and_picks_match(both, cands):
    mode, ref, full, lazy = both
    for name, grid in lazy.grids.items():
        done = lazy.computed[name]
        # bypass (and its KL) is needed only where induce passes, which may be nowhere.
        assert bool(done.any()) or name in ("bypass", "KL_linear")
        torch.testing.assert_close(grid[done], full.grids[name][done], atol=1e-6, rtol=1e-6)
    ref_scores = as_scores(ref, full, mode, cands.directions)
    # A generous KL threshold so that the tiny random model has survivors.
    for settings in (SelectionSettings(), SelectionSettings(kl_threshold=1e9)):
        outcomes = []
        for s in (ref_scores, full, lazy):
            try:
                outcomes.append(select_cosmic(s, settings).pick)
            except NoCandidateError as err:
                outcomes.append(("none", tuple(sorted(err.selection.counts.items()))))
        assert outcomes[0] == outcomes[1] == outcomes[2]
        picks = [select_refusal_tokens(s, settings).pick for s in (ref_scores, full, lazy)]
        assert picks[0] == picks[1] == picks[2]
        picks = [select_substring(s, settings).pick for s in (ref_scores, full, lazy)]
        assert picks[0] == picks[1] == picks[2]


def test_arditi_grids_are_the_same_in_both_modes(tiny, cands):
    """Arditi's baseline uses linear interventions whatever COSMIC's mode is."""
    kw = dict(full=True, batch_size=3, progress=False, refusal_tokens=["I"])
    ace = score_candidates(tiny, cands, VAL_H, VAL_L, mode="ace", **kw)
    lce = score_candidates(tiny, cands, VAL_H, VAL_L, mode="lce", **kw)
    for name in ("bypass", "induce"):
        torch.testing.assert_close(ace.grids[name], lce.grids[name], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ace.grids["KL_linear"], lce.grids["KL"], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ace.grids["KL"], lce.grids["KL"])  # the mode's KL does differ
    s = SelectionSettings(kl_threshold=1e9)
    assert select_refusal_tokens(ace, s).pick == select_refusal_tokens(lce, s).pick


def test_lazy_skips_work(both):
    _, _, full, lazy = both
    assert int(lazy.computed["KL"].sum()) < int(full.computed["KL"].sum())


def test_zero_direction_has_zero_kl_and_clean_scores(tiny, cands):
    zero = Candidates(
        torch.zeros_like(cands.directions),
        cands.harmful_mean,
        cands.harmful_mean,
        cands.eval_harmful,
        cands.eval_harmless,
        cands.positions,
        cands.position_labels,
        cands.eoi_token_ids,
        cands.model_id,
        1,
        1,
    )
    s = score_candidates(tiny, zero, VAL_H, VAL_L, full=True, progress=False, baseline=False)
    assert float(s.grids["KL"].abs().max()) < 1e-9
    # No intervention: harmful pool vs harmless baseline is the clean cosine everywhere.
    clean = s.clean["cos_harmful_harmless"]
    torch.testing.assert_close(s.grids["S_abl"], torch.full_like(s.grids["S_abl"], clean))
    torch.testing.assert_close(s.grids["S_add"], torch.full_like(s.grids["S_add"], clean))


@pytest.mark.parametrize("mode", ["ace", "lce"])
def test_unused_direction_keeps_ablation_score(tiny_dir, tmp_path, mode):
    """Ablating a residual coordinate that nothing writes to leaves every score clean."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cosmic_tl.models import load_model

    hf = LlamaForCausalLM.from_pretrained(tiny_dir)
    k = 5
    with torch.no_grad():
        hf.model.embed_tokens.weight[:, k] = 0
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight[k, :] = 0
            layer.mlp.down_proj.weight[k, :] = 0
    hf.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu")
    c = compute_candidates(model, TRAIN_H, TRAIN_L, batch_size=6, progress=False)
    assert float(c.harmless_mean[..., k].abs().max()) == 0.0
    e = torch.zeros(model.cfg.d_model, dtype=torch.float64)
    e[k] = 1.0
    unused = Candidates(
        e.expand_as(c.directions).clone(),
        c.harmful_mean,
        c.harmless_mean,
        c.eval_harmful,
        c.eval_harmless,
        c.positions,
        c.position_labels,
        c.eoi_token_ids,
        c.model_id,
        6,
        6,
    )
    s = score_candidates(
        model, unused, VAL_H, VAL_L, mode=mode, full=True, progress=False, baseline=False
    )
    clean = s.clean["cos_harmful_harmless"]
    torch.testing.assert_close(s.grids["S_abl"], torch.full_like(s.grids["S_abl"], clean))
    assert float(s.grids["KL"].abs().max()) < 1e-9


def test_few_layers_still_one_eval_layer(tiny, cands):
    s = score_candidates(tiny, cands, VAL_H, VAL_L, progress=False, baseline=False)
    assert tiny.cfg.n_layers < 10 and len(s.eval_layers) == 1


def test_bad_inputs(tiny, cands, smollm2):
    with pytest.raises(ValueError, match="validation sets"):
        score_candidates(tiny, cands, [], VAL_L, progress=False)
    with pytest.raises(ValueError, match="layers|computed on"):
        score_candidates(smollm2, cands, VAL_H, VAL_L, progress=False)
    with pytest.warns(UserWarning, match="encodes to"):
        encode_refusal_tokens(tiny.tokenizer, ["Zqxvjk Wpfh"])


def test_auto_refusal_tokens_are_strings_of_the_vocabulary(tiny, cands):
    from cosmic_tl.planner import suggest_refusal_tokens

    toks = suggest_refusal_tokens(tiny, VAL_H, VAL_L, k=2)
    assert len(toks) == 2 and all(isinstance(t, str) for t in toks)
    s = score_candidates(tiny, cands, VAL_H, VAL_L, refusal_tokens=["auto"], progress=False)
    assert s.refusal_tokens == toks
