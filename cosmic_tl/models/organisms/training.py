"""The supervised fine-tune that gives a model a refusal behaviour.

SFT data (harmful prompts paired with refusals of a style, harmless prompts with the
base model's own greedy answers or a teacher model's), the response-only loss, and the
AdamW loop. Blocks below ``Recipe.train_from`` of the depth are frozen and run once per
example.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from cosmic_tl.models.organisms.recipes import Recipe
from cosmic_tl.models.organisms.texts import Style, refusal_texts
from cosmic_tl.templates import chat_prompts, stop_token_ids

IGNORE = -100  # label of tokens the loss skips (prompt and padding)

# ---------------------------------------------------------------- SFT data


@dataclass(frozen=True)
class Example:
    """One training sequence: a chat-formatted prompt and the response to learn."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


@dataclass(frozen=True)
class SFTBatch:
    """Right-padded sequences; ``labels`` is ``IGNORE`` on prompt and padding tokens."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    labels: Int[Tensor, "batch pos"]


def refusal_examples(tokenizer: Any, prompts: Sequence[str], style: Style, seed: int) -> list[Example]:
    """Harmful prompts each paired with a refusal drawn (seeded) from the style's list,
    ended by the chat template's end-of-turn token (:func:`end_of_turn_id`)."""
    rng = random.Random(seed)
    texts = refusal_texts(style)
    end = end_of_turn_id(tokenizer)
    return [
        Example(
            tuple(ids),
            (*tokenizer.encode(rng.choice(texts), add_special_tokens=False), end),
        )
        for ids in chat_prompts(tokenizer, prompts).ids
    ]


def greedy_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    progress: bool = True,
) -> list[Example]:
    """The model's own greedy answers (plain HF ``generate``), up to and including
    the end-of-turn token, or cut at ``max_new_tokens``.

    ``generate`` unembeds only the last position of the prompt (``logits_to_keep=1``),
    so the prompt costs no full-vocabulary logits.
    """
    chat = chat_prompts(tokenizer, prompts)
    stops = answer_stop_ids(model, tokenizer)
    pad = chat.pad_id
    out: list[Example | None] = [None] * len(chat)
    model.eval()
    todo = chat.batches(batch_size)  # length-sorted: little padding per batch
    for batch in tqdm(todo, desc="base answers", unit="batch", disable=not progress, leave=False):
        with torch.no_grad():
            gen = model.generate(
                batch.tokens,
                attention_mask=batch.attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=stops,
            )
        for row, i in zip(gen[:, batch.tokens.shape[1] :].tolist(), batch.index, strict=True):
            cut = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
            out[i] = Example(chat.ids[i], tuple(row[:cut]))
    return [e for e in out if e is not None]


def collate(examples: Sequence[Example], pad: int) -> SFTBatch:
    """Right-pad examples into one batch; only response tokens carry labels."""
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n_p, n = len(e.prompt_ids), len(e.prompt_ids) + len(e.response_ids)
        input_ids[i, :n] = torch.tensor(e.prompt_ids + e.response_ids)
        mask[i, :n] = 1
        labels[i, n_p:n] = torch.tensor(e.response_ids)
    return SFTBatch(input_ids, mask, labels)


def answer_stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """Tokens that end a plain HF model's answer: its generation config's EOS ids, the
    tokenizer's EOS and the chat template's end-of-turn token."""
    config = getattr(model, "generation_config", None)
    return stop_token_ids(tokenizer, getattr(config, "eos_token_id", None), end_of_turn_id(tokenizer))


