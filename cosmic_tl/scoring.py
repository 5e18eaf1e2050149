"""The metrics: COSMIC's cosine scores, the refusal-token score and KL (pure maths).

Nothing here runs a model; :mod:`cosmic_tl.sweep` feeds these functions the
activations and logits it collects.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from cosmic_tl.config import Mode
from cosmic_tl.formats import family_of
from cosmic_tl.store import load_record, save_record

KL_EPS = 1e-6
REFUSAL_EPS = 1e-8

# Reference defaults per model family (COSMIC code / Arditi et al.); "I" otherwise.
FAMILY_REFUSAL_TOKENS: dict[str, tuple[str, ...]] = {
    "llama-3": ("I",),
    "gemma": ("I",),
    "qwen": ("I", "As"),
    "llama-2": ("I",),
}


def cosine(a: Float[Tensor, " d_model"], b: Float[Tensor, " d_model"]) -> float:
    """Cosine similarity in float64."""
    a64, b64 = a.double(), b.double()
    return float((a64 @ b64) / (a64.norm() * b64.norm()))


def layer_cosines(
    harmful: Float[Tensor, "layer d_model"], harmless: Float[Tensor, "layer d_model"]
) -> Float[Tensor, " layer"]:
    """Per-layer cosine of the harmful and harmless mean evaluation activations."""
    h, l_ = harmful.double(), harmless.double()
    return (h * l_).sum(-1) / (h.norm(dim=-1) * l_.norm(dim=-1))


def evaluation_layers(cosines: Float[Tensor, " layer"], fraction: float = 0.10) -> tuple[int, ...]:
    """COSMIC's ``L_low``: the ``⌊fraction·n⌋`` least similar layers (at least one)."""
    n = cosines.shape[0]
    count = max(1, math.floor(fraction * n))
    order = torch.argsort(cosines, stable=True)
    return tuple(int(i) for i in order[:count])


def pooled(
    eval_sums: Float[Tensor, "layer d_model"], layers: Sequence[int]
) -> Float[Tensor, " d_model"]:
    """Mean over prompts and evaluation layers, normalised.

    ``eval_sums`` may hold sums or means over prompts: the result is normalised, so
    the prompt count cancels.
    """
    v = eval_sums[list(layers)].double().mean(0)
    return v / v.norm()


def refusal_score(
    logits: Float[Tensor, "batch d_vocab"], token_ids: Sequence[int]
) -> Float[Tensor, " batch"]:
    """Arditi's refusal score ``log P_R − log(1 − P_R)`` of the next token (float64)."""
    probs = torch.softmax(logits.double(), dim=-1)
    p_r = probs[:, list(token_ids)].sum(-1)
    return torch.log(p_r + REFUSAL_EPS) - torch.log(1 - p_r + REFUSAL_EPS)


def kl_divergence(
    clean_logits: Float[Tensor, "batch d_vocab"], other_logits: Float[Tensor, "batch d_vocab"]
) -> Float[Tensor, " batch"]:
    """``KL(P_clean ‖ P_other)`` per prompt, as the reference computes it.

    ``Σ p_a (log(p_a + ε) − log(p_b + ε))`` in float64 with ``ε = 1e-6``.
    """
    p = torch.softmax(clean_logits.double(), dim=-1)
    q = torch.softmax(other_logits.double(), dim=-1)
    return (p * (torch.log(p + KL_EPS) - torch.log(q + KL_EPS))).sum(-1)


def default_refusal_tokens(model_name: str) -> tuple[str, ...]:
    """The reference's refusal tokens for the model's family, else ``("I",)``."""
    fam = family_of(model_name)
    return FAMILY_REFUSAL_TOKENS.get(fam, ("I",)) if fam else ("I",)


