"""Difference-in-means candidate directions for every (EOI position, layer).

``r[p, l] = mean_harmful[p, l] − mean_harmless[p, l]`` of ``blocks.{l}.hook_resid_pre``
(not normalised). The harmless mean is kept: it is the affine (ACE) reference.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxtyping import Float
from torch import Tensor

from cosmic_tl.activations import Means, PromptActivations, mean_activations, prompt_activations
from cosmic_tl.models.boot import model_id
from cosmic_tl.store import RecordError, load_record, record_paths, save_record
from cosmic_tl.templates import EOI, Prompts, end_of_instruction, prompts_for


class IncompatibleError(RecordError):
    """A saved result does not belong to this model or has the wrong shape."""


@dataclass(frozen=True)
class Candidates:
    """Candidate refusal directions ``[pos, layer, d_model]`` and the means behind them.

    ``eval_harmful`` / ``eval_harmless`` are the train sets' mean evaluation
    activations per layer, from which COSMIC picks its evaluation layers.
    """

    directions: Float[Tensor, "pos layer d_model"]
    harmful_mean: Float[Tensor, "pos layer d_model"]
    harmless_mean: Float[Tensor, "pos layer d_model"]
    eval_harmful: Float[Tensor, "layer d_model"]
    eval_harmless: Float[Tensor, "layer d_model"]
    positions: tuple[int, ...]
    position_labels: tuple[str, ...]
    eoi_token_ids: tuple[int, ...]
    model_id: str
    n_harmful: int
    n_harmless: int

    def __post_init__(self) -> None:
        k, n, d = self.directions.shape
        if self.harmful_mean.shape != (k, n, d) or self.harmless_mean.shape != (k, n, d):
            raise IncompatibleError("means and directions differ in shape")
        if self.eval_harmful.shape != (n, d) or self.eval_harmless.shape != (n, d):
            raise IncompatibleError("evaluation means must be [layer, d_model]")
        if not (len(self.positions) == len(self.position_labels) == len(self.eoi_token_ids) == k):
            raise IncompatibleError("positions, labels and EOI tokens must match the pos axis")

    @property
    def n_layers(self) -> int:
        return int(self.directions.shape[1])

    @property
    def d_model(self) -> int:
        return int(self.directions.shape[2])

    def pos_index(self, position: int) -> int:
        """Index on the pos axis of a position counted from the end (e.g. -1)."""
        if position not in self.positions:
            raise KeyError(f"position {position} not among {self.positions}")
        return self.positions.index(position)

    def direction(self, position: int, layer: int) -> Float[Tensor, " d_model"]:
        return self.directions[self.pos_index(position), layer]

    def reference(self, position: int, layer: int) -> Float[Tensor, " d_model"]:
        """The harmless mean at (position, layer): the affine reference μ⁻."""
        return self.harmless_mean[self.pos_index(position), layer]

    def check_compatible(self, model: Any) -> None:
        """Raise :class:`IncompatibleError` if these candidates are not from ``model``."""
        cfg = model.cfg
        if (cfg.n_layers, cfg.d_model) != (self.n_layers, self.d_model):
            raise IncompatibleError(
                f"candidates are for {self.n_layers} layers × d_model {self.d_model}, the "
                f"model has {cfg.n_layers} × {cfg.d_model} (computed for {self.model_id!r})"
            )
        if model_id(model) != self.model_id:
            raise IncompatibleError(
                f"candidates were computed on {self.model_id!r}, not {model_id(model)!r}"
            )

    # ------------------------------------------------------------ save / load

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json``; returns the tensor file."""
        save_record(
            path,
            KIND,
            {name: getattr(self, name) for name in _TENSORS},
            {
                "positions": list(self.positions),
                "position_labels": list(self.position_labels),
                "eoi_token_ids": list(self.eoi_token_ids),
                "model_id": self.model_id,
                "n_harmful": self.n_harmful,
                "n_harmless": self.n_harmless,
            },
        )
        return record_paths(path)[0]

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: Any | None = None) -> Candidates:
        """Load saved candidates; with ``model``, check they belong to it."""
        try:
            t, meta = load_record(path, KIND)
            out = cls(
                t["directions"],
                t["harmful_mean"],
                t["harmless_mean"],
                t["eval_harmful"],
                t["eval_harmless"],
                tuple(meta["positions"]),
                tuple(meta["position_labels"]),
                tuple(meta["eoi_token_ids"]),
                str(meta["model_id"]),
                int(meta["n_harmful"]),
                int(meta["n_harmless"]),
            )
        except RecordError as err:
            raise IncompatibleError(str(err)) from err
        except KeyError as err:
            raise IncompatibleError(f"{path}: missing field {err}") from err
        if model is not None:
            out.check_compatible(model)
        return out


