"""Published prompt formats: the turn formats the reference code hard-codes, as chat templates.

The published COSMIC code, and Arditi et al.'s ``refusal_direction`` code it builds on,
do not use the tokenizer's chat template for Llama-3, Qwen, Gemma, Llama-2 and Yi. Each
model wrapper pastes the instruction into a fixed string with one user turn and no system
turn (so no Llama-3.1 date header and no Qwen default system prompt), then calls
``tokenizer(prompts)``, which adds the BOS token wherever that tokenizer adds one.
cosmic_tl tokenises rendered chat text with ``add_special_tokens=False``, so each format
here writes that BOS into the text itself.

The formats are Jinja chat templates, so :func:`cosmic_tl.templates.format_prompt`,
:func:`~cosmic_tl.templates.end_of_instruction` and
:func:`~cosmic_tl.templates.chat_prompts` work with them unchanged::

    model.tokenizer = use_prompt_format(model.tokenizer, "llama3")

``"chat_template"`` names the tokenizer's own template (the default; no change).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from cosmic_tl.templates import format_prompt

TOKENIZER_TEMPLATE = "chat_template"

# An instruction for the check that a format tokenises as the published code would.
_CHECK_INSTRUCTION = "Write a short poem about the sea, please."


class PromptFormatError(ValueError):
    """An unknown prompt format, or one that does not fit the tokenizer it is put on."""


@dataclass(frozen=True)
class _Format:
    """One published single-turn format: ``bos + user + instruction + end_of_user + generation``.

    ``bos`` is what the published wrapper left to the tokenizer to add; ``markers`` are
    the strings the tokenizer must hold as single tokens for the format to mean anything.
    """

    bos: str
    user: str
    end_of_user: str
    generation: str
    markers: tuple[str, ...]
    source: str


# Sources (read for the strings, not copied): the COSMIC repository (wang-research-lab/COSMIC,
# pipeline/model_utils/{llama3,qwen,gemma}_model.py) and Arditi et al.'s repository
# (andyrdt/refusal_direction, pipeline/model_utils/{llama2,yi}_model.py), which COSMIC's
# model factory also dispatches to.
_FORMATS: dict[str, _Format] = {
    # Published: "<|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|>
    # <|start_header_id|>assistant<|end_header_id|>\n\n"; <|begin_of_text|> comes from the
    # Llama-3 tokenizer. (Arditi's original string also wrote <|begin_of_text|> after a
    # stray '"', doubling the BOS; COSMIC's dropped both.)
    "llama3": _Format(
        bos="<|begin_of_text|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n",
        end_of_user="<|eot_id|>",
        generation="<|start_header_id|>assistant<|end_header_id|>\n\n",
        markers=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        source="COSMIC pipeline/model_utils/llama3_model.py (Llama-3, 3.1, 3.2, 3.3)",
    ),
    # ChatML without the default system turn; Qwen's tokenizer adds no BOS.
    "qwen": _Format(
        bos="",
        user="<|im_start|>user\n",
        end_of_user="<|im_end|>\n",
        generation="<|im_start|>assistant\n",
        markers=("<|im_start|>", "<|im_end|>"),
        source="COSMIC pipeline/model_utils/qwen_model.py (Qwen, Qwen2, Qwen2.5)",
    ),
    # Published string has no <bos>: the Gemma tokenizer (add_bos_token true) adds it.
    "gemma": _Format(
        bos="<bos>",
        user="<start_of_turn>user\n",
        end_of_user="<end_of_turn>\n",
        generation="<start_of_turn>model\n",
        markers=("<bos>", "<start_of_turn>", "<end_of_turn>"),
        source="COSMIC pipeline/model_utils/gemma_model.py (Gemma, Gemma-2)",
    ),
    # Published: "[INST] {instruction} [/INST] " with a trailing space (the wrappers keep
    # trailing whitespace); <s> comes from the Llama-2 tokenizer (add_bos_token true).
    # [INST] and [/INST] are plain text to Llama-2, so only <s> is a marker.
    "llama2": _Format(
        bos="<s>",
        user="[INST] ",
        end_of_user=" [/INST] ",
        generation="",
        markers=("<s>",),
        source="refusal_direction pipeline/model_utils/llama2_model.py (Llama-2 chat)",
    ),
    # ChatML like Qwen; Yi's tokenizer config has add_bos_token false.
    "yi": _Format(
        bos="",
        user="<|im_start|>user\n",
        end_of_user="<|im_end|>\n",
        generation="<|im_start|>assistant\n",
        markers=("<|im_start|>", "<|im_end|>"),
        source="refusal_direction pipeline/model_utils/yi_model.py (Yi chat)",
    ),
}


def _literal(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal (Jinja unescapes ``\\n``)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


def _template(name: str, fmt: _Format) -> str:
    """The Jinja chat template of one format.

    It renders exactly one user message. A system message is refused unless empty,
    because the published formats have no system turn and dropping a system prompt
    silently would hide a mistake; an empty one is the same as none.
    """
    no_system = _literal(f"the published {name} format has no system turn; pass no system prompt")
    one_user = _literal(f"the published {name} format renders exactly one user message")
    generation = (
        "{% if add_generation_prompt %}{{ " + _literal(fmt.generation) + " }}{% endif %}"
        if fmt.generation
        else ""
    )
    return (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% if messages[0]['content'] %}{{ raise_exception(" + no_system + ") }}{% endif %}"
        "{% set turns = messages[1:] %}"
        "{% else %}{% set turns = messages %}{% endif %}"
        "{% if turns | length != 1 or turns[0]['role'] != 'user' %}"
        "{{ raise_exception(" + one_user + ") }}{% endif %}"
        "{{ "
        + _literal(fmt.bos + fmt.user)
        + " + turns[0]['content'] + "
        + _literal(fmt.end_of_user)
        + " }}"
        + generation
    )


PROMPT_FORMATS: dict[str, str] = {name: _template(name, fmt) for name, fmt in _FORMATS.items()}
"""The published formats by name, as Jinja chat templates."""

FORMAT_NAMES: tuple[str, ...] = (TOKENIZER_TEMPLATE, *PROMPT_FORMATS)


def family_of(model_name: str) -> str | None:
    """A coarse model family from a model name, for default refusal tokens."""
    name = model_name.lower().replace("_", "-")
    if "llama-3" in name or "llama3" in name:
        return "llama-3"
    if "llama-2" in name or "llama2" in name:
        return "llama-2"
    for fam in ("gemma", "qwen"):
        if fam in name:
            return fam
    if re.search(r"(^|[/-])yi([-.]|$)", name):
        return "yi"
    return None


# The published code's hard-coded format per model family; other families use the
# tokenizer's own chat template (as the published code does for them).
FAMILY_FORMATS = {"llama-3": "llama3", "qwen": "qwen", "gemma": "gemma", "llama-2": "llama2", "yi": "yi"}


def published_format_for(model_name: str) -> str:
    """The prompt format the published code uses for a model of this name (``"auto"``):
    the family's hard-coded format, else ``"chat_template"``."""
    family = family_of(model_name)
    return FAMILY_FORMATS.get(family, TOKENIZER_TEMPLATE) if family else TOKENIZER_TEMPLATE


