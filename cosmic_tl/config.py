"""Typed settings, with the COSMIC reference code's defaults, and presets.

``Config`` is flat so that the command line maps 1:1 onto it: every field is a
``--field-name`` option (see :mod:`cosmic_tl.cli`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["ace", "lce"]


@dataclass(frozen=True)
class SelectionSettings:
    """Filters and thresholds of both selection methods (reference defaults)."""

    eval_layer_fraction: float = field(
        default=0.10,
        metadata={"help": "fraction of layers (least similar first) COSMIC evaluates at"},
    )
    max_layer_fraction: float = field(
        default=0.80, metadata={"help": "discard candidates at layers >= this fraction of n_layers"}
    )
    kl_threshold: float = field(
        default=0.1, metadata={"help": "discard candidates whose harmless-prompt KL exceeds this"}
    )
    last_position_rule: bool = field(
        default=True, metadata={"help": "COSMIC's rule that prunes late layers at position -1"}
    )
    induce_threshold: float = field(
        default=0.0, metadata={"help": "baseline: discard candidates with induce score below this"}
    )


@dataclass(frozen=True)
class Config:
    """Everything a run depends on. Defaults: the CPU preset."""

    model: str = field(default="smollm2-135m-refuse", metadata={"help": "alias, local dir or hub name"})
    mode: Mode = field(default="ace", metadata={"help": "ace (affine) or lce (linear) interventions"})
    alpha: float = field(default=1.0, metadata={"help": "activation-addition coefficient"})
    system_prompt: str | None = field(
        default=None, metadata={"help": "system prompt text; unset = the template's default"}
    )
    harmful_train: str = field(default="bundled:harmful:train", metadata={"help": "prompt source"})
    harmless_train: str = field(default="bundled:harmless:train", metadata={"help": "prompt source"})
    harmful_val: str = field(default="bundled:harmful:val", metadata={"help": "prompt source"})
    harmless_val: str = field(default="bundled:harmless:val", metadata={"help": "prompt source"})
    harmful_test: str = field(default="bundled:harmful:test", metadata={"help": "prompt source"})
    harmless_test: str = field(default="bundled:harmless:test", metadata={"help": "prompt source"})
    n_train: int = field(default=64, metadata={"help": "prompts per training set"})
    n_val: int = field(default=16, metadata={"help": "prompts per validation set"})
    n_test: int = field(default=32, metadata={"help": "prompts per test set"})
    seed: int = field(default=42, metadata={"help": "seed for prompt sampling"})
    batch_size: int = field(default=32, metadata={"help": "prompts per forward pass"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens generated in evaluation"})
    refusal_tokens: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "baseline refusal tokens (strings); 'auto' = suggested by the "
            "model; unset = per model family"
        },
    )
    filter_prompts: bool = field(
        default=False, metadata={"help": "baseline: keep val prompts the model refuses/answers"}
    )
    baseline: bool = field(default=True, metadata={"help": "also run the refusal-token baseline"})
    full_grids: bool = field(
        default=False,
        metadata={"help": "score every candidate (slower) instead of only those that can change a pick"},
    )
    reuse_prefix: bool = field(
        default=True, metadata={"help": "cache clean activations to skip unchanged layers"}
    )
    share_prefix: bool = field(
        default=True,
        metadata={"help": "compute the tokens all prompts start with (system turn) once per pass"},
    )
    dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ...; unset = auto"})
    selection: SelectionSettings = field(default_factory=SelectionSettings)

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (selection fields may be given flat)."""
        sel = {k: changes.pop(k) for k in list(changes) if k in _SELECTION_FIELDS}
        if sel:
            changes["selection"] = dataclasses.replace(self.selection, **sel)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["refusal_tokens"] = list(self.refusal_tokens) if self.refusal_tokens else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        data = dict(data)
        sel = SelectionSettings(**data.pop("selection", {}))
        if data.get("refusal_tokens") is not None:
            data["refusal_tokens"] = tuple(data["refusal_tokens"])
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**data, selection=sel)


_SELECTION_FIELDS = {f.name for f in dataclasses.fields(SelectionSettings)}

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "paper": {"n_train": 180, "n_val": 100, "n_test": 512, "max_new_tokens": 512},
    "arditi": {"n_train": 128, "n_val": 32, "n_test": 100, "max_new_tokens": 512},
}


def preset(name: str, **overrides: Any) -> Config:
    """The named preset (``cpu``, ``paper``, ``arditi``) with optional overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return Config().replace(**{**PRESETS[name], **overrides})


def torch_dtype(name: str) -> Any:
    """``torch.float32`` etc. from a config string."""
    import torch

    table = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float64": torch.float64,
    }
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(table)}")
    return table[name]
