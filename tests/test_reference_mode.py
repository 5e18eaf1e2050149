"""Reference mode's reading of LCE S_add, against an independent plain Hugging Face loop."""

from __future__ import annotations

import pytest
import torch
from conftest import HARMFUL, HARMLESS
from transformers import LlamaForCausalLM

from cosmic_tl.candidates import compute_candidates
from cosmic_tl.config import SelectionSettings
from cosmic_tl.planner import score_candidates
from cosmic_tl.templates import chat_prompts

VAL_H, VAL_L = HARMFUL[:3], HARMLESS[:3]


def _pooled_hf(hf, ids_list, layers, *, add_at=None, vec=None, inplace=True):
    """Mean over prompts and ``layers`` of HF ``hidden_states[1:]`` at the last token,
    normalised; with ``add_at`` the addition hook of the published code (in place) or a
    copying one."""
    handles = []
    if add_at is not None:

        def pre(module, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            if inplace:
                hs += vec  # what the published hook does
                return None
            if args:
                return (hs + vec, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hs + vec}

        handles.append(hf.model.layers[add_at].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        rows = []
        with torch.no_grad():
            for ids in ids_list:
                out = hf(torch.tensor([ids]), output_hidden_states=True)
                rows.append(torch.stack([h[0, -1] for h in out.hidden_states[1:]]).double())
    finally:
        for h in handles:
            h.remove()
    v = torch.stack(rows)[:, list(layers)].mean((0, 1))
    return v / v.norm()


@pytest.fixture(scope="module")
def lce_scores(tiny, tiny_dir):
    cands = compute_candidates(tiny, HARMFUL, HARMLESS, batch_size=3, progress=False)
    settings = SelectionSettings(eval_layer_fraction=1.0)  # every layer: l - 1 is always one
    kw = dict(mode="lce", full=True, batch_size=1, baseline=False, progress=False, settings=settings)
    published = score_candidates(tiny, cands, VAL_H, VAL_L, inplace_addition=True, **kw)
    default = score_candidates(tiny, cands, VAL_H, VAL_L, **kw)
    hf = LlamaForCausalLM.from_pretrained(tiny_dir).eval()
    return cands, published, default, hf


def test_inplace_reading_equals_a_plain_hf_inplace_hook(lce_scores, tiny):
    cands, published, default, hf = lce_scores
    layers = published.eval_layers
    assert set(layers) == set(range(tiny.cfg.n_layers))
    harmful = chat_prompts(tiny.tokenizer, VAL_H).ids
    harmless = chat_prompts(tiny.tokenizer, VAL_L).ids
    b_harmful = _pooled_hf(hf, harmful, layers)
    checked = 0
    for i in range(len(cands.positions)):
        for layer in range(1, tiny.cfg.n_layers):
            r = cands.directions[i, layer].float()
            if float(r.norm()) == 0.0:
                continue
            inplace = _pooled_hf(hf, harmless, layers, add_at=layer, vec=r, inplace=True)
            copied = _pooled_hf(hf, harmless, layers, add_at=layer, vec=r, inplace=False)
            want_pub, want_def = float(inplace @ b_harmful), float(copied @ b_harmful)
            assert float(published.grids["S_add"][i, layer]) == pytest.approx(want_pub, abs=1e-4)
            assert float(default.grids["S_add"][i, layer]) == pytest.approx(want_def, abs=1e-4)
            checked += 1
    assert checked >= 3
    # The two readings differ where l - 1 is an evaluation layer, and nothing else changes.
    assert not torch.allclose(published.grids["S_add"][:, 1:], default.grids["S_add"][:, 1:])
    torch.testing.assert_close(published.grids["S_abl"], default.grids["S_abl"])
    torch.testing.assert_close(published.grids["KL"], default.grids["KL"])


def test_reference_sampling_in_a_run_is_one_stream_in_the_published_order(tmp_path):
    import json
    import random

    from cosmic_tl.config import preset
    from cosmic_tl.pipeline import load_run_prompts

    files = {}
    for name in ("harmful_train", "harmless_train", "harmful_val", "harmless_val"):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps([f"{name} prompt {k}" for k in range(20)]))
        files[name] = str(path)
    cfg = preset("reference", n_train=5, n_val=3, n_test=2, **files)
    got = load_run_prompts(cfg)
    stream = random.Random(cfg.seed)
    for name, n in (
        ("harmful_train", 5),
        ("harmless_train", 5),
        ("harmful_val", 3),
        ("harmless_val", 3),
    ):
        assert got[name] == stream.sample([f"{name} prompt {k}" for k in range(20)], n)
    per_set = load_run_prompts(cfg.replace(sampling="per_set"))
    assert per_set["harmless_train"] != got["harmless_train"]


def test_reference_preset_runs_end_to_end(tiny_dir, tmp_path):
    from cosmic_tl import cli

    out = tmp_path / "ref"
    args = ["run", "--preset", "reference", "--model", str(tiny_dir), "--out", str(out), "--quiet"]
    args += ["--n-train", "4", "--n-val", "3", "--n-test", "2", "--max-new-tokens", "2", "--mode", "lce"]
    args += ["--kl-threshold", "1e9", "--batch-size", "4"]
    assert cli.main(args) == 0
    import json

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["inplace_addition"] and cfg["sampling"] == "reference" and cfg["prompt_format"] == "auto"
    assert (out / "report.html").exists()
