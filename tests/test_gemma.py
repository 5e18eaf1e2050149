"""The Gemma 3 270M alias: built offline from its package, with our turn-format template."""

from __future__ import annotations

import pytest
import torch

from cosmic_tl.models import CATALOGUE, ensure_alias, load_model, read_card
from cosmic_tl.templates import end_of_instruction, format_prompt

pytestmark = pytest.mark.slow  # de-quantising the GGUF takes about a minute


@pytest.fixture(scope="module")
def gemma():
    ensure_alias("gemma3-270m")
    return load_model("gemma3-270m", device="cpu")


def test_alias_is_in_the_catalogue_with_a_card():
    assert "gemma3-270m" in CATALOGUE and CATALOGUE["gemma3-270m"].build_seconds
    ensure_alias("gemma3-270m")
    card = read_card("gemma3-270m")
    assert "written by cosmic_tl" in card["chat_template"] and card["source"].endswith(".gguf")


def test_boots_as_gemma3_with_the_turn_format(gemma):
    assert (gemma.cfg.n_layers, gemma.cfg.d_model, gemma.cfg.d_vocab) == (18, 640, 262144)
    text = format_prompt(gemma.tokenizer, "Name a prime.")
    assert text == "<bos><start_of_turn>user\nName a prime.<end_of_turn>\n<start_of_turn>model\n"
    with_system = format_prompt(gemma.tokenizer, "Name a prime.", system="Be brief.")
    assert with_system.startswith("<bos><start_of_turn>user\nBe brief.\n\nName a prime.<end_of_turn>")
    # Gemma 3's vocabulary: <start_of_turn> 105, <end_of_turn> 106, "\n" 107, "model" 4368.
    eoi = end_of_instruction(gemma.tokenizer)
    assert eoi.token_ids == (106, 107, 105, 4368, 107)


def test_continues_text_sensibly(gemma):
    ids = gemma.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        top = gemma(ids)[0, -1].topk(5).indices.tolist()
    words = [gemma.tokenizer.decode([t]).strip().lower() for t in top]
    assert "paris" in words, words
