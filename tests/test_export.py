"""Orthogonalised weights equal hook-based linear ablation."""

from __future__ import annotations

import torch
from conftest import HARMFUL

from cosmic_tl.export import orthogonalize, save_orthogonalized
from cosmic_tl.interventions import Intervention, intervene
from cosmic_tl.models import load_model
from cosmic_tl.templates import batches


def _logits(model, b):
    with torch.no_grad():
        return model(b.tokens, attention_mask=b.attention_mask)[:, -1]


def test_orthogonalized_logits_equal_hook_ablation(tiny_dir, tmp_path):
    hooked = load_model(tiny_dir, device="cpu")
    torch.manual_seed(3)
    r = torch.randn(hooked.cfg.d_model)
    b = batches(hooked.tokenizer, HARMFUL[:3], 3)[0]
    with intervene(hooked, Intervention("ablate", "lce", r)):
        expected = _logits(hooked, b)
    clean = _logits(hooked, b)
    edited = orthogonalize(load_model(tiny_dir, device="cpu"), r)
    got = _logits(edited, b)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert float((got - clean).abs().max()) > 1e-3  # the edit does something
    out = save_orthogonalized(load_model(tiny_dir, device="cpu"), r, tmp_path / "ortho")
    reloaded = load_model(out, device="cpu")
    torch.testing.assert_close(_logits(reloaded, b), expected, atol=1e-4, rtol=1e-4)


def test_tied_embeddings_are_untied(smollm2_dir, tmp_path):
    model = load_model(smollm2_dir, device="cpu")
    hf = model.original_model
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    r = torch.randn(model.cfg.d_model)
    before = hf.get_output_embeddings().weight.clone()
    orthogonalize(model, r)
    assert torch.equal(hf.get_output_embeddings().weight, before)
    r_hat = r / r.norm()
    assert float((hf.get_input_embeddings().weight @ r_hat).abs().max()) < 1e-4


def test_export_force_replaces_and_keeps_the_source_tokenizer(tiny_dir, tmp_path):
    """An existing directory is refused, or with force replaced with nothing left over; the
    tokenizer saved is the model directory's, not the bridge's (which prepends BOS)."""
    import pytest
    from transformers import AutoTokenizer

    model = load_model(tiny_dir, device="cpu")
    r = torch.randn(model.cfg.d_model)
    out = save_orthogonalized(model, r, tmp_path / "ortho")
    with pytest.raises(FileExistsError, match="--force"):
        save_orthogonalized(model, r, out)
    save_orthogonalized(load_model(tiny_dir, device="cpu"), r, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ortho"]
    source = AutoTokenizer.from_pretrained(tiny_dir)
    assert AutoTokenizer.from_pretrained(out)("hi")["input_ids"] == source("hi")["input_ids"]