KIND = "cosmic_tl.Candidates"
_TENSORS = ("directions", "harmful_mean", "harmless_mean", "eval_harmful", "eval_harmless")


def _prepared(
    model: Any, harmful: Sequence[str] | Prompts, harmless: Sequence[str] | Prompts
) -> tuple[Prompts, Prompts, EOI]:
    """Both training sets as :class:`Prompts` and their end-of-instruction tokens."""
    if not harmful or not harmless:
        raise ValueError("need at least one harmful and one harmless prompt")
    harmful, harmless = prompts_for(model, harmful), prompts_for(model, harmless)
    if harmful.system != harmless.system:
        raise ValueError("harmful and harmless prompts were formatted with different system prompts")
    return harmful, harmless, end_of_instruction(model.tokenizer, harmful.system)


def _from_means(
    mh: Means, ml: Means, eoi: EOI, model: str, n_harmful: int, n_harmless: int
) -> Candidates:
    assert mh.eoi is not None and ml.eoi is not None
    return Candidates(
        directions=mh.eoi - ml.eoi,
        harmful_mean=mh.eoi,
        harmless_mean=ml.eoi,
        eval_harmful=mh.eval,
        eval_harmless=ml.eval,
        positions=eoi.positions,
        position_labels=eoi.labels,
        eoi_token_ids=eoi.token_ids,
        model_id=model,
        n_harmful=n_harmful,
        n_harmless=n_harmless,
    )


def compute_candidates(
    model: Any,
    harmful: Sequence[str] | Prompts,
    harmless: Sequence[str] | Prompts,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> Candidates:
    """Difference-in-means candidates from harmful and harmless training prompts.

    Plain strings are formatted with the template's default system prompt; pass
    :func:`~cosmic_tl.templates.chat_prompts` results for another one (both sets must
    use the same system prompt, since it decides the end-of-instruction tokens).

    >>> cands = compute_candidates(model, harmful_train, harmless_train)  # doctest: +SKIP
    >>> cands.directions.shape  # [k EOI positions, n layers, d_model]     # doctest: +SKIP
    """
    harmful, harmless, eoi = _prepared(model, harmful, harmless)
    kw: dict[str, Any] = {"n_eoi": len(eoi.token_ids), "batch_size": batch_size}
    mh = mean_activations(model, harmful, progress=progress, desc="harmful means", **kw)
    ml = mean_activations(model, harmless, progress=progress, desc="harmless means", **kw)
    return _from_means(mh, ml, eoi, model_id(model), len(harmful), len(harmless))


@dataclass(frozen=True)
class TrainActivations:
    """Both training sets' activations per prompt: candidates for any prompt weights.

    A bootstrap resample of the training prompts is a multiset of them, i.e. a count
    per prompt; :meth:`candidates` with those counts equals :func:`compute_candidates`
    on the resampled lists (up to float64 summation order), without a model pass.
    """

    harmful: PromptActivations
    harmless: PromptActivations
    eoi: EOI
    model_id: str

    def candidates(
        self,
        harmful_weights: Float[Tensor, " harmful"] | None = None,
        harmless_weights: Float[Tensor, " harmless"] | None = None,
    ) -> Candidates:
        """Candidates with each prompt counted ``weights[i]`` times (default once)."""
        mh, ml = self.harmful.means(harmful_weights), self.harmless.means(harmless_weights)
        n_h = len(self.harmful) if harmful_weights is None else round(float(harmful_weights.sum()))
        n_l = len(self.harmless) if harmless_weights is None else round(float(harmless_weights.sum()))
        return _from_means(mh, ml, self.eoi, self.model_id, n_h, n_l)


def train_activations(
    model: Any,
    harmful: Sequence[str] | Prompts,
    harmless: Sequence[str] | Prompts,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> TrainActivations:
    """The per-prompt activations behind :func:`compute_candidates` (one pass per set)."""
    harmful, harmless, eoi = _prepared(model, harmful, harmless)
    kw: dict[str, Any] = {"n_eoi": len(eoi.token_ids), "batch_size": batch_size}
    ah = prompt_activations(model, harmful, progress=progress, desc="harmful activations", **kw)
    al = prompt_activations(model, harmless, progress=progress, desc="harmless activations", **kw)
    return TrainActivations(ah, al, eoi, model_id(model))