def encode_refusal_tokens(tokenizer: Any, strings: Sequence[str]) -> tuple[int, ...]:
    """Encode refusal-token strings with the tokenizer (first token, warned if several)."""
    if not strings:
        raise ValueError("need at least one refusal token string")
    ids = []
    for s in strings:
        enc = tokenizer.encode(s, add_special_tokens=False)
        if not enc:
            raise ValueError(f"refusal token {s!r} encodes to no token")
        if len(enc) > 1:
            warnings.warn(
                f"refusal token {s!r} encodes to {len(enc)} tokens; using the first, "
                f"{tokenizer.decode(enc[:1])!r}",
                stacklevel=2,
            )
        ids.append(int(enc[0]))
    return tuple(dict.fromkeys(ids))


def refusal_token_gap(
    harmful_logits: Float[Tensor, "batch d_vocab"],
    harmless_logits: Float[Tensor, "batch d_vocab"],
    k: int = 2,
) -> Int[Tensor, " k"]:
    """Token ids whose first-token probability rises most from harmless to harmful prompts."""
    gap = torch.softmax(harmful_logits.double(), -1).mean(0) - torch.softmax(
        harmless_logits.double(), -1
    ).mean(0)
    return torch.topk(gap, k).indices


@dataclass(frozen=True)
class Scores:
    """Every candidate's scores as ``[pos, layer]`` grids, and what they were measured against.

    Grid names: ``S_abl``, ``S_add``, ``KL`` and, with the baseline, ``bypass`` and
    ``induce``. A cell the engine skipped (it could not change a pick) is NaN and
    ``computed[name][pos, layer]`` is False.
    """

    grids: dict[str, Float[Tensor, "pos layer"]]
    computed: dict[str, Bool[Tensor, "pos layer"]]
    positions: tuple[int, ...]
    position_labels: tuple[str, ...]
    eval_layers: tuple[int, ...]
    layer_cosines: Float[Tensor, " layer"]
    b_harmful: Float[Tensor, " d_model"]
    b_harmless: Float[Tensor, " d_model"]
    mode: Mode
    alpha: float
    model_id: str
    refusal_tokens: tuple[str, ...] = ()
    refusal_token_ids: tuple[int, ...] = ()
    clean: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)  # work done: passes, GFLOP, seconds

    @property
    def n_layers(self) -> int:
        return int(self.layer_cosines.shape[0])

    def save(self, path: str | os.PathLike[str]) -> Path:
        tensors = {f"grid.{k}": v for k, v in self.grids.items()}
        tensors |= {f"computed.{k}": v.to(torch.uint8) for k, v in self.computed.items()}
        tensors |= {
            "layer_cosines": self.layer_cosines,
            "b_harmful": self.b_harmful,
            "b_harmless": self.b_harmless,
        }
        return save_record(
            path,
            KIND,
            tensors,
            {
                "positions": list(self.positions),
                "position_labels": list(self.position_labels),
                "eval_layers": list(self.eval_layers),
                "mode": self.mode,
                "alpha": self.alpha,
                "model_id": self.model_id,
                "refusal_tokens": list(self.refusal_tokens),
                "refusal_token_ids": list(self.refusal_token_ids),
                "clean": self.clean,
                "stats": self.stats,
                "grids": sorted(self.grids),
            },
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Scores:
        t, meta = load_record(path, KIND)
        return cls(
            grids={k: t[f"grid.{k}"] for k in meta["grids"]},
            computed={k: t[f"computed.{k}"].bool() for k in meta["grids"]},
            positions=tuple(meta["positions"]),
            position_labels=tuple(meta["position_labels"]),
            eval_layers=tuple(meta["eval_layers"]),
            layer_cosines=t["layer_cosines"],
            b_harmful=t["b_harmful"],
            b_harmless=t["b_harmless"],
            mode=meta["mode"],
            alpha=float(meta["alpha"]),
            model_id=meta["model_id"],
            refusal_tokens=tuple(meta["refusal_tokens"]),
            refusal_token_ids=tuple(meta["refusal_token_ids"]),
            clean=dict(meta["clean"]),
            stats=dict(meta.get("stats", {})),
        )


KIND = "cosmic_tl.Scores"
