"""Chat formatting, end-of-instruction (EOI) tokens and token labels.

Prompts are formatted with the tokenizer's own chat template (user turn plus the
generation prompt). The EOI tokens are whatever the template puts after the
instruction text; they are derived by rendering the template around a sentinel
instruction, never typed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

_SENTINEL = "Zq7 sentinel instruction Xw3"


class ChatTemplateError(ValueError):
    """The tokenizer has no usable chat template, or the template misbehaves."""


def _messages(instruction: str, system: str | None) -> list[dict[str, str]]:
    msgs = [] if system is None else [{"role": "system", "content": system}]
    return [*msgs, {"role": "user", "content": instruction}]


def format_prompt(tokenizer: Any, instruction: str, system: str | None = None) -> str:
    """Render one instruction as the model sees it before answering.

    ``system=None`` keeps the template's default system prompt (if any); a string
    (``""`` included) is passed as an explicit system message.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"the tokenizer of {tokenizer_name(tokenizer)} has no chat template, so prompts "
            "cannot be formatted as chat turns. Set one before use: "
            "`model.tokenizer.chat_template = '<jinja template>'` (e.g. copied from the "
            "instruction-tuned sibling of this model)"
        )
    try:
        text = tokenizer.apply_chat_template(
            _messages(instruction, system), add_generation_prompt=True, tokenize=False
        )
    except Exception as err:  # jinja raises its own TemplateError types
        raise ChatTemplateError(
            f"the chat template of {tokenizer_name(tokenizer)} failed to render: {err}"
        ) from err
    return str(text)


@dataclass(frozen=True)
class EOI:
    """End-of-instruction tokens of a chat template.

    ``positions`` counts from the end: ``(-k, ..., -1)``.
    """

    token_ids: tuple[int, ...]
    labels: tuple[str, ...]

    @property
    def positions(self) -> tuple[int, ...]:
        k = len(self.token_ids)
        return tuple(range(-k, 0))


def tokenizer_name(tokenizer: Any) -> str:
    """The model a tokenizer belongs to, for error messages (its ``name_or_path``)."""
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    return repr(name) if name else "this model"


def token_label(tokenizer: Any, token_id: int) -> str:
    """A readable label for one token (newlines and spaces made visible)."""
    text = tokenizer.decode([token_id])
    return text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣") or f"<{token_id}>"


def end_of_instruction(tokenizer: Any, system: str | None = None) -> EOI:
    """Derive the EOI tokens: the template tokens after the instruction text.

    The template is rendered around a sentinel instruction; the text after the
    sentinel is tokenized on its own and checked to be the tail of the full
    tokenized prompt (so tokens do not merge across the boundary).
    """
    name = tokenizer_name(tokenizer)
    text = format_prompt(tokenizer, _SENTINEL, system)
    if text.count(_SENTINEL) != 1:
        raise ChatTemplateError(
            f"the chat template of {name} does not place the instruction verbatim (it appears "
            f"{text.count(_SENTINEL)} times in the rendered prompt), so the end-of-instruction "
            "tokens cannot be found"
        )
    suffix = text.split(_SENTINEL, 1)[1]
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    if not suffix_ids:
        raise ChatTemplateError(
            f"the chat template of {name} puts no tokens after the instruction "
            f"(rendered: {text[-60:]!r}), so there are no end-of-instruction tokens to read "
            "candidate directions at. Use a template that closes the user turn and opens the "
            "assistant's (add_generation_prompt), e.g. `model.tokenizer.chat_template = ...`"
        )
    full_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    k = len(suffix_ids)
    if list(full_ids[-k:]) != list(suffix_ids):
        raise ChatTemplateError(
            f"with the chat template of {name} the end-of-instruction text {suffix!r} does not "
            "tokenize the same on its own as at the end of a prompt (tokens merge across the "
            "instruction's end); cannot derive end-of-instruction tokens for this template"
        )
    return EOI(tuple(int(t) for t in suffix_ids), tuple(token_label(tokenizer, t) for t in suffix_ids))


