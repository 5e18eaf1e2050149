"""Typed settings, with the COSMIC reference code's defaults, and presets.

``Config`` is flat so that the command line maps 1:1 onto it: every field is a
``--field-name`` option (see :mod:`cosmic_tl.cli`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["ace", "lce"]
DTYPES = ("float32", "float16", "bfloat16", "float64")
# The refusal-token baselines a run can put beside COSMIC (cosmic_tl.selection).
BASELINE_METHODS = ("refusal_tokens", "substring")
# Prompt formats (cosmic_tl.formats): the tokenizer's own template, the published choice
# for the model's family, or one published format by name.
PromptFormat = Literal["chat_template", "auto", "llama3", "qwen", "gemma", "llama2", "yi"]
PROMPT_FORMAT_CHOICES: tuple[str, ...] = typing.get_args(PromptFormat)
Sampling = Literal["per_set", "reference"]
Placement = Literal["residual", "published"]


class ConfigError(ValueError):
    """A setting outside its meaning; the message names the option."""


def _option(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _check(ok: bool, name: str, value: Any, meaning: str) -> None:
    if not ok:
        raise ConfigError(f"{_option(name)} must be {meaning}, not {value!r}")


def _finite(name: str, value: Any) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    _check(is_number and math.isfinite(value), name, value, "a finite number")


def _fraction(name: str, value: Any) -> None:
    _finite(name, value)
    _check(0.0 < value <= 1.0, name, value, "a fraction in (0, 1]")


def _at_least_one(name: str, value: Any) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    _check(ok, name, value, "a whole number of at least 1")


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

    substring_layer_fraction: float = field(
        default=0.6,
        metadata={
            "help": "substring baseline: discard position -1 at layers >= int(this·n_layers) "
            "(the COSMIC paper's prune_layer_percentage 0.4)"
        },
    )

    def __post_init__(self) -> None:
        _fraction("eval_layer_fraction", self.eval_layer_fraction)
        _fraction("substring_layer_fraction", self.substring_layer_fraction)
        _fraction("max_layer_fraction", self.max_layer_fraction)
        _finite("kl_threshold", self.kl_threshold)
        _check(self.kl_threshold >= 0, "kl_threshold", self.kl_threshold, "at least 0 (a KL divergence)")
        _finite("induce_threshold", self.induce_threshold)


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
    baseline: bool = field(default=True, metadata={"help": "also run refusal-token baselines"})
    baselines: tuple[str, ...] = field(
        default=("refusal_tokens",),
        metadata={
            "help": "which baselines: refusal_tokens (Arditi et al., linear interventions), "
            "substring (the COSMIC paper's comparison, the mode's interventions)"
        },
    )
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
    prompt_format: PromptFormat = field(
        default="chat_template",
        metadata={
            "help": "chat_template (the tokenizer's own), auto (the published format for the "
            "model's family), or one of llama3, qwen, gemma, llama2, yi"
        },
    )
    sampling: Sampling = field(
        default="per_set",
        metadata={
            "help": "per_set: each prompt set sampled with its own seeded generator; reference: "
            "the published pipeline's one random.seed stream over the four train/val sets"
        },
    )
    inplace_addition: bool = field(
        default=False,
        metadata={"help": "LCE S_add as the published in-place hook reads it (seen at layer l-1 too)"},
    )
    ablation_placement: Placement = field(
        default="residual",
        metadata={
            "help": "LCE ablation on post-norm models: residual (what is added to the stream) "
            "or published (sub-layer outputs before the post-norms)"
        },
    )
    dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ...; unset = auto"})
    selection: SelectionSettings = field(default_factory=SelectionSettings)

    def __post_init__(self) -> None:
        _check(self.mode in ("ace", "lce"), "mode", self.mode, "'ace' or 'lce'")
        _finite("alpha", self.alpha)
        for name in ("n_train", "n_val", "n_test", "batch_size", "max_new_tokens"):
            _at_least_one(name, getattr(self, name))
        _check(isinstance(self.seed, int), "seed", self.seed, "a whole number")
        _check(self.dtype in DTYPES, "dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        if self.refusal_tokens is not None:
            ok = len(self.refusal_tokens) > 0 and all(
                isinstance(t, str) and t for t in self.refusal_tokens
            )
            _check(ok, "refusal_tokens", self.refusal_tokens, "one or more non-empty strings")
            if "auto" in self.refusal_tokens and len(self.refusal_tokens) > 1:
                raise ConfigError("--refusal-tokens auto cannot be combined with other tokens")
        bad = [b for b in self.baselines if b not in BASELINE_METHODS]
        _check(
            not bad and len(self.baselines) > 0,
            "baselines",
            self.baselines,
            f"some of {BASELINE_METHODS}",
        )
        _check(
            self.prompt_format in PROMPT_FORMAT_CHOICES,
            "prompt_format",
            self.prompt_format,
            f"one of {', '.join(PROMPT_FORMAT_CHOICES)}",
        )
        _check(
            self.sampling in ("per_set", "reference"), "sampling", self.sampling, "per_set or reference"
        )
        placements = ("residual", "published")
        _check(
            self.ablation_placement in placements,
            "ablation_placement",
            self.ablation_placement,
            "residual or published",
        )
        _check(bool(self.model), "model", self.model, "a model alias, directory or hub name")

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (selection fields may be given flat)."""
        sel = {k: changes.pop(k) for k in list(changes) if k in _SELECTION_FIELDS}
        if sel:
            changes["selection"] = dataclasses.replace(self.selection, **sel)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["refusal_tokens"] = list(self.refusal_tokens) if self.refusal_tokens else None
        out["baselines"] = list(self.baselines)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        data = dict(data)
        sel = SelectionSettings(**data.pop("selection", {}))
        for name in ("refusal_tokens", "baselines"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**data, selection=sel)


_SELECTION_FIELDS = {f.name for f in dataclasses.fields(SelectionSettings)}

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "paper": {"n_train": 180, "n_val": 100, "n_test": 512, "max_new_tokens": 512},
    "arditi": {"n_train": 128, "n_val": 32, "n_test": 100, "max_new_tokens": 512},
    # The published COSMIC pipeline as it runs (cosmic-method.md §4d), at the paper's sizes.
    "reference": {
        "n_train": 180,
        "n_val": 100,
        "n_test": 512,
        "max_new_tokens": 512,
        "prompt_format": "auto",
        "sampling": "reference",
        "inplace_addition": True,
        "ablation_placement": "published",
    },
}


def preset(name: str, **overrides: Any) -> Config:
    """The named preset (``cpu``, ``paper``, ``arditi``, ``reference``) with optional overrides."""
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


def check_device(device: str | None) -> None:
    """Raise :class:`ConfigError` if ``device`` (``--device``) is not usable here.

    ``None`` (auto) is always fine. Checked before a run starts, so that a missing GPU
    is one clear line instead of a traceback later.
    """
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"--device {device!r} is not a device torch knows: {err}") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                f"built {'with' if torch.version.cuda else 'without'} CUDA; no GPU visible). "
                "Use --device cpu or leave --device unset"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        return
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(
                f"--device {device}: Apple MPS is not available here (it needs macOS on Apple "
                "silicon). Use --device cpu or leave --device unset"
            )
        return
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise ConfigError(f"--device {device}: no {dev.type} device is available here")