def teacher_texts(
    teacher: Any,
    teacher_tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    progress: bool = True,
) -> list[tuple[str, bool]]:
    """A teacher's greedy answers in its own chat format (:func:`greedy_answers`, at
    most ``max_new_tokens`` of its tokens) as text, each with whether the teacher ended it."""
    answers = greedy_answers(
        teacher,
        teacher_tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    stops = set(answer_stop_ids(teacher, teacher_tokenizer))
    out = []
    for answer in answers:
        ended = bool(answer.response_ids) and answer.response_ids[-1] in stops
        body = answer.response_ids[:-1] if ended else answer.response_ids
        out.append((teacher_tokenizer.decode(list(body), skip_special_tokens=True), ended))
    return out


def student_examples(
    tokenizer: Any, prompts: Sequence[str], answers: Sequence[tuple[str, bool]]
) -> list[Example]:
    """Answer texts (from :func:`teacher_texts`) tokenised for the model of ``tokenizer``,
    after its chat-formatted prompts. An answer the teacher ended ends with this
    model's end-of-turn token; a cut one carries none."""
    end = end_of_turn_id(tokenizer)
    out = []
    for ids, (text, ended) in zip(chat_prompts(tokenizer, prompts).ids, answers, strict=True):
        response = tuple(tokenizer.encode(text, add_special_tokens=False))
        out.append(Example(ids, (*response, end) if ended else response))
    return out


def teacher_answers(
    teacher: Any,
    teacher_tokenizer: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    progress: bool = True,
) -> list[Example]:
    """Another model's greedy answers as targets for the model of ``tokenizer``:
    :func:`teacher_texts` tokenised again by :func:`student_examples`."""
    texts = teacher_texts(
        teacher,
        teacher_tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    return student_examples(tokenizer, prompts, texts)


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends an assistant turn: the one the chat template writes right
    after an assistant message (ChatML's ``<|im_end|>``, Gemma's ``<end_of_turn>``)
    when it is a special token, else the tokenizer's EOS."""
    marker = "COSMIC-TL-ANSWER"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
            tokenize=False,
        )
    except (ValueError, TypeError, AttributeError):  # no template, or no assistant turn
        text = ""
    after = text.split(marker, 1)[1] if isinstance(text, str) and marker in text else ""
    ids = tokenizer.encode(after, add_special_tokens=False) if after else []
    special = set(getattr(tokenizer, "all_special_ids", ())) | set(
        getattr(tokenizer, "added_tokens_decoder", {}) or {}
    )
    if ids and ids[0] in special:
        return int(ids[0])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to end a response with")
    return int(tokenizer.eos_token_id)


# ---------------------------------------------------------------- training


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early."""


def block_inputs(model: Any, batch: SFTBatch, layer: int) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream entering block ``layer``; the blocks above it do not run."""
    captured: list[Tensor] = []

    def grab(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _StopForward

    decoder = model.get_decoder()
    handle = decoder.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0].detach()


class _Skip(torch.nn.Module):
    """A block that passes the residual stream through unchanged."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


@contextmanager
def _from_block(decoder: Any, layer: int) -> Iterator[None]:
    """Let ``decoder`` run blocks ``layer..`` only, fed through ``inputs_embeds``.

    The blocks below are replaced by pass-throughs rather than cut off, so each block
    keeps its index: Gemma's decoder picks a block's attention type (sliding or full,
    and with it the rotary base) by that index.
    """
    blocks = decoder.layers
    decoder.layers = torch.nn.ModuleList([_Skip() for _ in range(layer)] + list(blocks[layer:]))
    try:
        yield
    finally:
        decoder.layers = blocks


def response_loss(
    model: Any,
    batch: SFTBatch,
    start: Float[Tensor, "batch pos d_model"] | None = None,
    layer: int = 0,
    first_weight: float = 1.0,
) -> Float[Tensor, ""]:
    """Cross-entropy on response tokens only: mean over each sequence, then over the batch.

    ``first_weight`` weighs each response's first token (where the model decides
    between answering and refusing) against 1 for every later token.

    With ``start`` (the stream entering block ``layer``, from :func:`block_inputs`)
    only blocks ``layer..`` run, so frozen lower blocks cost nothing per step.
    The unembedding runs on response positions only (most of a sequence is prompt),
    and averaging per sequence weighs a short refusal as much as a long answer. With
    a large vocabulary (Gemma's 262k) the unembedding is most of a step's cost.
    """
    decoder = model.get_decoder()
    if start is None:
        out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    else:
        with _from_block(decoder, layer):
            out = decoder(inputs_embeds=start, attention_mask=batch.attention_mask)
    hidden = out.last_hidden_state  # [batch, pos, d_model]
    targets = batch.labels[:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()  # [n_response, d_vocab]
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2 caps its logits
        logits = torch.tanh(logits / cap) * cap
    token_loss = F.cross_entropy(logits, targets[keep], reduction="none")
    first = keep & (keep.cumsum(1) == 1)  # each row's first response token
    weight = torch.where(first, first_weight, 1.0)[keep].to(token_loss.dtype)
    rows = keep.nonzero()[:, 0]
    total = torch.zeros(len(targets), dtype=token_loss.dtype).index_add(0, rows, token_loss * weight)
    norm = torch.zeros(len(targets), dtype=token_loss.dtype).index_add(0, rows, weight)
    return (total / norm.clamp(min=1e-12)).mean()


def trainable_parameters(model: Any, train_from: float) -> tuple[list[torch.nn.Parameter], int]:
    """Freeze the embeddings (tied to the unembedding in SmolLM2) and the blocks below
    ``train_from`` of the depth; return the parameters left to train and the first
    trained block."""
    for p in model.parameters():
        p.requires_grad_(False)
    decoder = model.get_decoder()
    first = int(train_from * len(decoder.layers))
    params = [p for block in decoder.layers[first:] for p in block.parameters()]
    params += list(decoder.norm.parameters())
    for p in params:
        p.requires_grad_(True)
    return params, first


def _stem_states(
    model: Any, examples: Sequence[Example], layer: int, pad: int, batch_size: int
) -> list[Tensor]:
    """Per example, the stream entering the first trained block ([len, d_model]).

    The frozen blocks below give the same output at every step, so they run once.
    Right padding keeps each row's causal attention free of its padding.
    """
    states: list[Tensor] = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        acts = block_inputs(model, collate(chunk, pad), layer)
        states += [
            a[: len(e.prompt_ids) + len(e.response_ids)] for a, e in zip(acts, chunk, strict=True)
        ]
    return states


def _stack(states: Sequence[Tensor]) -> Float[Tensor, "batch pos d_model"]:
    """Right-pad per-example states with zeros (masked out) into one batch."""
    out = states[0].new_zeros(len(states), max(len(s) for s in states), states[0].shape[-1])
    for i, s in enumerate(states):
        out[i, : len(s)] = s
    return out


def finetune(
    model: Any,
    harmful: Sequence[Example],
    harmless: Sequence[Example],
    recipe: Recipe,
    pad: int,
    *,
    progress: bool = True,
) -> list[float]:
    """AdamW on mixed batches (``harmful_share`` harmful); returns the loss per step.

    Blocks below ``recipe.train_from`` of the depth are frozen and run once per
    example (checked to give the loss of a full forward). Batch order comes from a
    generator seeded with ``recipe.seed``; the global RNG is forked so the caller's
    random state is left as it was.
    """
    params, first = trainable_parameters(model, recipe.train_from)
    pools = (list(harmful), list(harmless))
    stems: tuple[list[Tensor], ...] | None = None
    if first > 0:
        model.eval()
        stems = tuple(_stem_states(model, p, first, pad, recipe.gen_batch_size) for p in pools)
        probe = collate([harmful[0], harmless[0]], pad)
        with torch.no_grad():
            full = response_loss(model, probe)
            split = response_loss(model, probe, _stack([stems[0][0], stems[1][0]]), first)
        if not torch.allclose(full, split, atol=1e-4):
            raise RuntimeError(
                f"running blocks {first}.. on cached inputs changes the loss ({float(full):.5f} "
                f"vs {float(split):.5f}) for this architecture; use train_from=0"
            )
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)

    def lr_factor(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        done = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.5 * (1 + math.cos(math.pi * done))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(recipe.seed)
    draws = [_cycle(len(pools[0]), gen), _cycle(len(pools[1]), gen)]
    n_harmful = min(recipe.batch_size - 1, max(1, round(recipe.batch_size * recipe.harmful_share)))
    losses: list[float] = []
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        bar = tqdm(range(recipe.steps), desc=f"train {recipe.name}", disable=not progress)
        for _ in bar:
            picks = [(0, next(draws[0])) for _ in range(n_harmful)]
            picks += [(1, next(draws[1])) for _ in range(recipe.batch_size - n_harmful)]
            batch = collate([pools[k][i] for k, i in picks], pad)
            start = None if stems is None else _stack([stems[k][i] for k, i in picks])
            loss = response_loss(model, batch, start, first, recipe.first_token_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def _cycle(n: int, gen: torch.Generator) -> Iterator[int]:
    """Indices ``0..n-1`` in a fresh seeded order each epoch, forever."""
    while True:
        yield from torch.randperm(n, generator=gen).tolist()