@dataclass(frozen=True)
class Batch:
    """A padded batch of tokenized prompts.

    Left-padded (the default) every prompt ends at the last column, as generation
    and a whole-prompt forward need; right-padded (``right_padded``) every prompt
    starts at column 0, so that tokens put in front of the batch (a shared prefix's
    keys and values) are contiguous with every prompt. ``last`` is each prompt's last
    column either way.
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    index: tuple[int, ...]  # which prompts of the caller's list these rows are
    right_padded: bool = False

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        return self.attention_mask.sum(-1)

    @property
    def last(self) -> Int[Tensor, " batch"]:
        """The column of each prompt's last token."""
        if self.right_padded:
            return self.lengths - 1
        return torch.full((self.tokens.shape[0],), self.tokens.shape[1] - 1, dtype=torch.long)

    def rows(self) -> list[Int[Tensor, " tokens"]]:
        """Each prompt's tokens without the padding."""
        if self.right_padded:
            return [self.tokens[i, : int(n)] for i, n in enumerate(self.lengths)]
        width = self.tokens.shape[1]
        return [self.tokens[i, width - int(n) :] for i, n in enumerate(self.lengths)]


def encode(
    tokenizer: Any,
    instructions: Sequence[str],
    *,
    system: str | None = None,
    max_len: int | None = None,
) -> list[list[int]]:
    """Format and tokenize prompts (no extra special tokens: the template has them).

    Raises ``ValueError`` naming the prompt if one is longer than ``max_len``.
    """
    return [
        list(row) for row in chat_prompts(tokenizer, instructions, system=system, max_len=max_len).ids
    ]


def left_pad(ids: Sequence[Sequence[int]], pad_id: int, index: Sequence[int]) -> Batch:
    """Stack token rows into a left-padded batch with its attention mask."""
    return pad(ids, pad_id, index)


