"""Export a direction: as safetensors, and as a model with it orthogonalised out of the weights.

Removing ``r̂`` from every weight that writes into the residual stream (token and
position embeddings, attention output and MLP output projections, and their biases)
is exactly linear directional ablation at every layer (LCE), without hooks, on blocks
that add the sub-layers' outputs to the residual stream as they are (Llama, Qwen2,
Mistral, Phi-3: both placements of LCE ablation are the same hook points there)::

    W ← W − r̂ r̂ᵀ W      (matrices writing into the residual stream)

**Post-norm blocks (Gemma 2 and 3)** add ``post_norm(attn(x))`` and
``post_norm(mlp(x))``. The edit removes ``r̂`` from the attention and MLP outputs
*before* the post-norms, whose elementwise scale puts some of it back into the
residual stream, and nothing removes it again from the blocks' inputs. The edited
model therefore equals neither LCE ablation placement: not ``"residual"`` (which
removes ``r̂`` after the post-norms) and not ``"published"`` either (which also
removes it from every block's input). It equals hooks on ``blocks.0.hook_resid_pre``,
``attn.hook_out`` and ``mlp.hook_out`` alone (measured on tiny random Gemma 2/3 to
1e-6). No weight edit reproduces either placement there, since an RMSNorm's
elementwise scale cannot be made to keep a vector orthogonal to ``r̂``;
:func:`orthogonalize` warns (:class:`PostNormWarning`).

The edited model is saved as an ordinary Hugging Face directory. ACE (affine) ablation
is a one-layer edit that has no equivalent weight change here; export LCE.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from jaxtyping import Float
from torch import Tensor, nn

from cosmic_tl.interventions import HookPoints, unit
from cosmic_tl.models.boot import model_id
from cosmic_tl.selection import Selection
from cosmic_tl.store import load_record, save_record

DIRECTION_KIND = "cosmic_tl.Direction"


class PostNormWarning(UserWarning):
    """Orthogonalised weights do not equal hook-based LCE ablation on this model."""


def save_direction(
    path: str | os.PathLike[str], sel: Selection, *, model: str, alpha: float = 1.0
) -> Path:
    """A pick's direction and affine reference as a record, with a card on how to use it."""
    if sel.direction is None or sel.reference is None:
        raise ValueError(f"{sel.method} has no picked direction to save: {sel.message}")
    card = {
        "format": "safetensors with 'direction' [d_model] (r = μ_harmful − μ_harmless, not "
        "normalised) and 'reference' [d_model] (μ_harmless, the affine reference)",
        "model": model,
        "method": sel.method,
        "position": sel.position,
        "layer": sel.layer,
        "hook": f"blocks.{sel.layer}.hook_resid_pre",
        "mode": sel.mode,
        "alpha": alpha,
        "scores": sel.scores,
        "use": "cosmic_tl.Intervention('ablate'|'add', mode, direction, layer, reference)",
    }
    return save_record(
        path, DIRECTION_KIND, {"direction": sel.direction, "reference": sel.reference}, card
    )


