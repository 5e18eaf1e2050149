"""Streaming float64 means of activations over prompt sets.

Two kinds of activation are read, in one forward pass per batch:

- ``resid_pre`` of every block at the end-of-instruction positions (candidates);
- the *evaluation activation* of every layer at the last token (COSMIC's scores):
  ``blocks.{j}.hook_resid_post`` for ``j < n-1`` and the final norm's output for the
  last block — what Hugging Face returns as ``hidden_states[1:]``.

Only running sums are kept, so memory does not grow with the number of prompts.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from cosmic_tl.models.boot import model_id
from cosmic_tl.templates import Batch, Prompts, prompts_for


def eval_hook_names(n_layers: int) -> list[str]:
    """Hook names of the evaluation activations, one per layer."""
    return [f"blocks.{j}.hook_resid_post" for j in range(n_layers - 1)] + ["ln_final.hook_out"]


def resid_pre_names(n_layers: int) -> list[str]:
    """Hook names of every block's input."""
    return [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]


def check_hook_points(
    model: str, available: Collection[str] | None, names: Sequence[str], purpose: str
) -> list[str]:
    """``names``, or a ``ValueError`` naming ``model`` and the first hook point of
    ``names`` not in ``available`` (``None``: assume the bridge's standard names)."""
    missing = [] if available is None else [n for n in names if n not in available]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{model} has no hook point {missing[0]!r}{more}, which {purpose} needs")
    return list(names)


def require_hook_points(model: Any, names: Sequence[str], purpose: str) -> list[str]:
    """``names``, or a ``ValueError`` naming the model and the hook points it lacks.

    A bridge of an architecture that TransformerBridge maps differently may not offer
    a hook point cosmic_tl reads, and ``run_with_cache`` would silently leave it out
    of the cache; this says which one, and what needs it, before any work.
    """
    return check_hook_points(model_id(model), frozenset(model.hook_dict), names, purpose)


def last_logits_only(model: Any) -> dict[str, Any]:
    """Keyword arguments that make the model's forward unembed the last position only.

    Hugging Face causal LMs take ``logits_to_keep``; the bridge passes it through, so
    ``run_with_cache`` then returns logits ``[batch, 1, d_vocab]`` instead of one row
    per position. Empty (every position unembedded) for a model that does not take it.
    """
    forward = getattr(getattr(model, "original_model", None), "forward", None)
    try:
        accepts = forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        accepts = False
    return {"logits_to_keep": 1} if accepts else {}


@dataclass(frozen=True)
class Means:
    """Means over a prompt set (float64)."""

    eoi: Float[Tensor, "pos layer d_model"] | None  # resid_pre at EOI positions
    eval: Float[Tensor, "layer d_model"]  # last-token evaluation activations


@dataclass(frozen=True)
class PromptActivations:
    """Every prompt's activations, in prompt order, in the model's dtype.

    What :func:`mean_activations` streams into sums, kept per prompt so that means with
    per-prompt weights (a bootstrap resample's multiplicities) need no model pass.
    :meth:`means` in float64 equals :func:`mean_activations` on the list that repeats
    each prompt by its weight, up to the order of float64 summation.
    """

    eoi: Float[Tensor, "prompt pos layer d_model"] | None  # resid_pre at EOI positions
    eval: Float[Tensor, "prompt layer d_model"]  # last-token evaluation activations

    def __len__(self) -> int:
        return int(self.eval.shape[0])

    def means(self, weights: Float[Tensor, " prompt"] | None = None) -> Means:
        """Float64 means over prompts, each counted ``weights[i]`` times (default once)."""
        n = len(self)
        w = torch.ones(n, dtype=torch.float64) if weights is None else weights.double()
        if w.shape != (n,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"need {n} non-negative weights with a positive sum, got {tuple(w.shape)}")
        total = float(w.sum())
        eoi = None if self.eoi is None else _weighted_sum(self.eoi, w) / total
        return Means(eoi, _weighted_sum(self.eval, w) / total)


def _weighted_sum(x: Tensor, w: Tensor) -> Tensor:
    """``Σ_i w[i] · x[i]`` in float64, one prompt at a time (no float64 copy of ``x``)."""
    out = torch.zeros(x.shape[1:], dtype=torch.float64)
    for i in torch.nonzero(w).flatten().tolist():
        out += float(w[i]) * x[i].double()
    return out


def _batch_activations(
    model: Any, prompts: Prompts, n_eoi: int, batch_size: int, progress: bool, desc: str
) -> Iterator[tuple[Batch, Tensor | None, Tensor]]:
    """Per batch: ``(batch, resid_pre at the last n_eoi positions [b, pos, layer, d_model]
    or None, evaluation activations [b, layer, d_model])``, on the CPU."""
    n_layers = model.cfg.n_layers
    eval_names = eval_hook_names(n_layers)
    pre_names = resid_pre_names(n_layers) if n_eoi else []
    wanted = set(require_hook_points(model, [*pre_names, *eval_names], "computing the activation means"))
    width = max(n_eoi, 1)
    for batch in tqdm(prompts.batches(batch_size), desc=desc, disable=not progress, leave=False):
        _, cache = model.run_with_cache(
            batch.tokens.to(_device(model)),
            attention_mask=batch.attention_mask.to(_device(model)),
            names_filter=lambda name: name in wanted,
            pos_slice=slice(-width, None),
            **last_logits_only(model),
        )
        eoi = torch.stack([cache[name].cpu() for name in pre_names], dim=2) if n_eoi else None
        evals = torch.stack([cache[name][:, -1].cpu() for name in eval_names], dim=1)
        yield batch, eoi, evals


@torch.no_grad()
def mean_activations(
    model: Any,
    prompts: Sequence[str] | Prompts,
    *,
    n_eoi: int,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "activations",
) -> Means:
    """Mean ``resid_pre`` at the last ``n_eoi`` positions and mean evaluation activations.

    ``n_eoi=0`` skips the ``resid_pre`` means (evaluation activations only).
    """
    prompts = prompts_for(model, prompts)
    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    eoi_sum = torch.zeros(n_eoi, n_layers, d_model, dtype=torch.float64)
    eval_sum = torch.zeros(n_layers, d_model, dtype=torch.float64)
    for _, eoi, evals in _batch_activations(model, prompts, n_eoi, batch_size, progress, desc):
        if eoi is not None:
            eoi_sum += eoi.double().sum(0)
        eval_sum += evals.double().sum(0)
    n = len(prompts)
    return Means(eoi_sum / n if n_eoi else None, eval_sum / n)


@torch.no_grad()
def prompt_activations(
    model: Any,
    prompts: Sequence[str] | Prompts,
    *,
    n_eoi: int,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "activations",
) -> PromptActivations:
    """The activations :func:`mean_activations` averages, kept for every prompt."""
    prompts = prompts_for(model, prompts)
    n = len(prompts)
    eoi: Tensor | None = None
    evals: Tensor | None = None
    for batch, b_eoi, b_eval in _batch_activations(model, prompts, n_eoi, batch_size, progress, desc):
        rows = list(batch.index)
        if evals is None:
            evals = torch.empty(n, *b_eval.shape[1:], dtype=b_eval.dtype)
            if b_eoi is not None:
                eoi = torch.empty(n, *b_eoi.shape[1:], dtype=b_eoi.dtype)
        evals[rows] = b_eval
        if eoi is not None and b_eoi is not None:
            eoi[rows] = b_eoi
    assert evals is not None
    return PromptActivations(eoi, evals)


def _device(model: Any) -> torch.device:
    """The device of the model's input embedding (where tokens must go)."""
    return next(model.parameters()).device
