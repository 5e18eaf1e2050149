"""Chat formatting and end-of-instruction derivation for several template styles."""

from __future__ import annotations

import copy

import pytest

from cosmic_tl.templates import ChatTemplateError, batches, end_of_instruction, format_prompt

LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ '<bos>' }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' + m['content'] + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2.tokenizer


def _with_template(tok, template, specials):
    t = copy.deepcopy(tok)
    t.add_special_tokens({"additional_special_tokens": specials})
    t.chat_template = template
    return t


def test_chatml_eoi(tok):
    eoi = end_of_instruction(tok)
    assert tok.decode(list(eoi.token_ids)) == "<|im_end|>\n<|im_start|>assistant\n"
    assert eoi.positions == tuple(range(-len(eoi.token_ids), 0))
    assert eoi.labels[0] == "<|im_end|>" and "\\n" in eoi.labels


def test_llama3_eoi(tok):
    t = _with_template(
        tok, LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    )
    eoi = end_of_instruction(t)
    assert t.decode(list(eoi.token_ids)) == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    text = format_prompt(t, "Hi there")
    assert text.startswith("<|begin_of_text|>") and text.endswith("<|end_header_id|>\n\n")


def test_gemma_eoi_and_system_error(tok):
    t = _with_template(tok, GEMMA, ["<bos>", "<start_of_turn>", "<end_of_turn>"])
    eoi = end_of_instruction(t)
    assert t.decode(list(eoi.token_ids)) == "<end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(ChatTemplateError, match="failed to render"):
        format_prompt(t, "Hi", system="Be brief")


def test_system_prompt_options(tok):
    default = format_prompt(tok, "Hi")
    assert "SmolLM" in default  # the template's own default system prompt
    custom = format_prompt(tok, "Hi", system="You are terse.")
    assert "You are terse." in custom and "SmolLM" not in custom
    assert "SmolLM" not in format_prompt(tok, "Hi", system="")


def test_no_template_is_a_clear_error(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        end_of_instruction(t)


def test_batches_left_pad_and_sort(tok):
    prompts = ["a much longer prompt than the others, with many words in it", "hi", "short one"]
    bs = batches(tok, prompts, 2)
    assert sorted(i for b in bs for i in b.index) == [0, 1, 2]
    for b in bs:
        assert bool((b.attention_mask[:, -1] == 1).all())  # left padded: last token real
        assert b.tokens.shape == b.attention_mask.shape
    with pytest.raises(ValueError, match="longer than the model's context"):
        batches(tok, prompts, 2, max_len=10)


def test_shared_prefix_and_drop_prefix():
    from cosmic_tl.templates import drop_prefix, left_pad, shared_prefix_length

    rows = [[5, 6, 7, 1, 2], [5, 6, 7, 3], [5, 6, 9, 9, 9, 4]]
    b = left_pad(rows, 0, [0, 1, 2])
    assert shared_prefix_length([b]) == 2
    cut = drop_prefix(b, 2, 0)
    assert cut.tokens.tolist() == [[0, 7, 1, 2], [0, 0, 7, 3], [9, 9, 9, 4]]
    assert cut.attention_mask.sum(-1).tolist() == [3, 2, 4] and cut.index == (0, 1, 2)
    # Every prompt keeps at least one token of its own, across batches too.
    same = [left_pad([[1, 2, 3]], 0, [0]), left_pad([[1, 2, 3, 4]], 0, [1])]
    assert shared_prefix_length(same) == 2
    with pytest.raises(ValueError, match="cannot drop"):
        drop_prefix(b, 4, 0)
    assert b.last.tolist() == [5, 5, 5] and not b.right_padded


def test_right_padded_batches_keep_each_prompts_last_column():
    """After a shared prefix the rest is right-padded: [prefix][prompt][padding]."""
    from cosmic_tl.templates import drop_prefix, left_pad, pad

    rows = [[5, 6, 7, 1, 2], [5, 6, 7, 3], [5, 6, 9, 9, 9, 4]]
    cut = drop_prefix(left_pad(rows, 0, [0, 1, 2]), 2, 0, side="right")
    assert cut.right_padded
    assert cut.tokens.tolist() == [[7, 1, 2, 0], [7, 3, 0, 0], [9, 9, 9, 4]]
    assert cut.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert cut.last.tolist() == [2, 1, 3]
    assert [r.tolist() for r in cut.rows()] == [[7, 1, 2], [7, 3], [9, 9, 9, 4]]
    assert (
        pad(rows, 0, [0, 1, 2], side="left").tokens.tolist()
        == left_pad(rows, 0, [0, 1, 2]).tokens.tolist()
    )


def test_chat_template_prefix_is_shared(tok):
    from cosmic_tl.templates import _SENTINEL, shared_prefix_length

    head = format_prompt(tok, _SENTINEL).split(_SENTINEL)[0]
    n_head = len(tok(head, add_special_tokens=False)["input_ids"])
    todo = batches(tok, ["Name a red fruit.", "Why is the sky blue?", "List three primes."], 2)
    assert n_head > 10 and shared_prefix_length(todo) == n_head
