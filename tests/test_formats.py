"""The published prompt formats: exact text, token ids and EOI tokens on a simulated tokenizer.

Each family's tokenizer is simulated by SmolLM2's with the family's marker strings added
as special tokens, so every id below is derived by hand: new markers take the ids
``len(vocab), len(vocab) + 1, ...`` in the order added; SmolLM2 already holds the ChatML
markers as ``<|im_start|>`` = 1 and ``<|im_end|>`` = 2; plain text between markers is
``encode(piece, add_special_tokens=False)``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from cosmic_tl.formats import (
    FORMAT_NAMES,
    PROMPT_FORMATS,
    PromptFormatError,
    prompt_format,
    use_prompt_format,
)
from cosmic_tl.templates import ChatTemplateError, chat_prompts, end_of_instruction, format_prompt

INSTRUCTION = "How do I bake bread?"

# Written out by hand from the published wrappers' strings (see docs/method.md).
EXPECTED_TEXT = {
    "llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHow do I bake bread?"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "qwen": "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n",
    "gemma": "<bos><start_of_turn>user\nHow do I bake bread?<end_of_turn>\n<start_of_turn>model\n",
    "llama2": "<s>[INST] How do I bake bread? [/INST] ",
    "yi": "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n",
}
MARKERS = {
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "qwen": ["<|im_start|>", "<|im_end|>"],
    "gemma": ["<bos>", "<start_of_turn>", "<end_of_turn>"],
    "llama2": ["<s>"],
    "yi": ["<|im_start|>", "<|im_end|>"],
}


@pytest.fixture(scope="module")
def base(smollm2_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2_dir)


def _family(base: Any, name: str) -> Any:
    """SmolLM2's tokenizer standing in for family ``name``, with its format on."""
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"additional_special_tokens": MARKERS[name]})
    return use_prompt_format(tok, name)


def _expected_ids(base: Any, name: str) -> tuple[list[int], list[int]]:
    """Hand-derived (prompt ids, EOI ids) of INSTRUCTION in format ``name``."""

    def enc(text: str) -> list[int]:
        return list(base.encode(text, add_special_tokens=False))

    n = len(base)  # the first id a new special token gets
    if name == "llama3":
        bot, sh, eh, eot = n, n + 1, n + 2, n + 3
        eoi = [eot, sh, *enc("assistant"), eh, *enc("\n\n")]
        return [bot, sh, *enc("user"), eh, *enc("\n\n" + INSTRUCTION), *eoi], eoi
    if name in ("qwen", "yi"):
        im_start, im_end = 1, 2
        eoi = [im_end, *enc("\n"), im_start, *enc("assistant\n")]
        return [im_start, *enc("user\n" + INSTRUCTION), *eoi], eoi
    if name == "gemma":
        bos, sot, eot = n, n + 1, n + 2
        eoi = [eot, *enc("\n"), sot, *enc("model\n")]
        return [bos, sot, *enc("user\n" + INSTRUCTION), *eoi], eoi
    assert name == "llama2"
    eoi = enc(" [/INST] ")  # the published EOI: the text after the instruction, alone
    return [n, *enc("[INST] " + INSTRUCTION + " [/INST] ")], eoi


@pytest.mark.parametrize("name", list(EXPECTED_TEXT))
def test_rendered_text_is_the_published_string(base, name):
    assert format_prompt(_family(base, name), INSTRUCTION) == EXPECTED_TEXT[name]


@pytest.mark.parametrize("name", list(EXPECTED_TEXT))
def test_token_ids_and_eoi_are_hand_derived(base, name):
    tok = _family(base, name)
    ids, eoi_ids = _expected_ids(base, name)
    assert list(chat_prompts(tok, [INSTRUCTION]).ids[0]) == ids
    eoi = end_of_instruction(tok)
    assert list(eoi.token_ids) == eoi_ids
    assert ids[-len(eoi_ids) :] == eoi_ids


def test_llama3_eoi_tokens_spelled_out(base):
    """<|eot_id|> <|start_header_id|> assistant <|end_header_id|> \\n\\n: 5 tokens on Llama-3,
    6 here because SmolLM2 splits 'assistant' into 'ass' + 'istant'."""
    eoi = end_of_instruction(_family(base, "llama3"))
    assert eoi.labels == (
        "<|eot_id|>",
        "<|start_header_id|>",
        "ass",
        "istant",
        "<|end_header_id|>",
        "\\n\\n",
    )
    assert eoi.positions == (-6, -5, -4, -3, -2, -1)


