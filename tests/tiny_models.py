"""Tiny random models of several families, built offline with transformers.

Each is a 4-block random model with SmolLM2's tokenizer, saved with a chat template in
the family's documented turn format (written here; the real models' templates also do
other things, e.g. tool calls, that these tests do not need). The turn markers are
added to the tokenizer as special tokens where the family's tokenizer has them as
single tokens, so the vocabulary is SmolLM2's plus those.

Weights are scaled up so that interventions visibly change the outputs, and the norm
weights are random: Gemma's RMSNorm scales by ``1 + weight`` (1 at initialisation) and
a uniform scale would keep a vector orthogonal to r̂ after a post-norm, hiding the
difference between the LCE ablation placements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cosmic_tl.models import alias_dir

# --------------------------------------------------------------- chat templates
# The families' turn formats (from their model cards and tokenizer configs).

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Qwen2-Instruct: ChatML with a default system turn.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral-7B-Instruct v0.1: [INST] and [/INST] are plain text to its tokenizer.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """How to build one family's tiny model, and what its template's EOI tokens are."""

    name: str
    model_cls: str  # transformers class names
    config_cls: str
    template: str | None  # None: keep SmolLM2's own (ChatML with a default system turn)
    specials: tuple[str, ...] = ()  # turn markers that are single tokens in the family
    bos: str | None = None  # the family's BOS (a special token), if it has its own
    end_of_turn: str | None = None  # the token that ends an answer, if not SmolLM2's EOS
    # The EOI tokens, written out by hand from the turn format: each token's text
    # (SmolLM2's BPE splits "assistant" after <|im_start|>, and " [/INST]" in four).
    eoi: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    norm_offset: float = 1.0  # norm weights ~ N(offset, 0.5): 0 where the norm scales by 1 + w

    @property
    def post_norm(self) -> bool:
        """Blocks add ``post_norm(sublayer(x))`` to the residual stream."""
        return self.name.startswith("gemma")


# Sliding windows much shorter than the prompts (about 15-35 tokens), so that they matter.
WINDOW = 8
_GEMMA = dict(
    head_dim=16,
    sliding_window=WINDOW,
    layer_types=["sliding_attention", "full_attention"] * 2,
)
_GEMMA_CHAT = dict(
    template=GEMMA_TEMPLATE,
    specials=("<bos>", "<start_of_turn>", "<end_of_turn>"),
    bos="<bos>",
    end_of_turn="<end_of_turn>",
    eoi=("<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"),
    norm_offset=0.0,
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "gemma2",
            "Gemma2ForCausalLM",
            "Gemma2Config",
            # a low final-logit cap (the real one is 30), so that capped and uncapped differ
            config={**_GEMMA, "final_logit_softcapping": 5.0},
            **_GEMMA_CHAT,  # type: ignore[arg-type]
        ),
        Family(
            "gemma3",
            "Gemma3ForCausalLM",
            "Gemma3TextConfig",
            config={**_GEMMA, "rope_local_base_freq": 100.0},
            **_GEMMA_CHAT,  # type: ignore[arg-type]
        ),
        Family(
            "qwen2",
            "Qwen2ForCausalLM",
            "Qwen2Config",
            QWEN2_TEMPLATE,
            eoi=("<|im_end|>", "\n", "<|im_start|>", "ass", "istant", "\n"),
            # Qwen2 checkpoints leave sliding windows off; one here on the last two layers
            config={"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
        ),
        Family(
            "mistral",
            "MistralForCausalLM",
            "MistralConfig",
            MISTRAL_TEMPLATE,
            specials=("<s>",),
            bos="<s>",
            eoi=(" [", "/", "INST", "]"),
            config={"sliding_window": WINDOW, "head_dim": 16},
        ),
        Family(
            "phi3",
            "Phi3ForCausalLM",
            "Phi3Config",
            PHI3_TEMPLATE,
            specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
            end_of_turn="<|end|>",
            eoi=("<|end|>", "\n", "<|assistant|>", "\n"),
        ),
        Family(
            "llama",
            "LlamaForCausalLM",
            "LlamaConfig",
            None,
            eoi=("<|im_end|>", "\n", "<|im_start|>", "ass", "istant", "\n"),
        ),
    )
}


def family_tokenizer(family: Family) -> Any:
    """SmolLM2's tokenizer with the family's turn markers and chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(alias_dir("smollm2-135m-instruct"))
    if family.specials:
        tok.add_special_tokens({"additional_special_tokens": list(family.specials)})
    if family.bos is not None:
        tok.bos_token = family.bos
    if family.template is not None:
        tok.chat_template = family.template
    return tok


def save_tiny(
    out: Path,
    model_cls: type,
    config_cls: type,
    *,
    tokenizer: Any = None,
    norm_offset: float = 0.0,
    eos_token_id: int | None = None,
    **extra: Any,
) -> Path:
    """A 4-block random model saved with ``tokenizer`` (default SmolLM2's) to ``out``."""
    from transformers import AutoTokenizer

    tok = tokenizer or AutoTokenizer.from_pretrained(alias_dir("smollm2-135m-instruct"))
    cfg = config_cls(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id if eos_token_id is None else eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )
    torch.manual_seed(0)
    model = model_cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(norm_offset, 0.5)
            elif p.ndim == 2 and "embed" not in name:
                p.mul_(4.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def save_family(out: Path, family: Family) -> Path:
    """``family``'s tiny model, with its chat template, saved to ``out``."""
    import transformers

    tok = family_tokenizer(family)
    end = tok.convert_tokens_to_ids(family.end_of_turn) if family.end_of_turn else None
    return save_tiny(
        out,
        getattr(transformers, family.model_cls),
        getattr(transformers, family.config_cls),
        tokenizer=tok,
        norm_offset=family.norm_offset,
        eos_token_id=end,
        **family.config,
    )


def save_gguf_gemma3(out: Path, tok: Any) -> Any:
    """A tiny Gemma 3 for the GGUF tests, saved with ``tok``'s vocabulary size and ids:
    head_dim 256 (= query_pre_attn_scalar, as llama.cpp assumes), a sliding window shorter
    than the prompts, and norms and weights scaled so that every part moves the logits;
    returns its config."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=256,
        max_position_embeddings=256,
        sliding_window=16,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    hf = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
            elif p.ndim == 2 and "embed" not in name:
                p.mul_(4.0)
    hf.save_pretrained(out)
    return cfg
