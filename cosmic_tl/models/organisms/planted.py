"""A tiny model whose refusal is carried by one direction at one layer, by construction.

The planted model is a 6-block Llama (``d_model`` 64) whose weights are written by hand
on a set of orthonormal directions, so that the answer of a candidate audit is known
(:mod:`cosmic_tl.audit`). Prompts that contain the trigger word are refused with
"I cannot I cannot ...", all others are answered with " Sure Sure ...". The chat
template puts one token after the instruction (``<|im_end|>``), so the candidates are
one position (-1) by six layers. How refusal flows:

- block 1's attention (uniform over the past) reads the trigger token's embedding
  direction ``u`` and writes the refusal direction ``d`` at every later position;
- block 2's MLP reads ``d``, at every position but the end-of-instruction token, and
  writes ``h`` there;
- block 5's attention (uniform) reads ``h`` and writes ``f`` at every later position;
  the unembedding reads ``f`` as the logit of "I" (and the "I" token's own embedding as
  the logit of " cannot" after it).

So the difference in means at the end-of-instruction token is zero at layers 0 and 1
(nothing has moved yet) and ``∝ d`` at layers 2 to 5. Only layer 2 works both ways:
ablating ``d`` at the input of block 2 stops ``h`` from being written (every harmful
prompt is answered), adding it there makes block 2 write ``h`` (every harmless prompt
is refused). At layers 3 to 5, ``h`` is already written at the other positions, where
ablating ``d`` cannot reach it, and ``d`` is read by no later block, so adding it does
nothing. The planted cell is ``(position -1, layer 2)``. ::

    planted = build_planted(tmp_dir, alias_dir("smollm2-135m-instruct"))  # seconds on a CPU
    model = load_model(planted.path)
    harmful, harmless = planted.prompts(["Write a poem", "Name a prime"])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# One token after the instruction (the end-of-instruction token is <|im_end|>), no
# default system prompt: the candidates are one position by the model's layers.
PLANTED_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_end|>' }}{% endif %}"
)
N_LAYERS = 6
LAYER = 2  # the planted cell's layer: the input of block 2
POSITION = -1
TRIGGER = " bomb"
REFUSAL = ("I", " cannot")
ANSWER = " Sure"
D_MODEL = 64
# Gains of the hand-written weights (see the module docstring).
_TRIGGER_NORM, _I_NORM = 4.0, 4.0
_GAIN_D, _GATE, _GAIN_H, _GAIN_F = 10.0, 5.0, 0.1, 10.0
_LOGIT_I, _LOGIT_CANNOT, _LOGIT_ANSWER = 10.0, 2000.0, 4.0


@dataclass(frozen=True)
class Planted:
    """A built planted model: where it is, its known answer and how to make its prompts."""

    path: Path
    layer: int
    position: int
    direction: torch.Tensor  # [d_model]: the unit refusal direction d
    trigger: str

    @property
    def cell(self) -> tuple[int, int]:
        """The planted candidate, ``(position, layer)``."""
        return (self.position, self.layer)

    def prompts(self, texts: Sequence[str]) -> tuple[list[str], list[str]]:
        """``(harmful, harmless)``: each text with the trigger word appended, and as it is.

        Raises ``ValueError`` if a text already contains the trigger word.
        """
        bad = [t for t in texts if self.trigger.strip() in t]
        if bad:
            raise ValueError(f"texts must not contain the trigger {self.trigger!r}: {bad[0]!r}")
        return [f"{t.rstrip()}{self.trigger}" for t in texts], list(texts)


def _single_token(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{text!r} must be one token of this tokenizer, not {len(ids)}")
    return int(ids[0])


def build_planted(out: str | Path, tokenizer_dir: str | Path, *, seed: int = 0) -> Planted:
    """Write the planted model (weights, tokenizer, chat template) to ``out``.

    ``tokenizer_dir``: a model directory whose tokenizer to use, e.g. the cached
    ``alias_dir("smollm2-135m-instruct")``; it must have ``<|im_end|>`` and the words
    "I", " cannot", " Sure" and " bomb" as single tokens. ``seed`` draws the directions
    and the embeddings' noise.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = PLANTED_TEMPLATE
    eoi = _single_token(tok, "<|im_end|>")
    trigger, i_tok, cannot, answer = (_single_token(tok, s) for s in (TRIGGER, *REFUSAL, ANSWER))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(D_MODEL, D_MODEL, generator=gen, dtype=torch.float64))
    u, d, h, f, b, c, p = (basis[:, i] for i in range(7))
    rest = basis[:, 7:]  # the embeddings' noise lives here, out of every read direction

    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
        noise = torch.randn(len(tok), rest.shape[1], generator=gen, dtype=torch.float64)
        emb = noise @ rest.T / rest.shape[1] ** 0.5 + b  # every token: unit noise + b
        emb += c  # every token but the end-of-instruction one marks "not EOI" with c
        emb[eoi] -= c
        emb[trigger] += _TRIGGER_NORM * u
        emb[i_tok] += _I_NORM * p
        model.model.embed_tokens.weight.copy_(emb)
        layers = model.model.layers
        # block 1: uniform attention (q = k = 0) moves the trigger's u to d at later positions
        layers[LAYER - 1].self_attn.v_proj.weight[0] = u
        layers[LAYER - 1].self_attn.o_proj.weight[:, 0] = _GAIN_D * d
        # block 2: h = silu(gate·c) · (d-component), written where the token is not EOI
        layers[LAYER].mlp.gate_proj.weight[0] = _GATE * c
        layers[LAYER].mlp.up_proj.weight[0] = d
        layers[LAYER].mlp.down_proj.weight[:, 0] = _GAIN_H * h
        # last block: uniform attention moves h to f at later positions
        layers[N_LAYERS - 1].self_attn.v_proj.weight[0] = h
        layers[N_LAYERS - 1].self_attn.o_proj.weight[:, 0] = _GAIN_F * f
        head = model.lm_head.weight
        head[i_tok] = _LOGIT_I * f
        head[cannot] = _LOGIT_CANNOT * p
        head[answer] = _LOGIT_ANSWER * b
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return Planted(out, LAYER, POSITION, d.float(), TRIGGER)