def pad(
    ids: Sequence[Sequence[int]],
    pad_id: int,
    index: Sequence[int],
    *,
    side: Literal["left", "right"] = "left",
) -> Batch:
    """Stack token rows into a batch padded on ``side``, with its attention mask."""
    width = max(len(r) for r in ids)
    tokens = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        cols = slice(width - len(row), None) if side == "left" else slice(0, len(row))
        tokens[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return Batch(tokens, mask, tuple(index), right_padded=side == "right")


def pad_id(tokenizer: Any) -> int:
    """The pad token id, falling back to EOS (padding is masked out anyway)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def stop_token_ids(tokenizer: Any, *more: int | Sequence[int] | None) -> list[int]:
    """Token ids that end an answer: ``more`` (a bridge's ``cfg.eos_token_id``, a
    generation config's ``eos_token_id``) and the tokenizer's EOS, without repeats.

    Chat models often end a turn with a token other than the tokenizer's EOS
    (Llama-3's ``<|eot_id|>``), which the generation config lists; all are used.
    """
    found: list[int] = []
    for ids in (*more, getattr(tokenizer, "eos_token_id", None)):
        for tid in [ids] if isinstance(ids, int) else list(ids or []):
            if int(tid) not in found:
                found.append(int(tid))
    if not found:
        raise ValueError("the model's tokenizer has no EOS token; cannot tell where answers end")
    return found


@dataclass(frozen=True)
class Prompts:
    """Instructions formatted with a chat template and tokenised once.

    It carries the system prompt it was formatted with, so scoring, evaluation, the
    prompt filter and the organism build all see the same tokens. :meth:`batches` is
    the one length-sorted batching every forward pass uses.

    >>> p = chat_prompts(model.tokenizer, ["Hi", "Name a prime."])  # doctest: +SKIP
    >>> [b.tokens.shape for b in p.batches(32)]                    # doctest: +SKIP
    """

    instructions: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]
    system: str | None
    pad_id: int

    def __post_init__(self) -> None:
        if len(self.instructions) != len(self.ids):
            raise ValueError("one token row per instruction")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.ids]

    def batches(self, batch_size: int, *, by_length: bool = True) -> list[Batch]:
        """Left-padded batches of at most ``batch_size`` prompts.

        With ``by_length`` the prompts are sorted by token count first, so each batch
        needs little padding; ``Batch.index`` maps rows back to the prompts' order.
        Means over prompts do not depend on the order.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        n = len(self.ids)
        order = sorted(range(n), key=lambda i: len(self.ids[i])) if by_length else list(range(n))
        return [
            left_pad([self.ids[i] for i in chunk], self.pad_id, chunk)
            for chunk in (order[s : s + batch_size] for s in range(0, n, batch_size))
        ]

    def subset(self, keep: Sequence[int]) -> Prompts:
        """The prompts at indices ``keep`` (in that order), with the same system prompt."""
        return Prompts(
            tuple(self.instructions[i] for i in keep),
            tuple(self.ids[i] for i in keep),
            self.system,
            self.pad_id,
        )


def chat_prompts(
    tokenizer: Any,
    instructions: Sequence[str],
    *,
    system: str | None = None,
    max_len: int | None = None,
) -> Prompts:
    """Format ``instructions`` with the chat template (and ``system``) and tokenise them.

    Raises ``ValueError`` for an empty list, or naming the prompt if one is longer
    than ``max_len`` tokens.
    """
    if not instructions:
        raise ValueError("no prompts to tokenize")
    ids = tuple(
        tuple(tokenizer(format_prompt(tokenizer, x, system), add_special_tokens=False)["input_ids"])
        for x in instructions
    )
    if max_len is not None:
        for i, (x, row) in enumerate(zip(instructions, ids, strict=True)):
            if len(row) > max_len:
                raise ValueError(
                    f"prompt {i} is {len(row)} tokens, longer than the model's context of "
                    f"{max_len}: {x[:80]!r}"
                )
    return Prompts(tuple(instructions), ids, system, pad_id(tokenizer))


def context_length(model: Any) -> int | None:
    """The model's context length in tokens, if it has one."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    return int(n_ctx) if n_ctx else None


def prompts_for(model: Any, prompts: Sequence[str] | Prompts) -> Prompts:
    """``prompts`` as :class:`Prompts` for ``model`` (plain strings get the template's
    default system prompt), checked against the model's context length."""
    n_ctx = context_length(model)
    if isinstance(prompts, Prompts):
        if n_ctx and max(prompts.lengths) > n_ctx:
            raise ValueError(
                f"a prompt is {max(prompts.lengths)} tokens, longer than the model's context of {n_ctx}"
            )
        return prompts
    return chat_prompts(model.tokenizer, prompts, max_len=n_ctx)


def batches(
    tokenizer: Any,
    instructions: Sequence[str],
    batch_size: int,
    *,
    system: str | None = None,
    max_len: int | None = None,
    by_length: bool = True,
) -> list[Batch]:
    """Shorthand for ``chat_prompts(...).batches(batch_size)``."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    prompts = chat_prompts(tokenizer, instructions, system=system, max_len=max_len)
    return prompts.batches(batch_size, by_length=by_length)


def shared_prefix_length(batches: Sequence[Batch]) -> int:
    """Tokens at the start of every prompt that are the same in all of them.

    Capped so that each prompt keeps at least one token of its own. Chat templates
    with a default system turn give a long shared prefix (24 tokens for SmolLM2).
    """
    rows = [row for b in batches for row in b.rows()]
    limit = min(len(r) for r in rows) - 1
    first = rows[0]
    n = 0
    while n < limit and all(int(r[n]) == int(first[n]) for r in rows):
        n += 1
    return n


def drop_prefix(
    batch: Batch, n: int, pad_token: int, *, side: Literal["left", "right"] = "left"
) -> Batch:
    """The same prompts without their first ``n`` tokens, padded again with ``pad_token``
    on ``side``."""
    if n < 0 or n >= int(batch.lengths.min()):
        raise ValueError(f"cannot drop {n} tokens from prompts as short as {int(batch.lengths.min())}")
    return pad([row[n:].tolist() for row in batch.rows()], pad_token, batch.index, side=side)