def _known() -> str:
    return ", ".join(repr(n) for n in FORMAT_NAMES)


def prompt_format(name: str) -> str:
    """The Jinja chat template of the published format ``name`` (see ``PROMPT_FORMATS``).

    ``"chat_template"`` is the tokenizer's own template and has no fixed text here; any
    other unknown name raises :class:`PromptFormatError` listing the known ones.

    >>> prompt_format("qwen")[:2]
    '{%'
    """
    if name in PROMPT_FORMATS:
        return PROMPT_FORMATS[name]
    if name == TOKENIZER_TEMPLATE:
        raise PromptFormatError(
            "'chat_template' is the tokenizer's own template (tokenizer.chat_template), "
            "not a fixed format; use_prompt_format(tokenizer, 'chat_template') keeps it"
        )
    raise PromptFormatError(f"unknown prompt format {name!r}; known formats: {_known()}")


def use_prompt_format(tokenizer: Any, name: str, *, check: bool = True) -> Any:
    """A copy of ``tokenizer`` whose ``chat_template`` is the prompt format ``name``.

    The tokenizer passed in is never changed (a model's tokenizer is shared by
    everything that runs it); assign the copy where it should apply, e.g.
    ``model.tokenizer = use_prompt_format(model.tokenizer, "gemma")``. With
    ``"chat_template"`` the copy keeps the tokenizer's own template.

    Raises :class:`PromptFormatError` if a marker of the format (``<|eot_id|>``,
    ``<start_of_turn>``, ...) is not one token of this tokenizer. With ``check`` it
    also raises unless a formatted prompt has the published code's tokens: the BOS,
    then the rest of the text tokenised as the start of a string, which is how the
    published ``tokenizer(prompts)`` call sees it. A sentencepiece tokenizer that does
    not put its word-start mark on text right after a special token fails this for
    ``llama2`` (``<s>[INST]``). That the family's tokenizer adds this BOS at all comes
    from its tokenizer config, not from ``tokenizer``: a model's tokenizer may be set
    to add a BOS (TransformerLens does so) that the published code's did not.
    """
    if name == TOKENIZER_TEMPLATE:
        return copy.deepcopy(tokenizer)
    template = prompt_format(name)
    fmt = _FORMATS[name]
    split = [m for m in fmt.markers if len(tokenizer(m, add_special_tokens=False)["input_ids"]) != 1]
    if split:
        raise PromptFormatError(
            f"the {name} format needs {', '.join(split)} as single tokens, and this tokenizer "
            f"splits them: it is not a tokenizer of that family ({fmt.source}). Add them with "
            "tokenizer.add_special_tokens(...) only to simulate one"
        )
    out = copy.deepcopy(tokenizer)
    out.chat_template = template
    if check:
        _check_published(out, name, fmt)
    return out


def _check_published(tokenizer: Any, name: str, fmt: _Format) -> None:
    """Raise unless the format's tokens equal the published code's for a sample prompt.

    The published wrappers tokenise ``user + instruction + end_of_user + generation`` with
    the tokenizer adding the BOS in front; here the BOS's own id stands for that, so a
    model tokenizer configured to add other special tokens does not confuse the check.
    """
    ours = list(
        tokenizer(format_prompt(tokenizer, _CHECK_INSTRUCTION), add_special_tokens=False)["input_ids"]
    )
    text = fmt.user + _CHECK_INSTRUCTION + fmt.end_of_user + fmt.generation
    bos = list(tokenizer(fmt.bos, add_special_tokens=False)["input_ids"]) if fmt.bos else []
    published = bos + list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if ours != published:
        raise PromptFormatError(
            f"with this tokenizer the {name} format does not give the published code's tokens: "
            f"format {ours[:6]}… ({len(ours)} tokens), published {published[:6]}… "
            f"({len(published)} tokens). The text after {fmt.bos!r} tokenises differently "
            "there than at the start of a string; pass check=False to use the format anyway"
        )