def load_direction(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """``(direction, reference, card)`` from a record written by :func:`save_direction`
    (a run's ``direction.safetensors`` + ``direction.json``)."""
    t, meta = load_record(path, DIRECTION_KIND)
    return t["direction"], t.get("reference"), meta


def _writers(model: Any) -> list[nn.Module]:
    """HF modules whose outputs are added to the residual stream, found via the bridge."""
    mods: list[nn.Module] = [model.embed.original_component]
    if hasattr(model, "pos_embed") and getattr(model.pos_embed, "original_component", None) is not None:
        mods.append(model.pos_embed.original_component)
    for block in model.blocks:
        mods += [block.attn.o.original_component, block.mlp.out.original_component]
    return mods


@torch.no_grad()
def orthogonalize(model: Any, direction: Float[Tensor, " d_model"]) -> Any:
    """Remove ``direction`` from every residual-writing weight of a bridge, in place.

    The result equals LCE ablation with hooks (``intervene(model, Intervention("ablate",
    "lce", direction))``) on blocks without post-sub-layer norms. On blocks with them
    (Gemma 2 and 3) it equals neither placement and a :class:`PostNormWarning` says
    so (see the module docstring for what it does equal). Tied input/output
    embeddings are untied first, so the unembedding is unchanged. Returns the same
    model.
    """
    d = model.cfg.d_model
    if direction.ndim != 1 or direction.shape[0] != d:
        raise ValueError(f"direction must have shape [{d}], got {tuple(direction.shape)}")
    if HookPoints.of(model).has_post_norms:
        warnings.warn(
            f"{model_id(model)} has post-sub-layer norms (Gemma 2/3 style): the orthogonalised "
            "weights remove the direction from the attention and MLP outputs before those "
            "norms, whose elementwise scale puts some of it back into the residual stream. "
            "The edited model equals neither LCE ablation placement ('residual' or "
            "'published'), so it is not the model that was scored; hook-based ablation "
            "(cosmic_tl.intervene) reproduces the scored one",
            PostNormWarning,
            stacklevel=2,
        )
    hf = model.original_model
    out_emb, in_emb = hf.get_output_embeddings(), hf.get_input_embeddings()
    if out_emb is not None and out_emb.weight is in_emb.weight:
        out_emb.weight = nn.Parameter(in_emb.weight.detach().clone())
        hf.config.tie_word_embeddings = False
        if hasattr(hf.config, "get_text_config"):
            hf.config.get_text_config().tie_word_embeddings = False
    for mod in _writers(model):
        w = cast(Tensor, mod.weight)
        r = unit(direction.to(device=w.device, dtype=torch.float32))
        if isinstance(mod, nn.Embedding) or w.shape[-1] == d and w.shape[0] != d:
            # [n, d_model]: each row is a vector in the residual stream
            w.copy_((w.float() - (w.float() @ r).unsqueeze(-1) * r).to(w.dtype))
        else:
            # nn.Linear [d_model, in]: columns live in the residual stream
            w.copy_((w.float() - r.unsqueeze(-1) * (r @ w.float())).to(w.dtype))
        bias = cast(Tensor | None, getattr(mod, "bias", None))
        if bias is not None:
            bias.copy_((bias.float() - (bias.float() @ r) * r).to(bias.dtype))
    return model


def plain_hf_model(model: Any) -> Any:
    """A plain Hugging Face copy of a bridge's model (the bridge wraps HF modules in place,
    which ``save_pretrained`` refuses), with the bridge's current weights."""
    from transformers import AutoModelForCausalLM

    hf = model.original_model
    plain = AutoModelForCausalLM.from_config(hf.config, dtype=next(hf.parameters()).dtype)
    wanted = set(plain.state_dict())
    state = {}
    for key, value in hf.state_dict().items():
        clean = key.replace("._original_component", "")
        if clean in wanted:
            state[clean] = value
    missing = wanted - set(state)
    if missing - {"lm_head.weight"}:
        raise RuntimeError(f"could not map bridge weights onto the HF model: {sorted(missing)[:5]}")
    plain.load_state_dict(state, strict=False)
    plain.generation_config = hf.generation_config
    return plain


def source_tokenizer(model: Any) -> Any:
    """The tokenizer as the model's directory ships it.

    The bridge's own tokenizer is changed by TransformerLens (it prepends BOS), which
    an exported model's users would inherit (and llama.cpp's ``add_bos_token`` with it).
    """
    from transformers import AutoTokenizer

    source = str(getattr(model.tokenizer, "name_or_path", "") or "")
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not reload the tokenizer from {source!r}: {err}") from err


def save_orthogonalized(
    model: Any,
    direction: Float[Tensor, " d_model"],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
) -> Path:
    """Orthogonalise ``model`` in place and save it (with the tokenizer of its directory,
    :func:`source_tokenizer`) as an HF directory.

    An existing ``out`` is refused, or with ``force`` replaced once the new one is written.
    On post-norm models (Gemma 2 and 3) the saved model is not the hook-ablated one:
    see :func:`orthogonalize`, which warns.
    """
    target = Path(out)
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; choose a new directory (or --force to replace it)")
    orthogonalize(model, direction)
    tmp = target.with_name(f".{target.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        plain_hf_model(model).save_pretrained(tmp, safe_serialization=True)
        source_tokenizer(model).save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target