def test_gemma_and_llama2_eoi_labels(base):
    assert end_of_instruction(_family(base, "gemma")).labels == (
        "<end_of_turn>",
        "\\n",
        "<start_of_turn>",
        "model",
        "\\n",
    )
    # the published trailing space after [/INST] is the last EOI token
    assert end_of_instruction(_family(base, "llama2")).labels == ("␣[", "/", "INST", "]", "␣")


@pytest.mark.parametrize("name", list(EXPECTED_TEXT))
def test_system_prompt_refused_unless_empty(base, name):
    tok = _family(base, name)
    assert format_prompt(tok, INSTRUCTION, system="") == EXPECTED_TEXT[name]
    with pytest.raises(ChatTemplateError, match="no system turn"):
        format_prompt(tok, INSTRUCTION, system="You are helpful.")


def test_only_one_user_message(base):
    tok = _family(base, "qwen")
    two = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(Exception, match="exactly one user message"):
        tok.apply_chat_template(two, add_generation_prompt=True, tokenize=False)


def test_without_generation_prompt(base):
    tok = _family(base, "llama3")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=False, tokenize=False
    )
    assert text == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>"


def test_names_and_errors():
    assert FORMAT_NAMES == ("chat_template", "llama3", "qwen", "gemma", "llama2", "yi")
    assert all(prompt_format(n) == PROMPT_FORMATS[n] for n in PROMPT_FORMATS)
    with pytest.raises(PromptFormatError, match="known formats: 'chat_template', 'llama3'"):
        prompt_format("llama-3")
    with pytest.raises(PromptFormatError, match="tokenizer's own template"):
        prompt_format("chat_template")


def test_use_prompt_format_copies(base):
    own = base.chat_template
    kept = use_prompt_format(base, "chat_template")
    assert kept is not base and kept.chat_template == own
    assert format_prompt(kept, "x") == format_prompt(base, "x")
    qwen = use_prompt_format(base, "qwen")
    assert qwen.chat_template == PROMPT_FORMATS["qwen"]
    assert base.chat_template == own  # the tokenizer passed in is untouched


def test_markers_must_be_single_tokens(base):
    with pytest.raises(PromptFormatError, match="<|begin_of_text|>.*single tokens"):
        use_prompt_format(base, "llama3")


def test_check_against_the_published_tokenisation(base):
    # ChatML on SmolLM2: the published call tokenises the very same text.
    tok = use_prompt_format(base, "qwen")
    published = base("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    assert list(chat_prompts(tok, ["Hi"]).ids[0]) == list(published)


def _metaspace_tokenizer() -> Any:
    """A sentencepiece-style tokenizer that marks a word start only at the start of the
    string, not after a special token (Llama's non-legacy behaviour)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "▁[INST]": 2, "[INST]": 3, "▁[/INST]": 4, "▁": 5}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>")
    tok.add_special_tokens({"additional_special_tokens": ["<s>"]})
    return tok


def test_check_catches_text_that_tokenises_differently_after_the_bos():
    tok = _metaspace_tokenizer()
    # The published call: <s> added by the tokenizer, then '▁[INST]' at the string's start.
    assert tok("[INST] x [/INST] ", add_special_tokens=False)["input_ids"] == [2, 0, 4, 5]
    # The format's text: '[INST]' right after <s> loses its word-start mark.
    assert tok("<s>[INST] x [/INST] ", add_special_tokens=False)["input_ids"] == [1, 3, 0, 4, 5]
    with pytest.raises(PromptFormatError, match="published code's tokens"):
        use_prompt_format(tok, "llama2")
    assert use_prompt_format(tok, "llama2", check=False).chat_template == PROMPT_FORMATS["llama2"]


def test_check_ignores_a_bos_the_model_tokenizer_adds(smollm2_dir):
    """A model's tokenizer may be set to add a BOS (TransformerLens's is) that the published
    code's plain tokenizer did not; cosmic_tl never asks for it, and the check ignores it."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir, add_bos_token=True)
    assert tok("x")["input_ids"][0] == 1  # <|im_start|>, SmolLM2's BOS, added
    qwen = use_prompt_format(tok, "qwen")
    assert chat_prompts(qwen, ["Hi"]).ids[0][:2] == (
        1,
        *tok.encode("user", add_special_tokens=False)[:1],
    )
