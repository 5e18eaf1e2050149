"""Export for llama.cpp: the orthogonalised model and the direction as GGUF files.

Two files, written with the ``gguf`` package the way llama.cpp's own converter
(``convert_hf_to_gguf.py``) writes them:

- the **model** (:func:`save_gguf`, :func:`save_orthogonalized_gguf`): llama.cpp's
  architecture name, hyper-parameters and tensor names, the tokenizer and the chat
  template (:mod:`cosmic_tl.gguf_tokenizer`), as F32, F16 or Q8_0;
- the **direction as a control vector** (:func:`save_control_vector`), which llama.cpp
  adds to one block's output: ``llama-cli -m model.gguf --control-vector-scaled cv.gguf α``.

llama.cpp numbers a control vector's tensors ``direction.1`` … ``direction.{n_layers−1}``
and adds ``direction.i`` (times the scale) to the *output* of block ``i`` (0-based); there
is no ``direction.0`` and the output of block 0 is never steered. cosmic_tl adds ``α r`` at
the *input* of block ``l``, which is the output of block ``l − 1``, so the direction goes
into ``direction.{l−1}`` and picks at layers 0 and 1 cannot be expressed.

Architectures: Llama (SmolLM2) and Gemma 3 (text); any other is refused by name.
Tokenizers: byte-level BPE whose pre-tokenizer llama.cpp names (SmolLM's ``smollm``) and
SentencePiece BPE (Gemma 3's); any other kind is refused by name.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from cosmic_tl.config import Mode
from cosmic_tl.export import orthogonalize, plain_hf_model, source_tokenizer
from cosmic_tl.gguf_tokenizer import GGUFExportError, write_tokenizer

log = logging.getLogger("cosmic_tl")

GGUFType = Literal["f32", "f16", "q8_0"]
GGUF_TYPES: tuple[GGUFType, ...] = ("f32", "f16", "q8_0")


# ---------------------------------------------------------------------------- output files


def _target(path: str | os.PathLike[str], force: bool) -> Path:
    target = Path(path)
    if target.suffix != ".gguf":
        raise GGUFExportError(f"{target} should end in .gguf")
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; choose another path or pass --force to overwrite it")
    if target.is_dir():
        raise GGUFExportError(f"{target} is a directory, not a GGUF file")
    return target


def _write_atomically(target: Path, arch: str, fill: Callable[[Any], None]) -> Path:
    """Write a GGUF file via a temporary sibling renamed into place, so that an error
    (a full disk) leaves neither a half-written file nor the temporary behind."""
    import gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    # gguf logs its plan (the temporary name) at INFO; keep the CLI's output to our lines
    quiet = logging.getLogger("gguf")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a model file is not
        os.replace(tmp, target)
    except OSError as err:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        reason = err.strerror or str(err)
        if err.errno == errno.ENOSPC:
            reason = "no space left on device"
        raise OSError(err.errno, f"could not write {target}: {reason}; nothing was left behind") from err
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        quiet.setLevel(level)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------- architectures


def _rope_theta(cfg: Any, layer_type: str = "full_attention") -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    params = params.get(layer_type, params)
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise GGUFExportError(f"{cfg.model_type}: no rope_theta in the config")
    return float(theta)


def _rope_type(cfg: Any, layer_type: str = "full_attention") -> tuple[str, dict[str, Any]]:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    params = params.get(layer_type, params)
    return str(params.get("rope_type", params.get("type", "default"))), params


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _common_hparams(w: Any, cfg: Any) -> None:
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(cfg.num_attention_heads))
    w.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_key_length(_head_dim(cfg))
    w.add_value_length(_head_dim(cfg))
    w.add_vocab_size(int(cfg.vocab_size))


def _llama_check(cfg: Any) -> None:
    if cfg.hidden_act != "silu":
        raise GGUFExportError(f"llama: activation {cfg.hidden_act!r}; llama.cpp's llama uses silu")
    kind, _ = _rope_type(cfg)
    if kind != "default":
        raise GGUFExportError(f"llama: rope scaling {kind!r} is not written by this exporter")


def _llama_hparams(w: Any, cfg: Any) -> None:
    _common_hparams(w, cfg)
    w.add_rope_dimension_count(_head_dim(cfg))
    w.add_rope_freq_base(_rope_theta(cfg))


def _permute_qk(name: str, data: np.ndarray, cfg: Any) -> np.ndarray:
    """llama.cpp's llama applies rotary embeddings to interleaved pairs of each head's
    dimensions, Hugging Face's to its two halves; reorder the Q and K rows (and biases)
    so that llama.cpp's rotation pairs the same dimensions."""
    if ".attn_q." in name:
        heads = int(cfg.num_attention_heads)
    elif ".attn_k." in name:
        heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    else:
        return data
    rows = data.shape[0]
    return data.reshape(heads, 2, rows // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def _gemma3_layer_types(n_layers: int) -> list[str]:
    """llama.cpp's Gemma 3 hard-codes the sliding-window pattern: every sixth layer global."""
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]


def _gemma3_check(cfg: Any) -> None:
    n_layers = int(cfg.num_hidden_layers)
    layer_types = list(getattr(cfg, "layer_types", None) or _gemma3_layer_types(n_layers))
    if layer_types != _gemma3_layer_types(n_layers):
        raise GGUFExportError(
            "gemma3: llama.cpp makes every sixth layer global (the rest sliding-window); "
            f"this model's layer types are {layer_types}"
        )
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) on the 62-layer 27B
    expected = cfg.hidden_size // cfg.num_attention_heads if n_layers == 62 else _head_dim(cfg)
    if float(cfg.query_pre_attn_scalar) != float(expected):
        raise GGUFExportError(
            f"gemma3: query_pre_attn_scalar {cfg.query_pre_attn_scalar}, but llama.cpp scales "
            f"queries by 1/sqrt({expected})"
        )
    if _rope_theta(cfg, "sliding_attention") != 10000.0:
        raise GGUFExportError("gemma3: llama.cpp fixes the sliding layers' rope base at 10000")
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise GGUFExportError("gemma3: attention logit soft-capping has no llama.cpp equivalent")
    if _rope_type(cfg, "sliding_attention")[0] != "default":
        raise GGUFExportError("gemma3: llama.cpp does not scale the sliding layers' rope")
    if _rope_type(cfg)[0] not in ("default", "linear"):
        raise GGUFExportError(f"gemma3: rope scaling {_rope_type(cfg)[0]!r} is not written")


def _gemma3_hparams(w: Any, cfg: Any) -> None:
    import gguf

    _common_hparams(w, cfg)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_sliding_window(int(cfg.sliding_window))
    if getattr(cfg, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    kind, params = _rope_type(cfg)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(params["factor"]))


def _gemma3_norms(name: str, data: np.ndarray, cfg: Any) -> np.ndarray:
    """Gemma's RMSNorm scales by ``1 + weight``; llama.cpp's by ``weight``."""
    return data + 1.0 if name.endswith("norm.weight") else data


@dataclass(frozen=True)
class _Family:
    """How one Hugging Face architecture is written for llama.cpp."""

    arch: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
    check: Callable[[Any], None]
    hparams: Callable[[Any, Any], None]
    transform: Callable[[str, np.ndarray, Any], np.ndarray]
    # SentencePiece pieces of "▁" alone are user-defined runs of spaces (Gemma's)
    space_runs: bool = False


FAMILIES: dict[str, _Family] = {
    "llama": _Family("llama", _llama_check, _llama_hparams, _permute_qk),
    "gemma3_text": _Family("gemma3", _gemma3_check, _gemma3_hparams, _gemma3_norms, space_runs=True),
}


def _family(cfg: Any) -> _Family:
    family = FAMILIES.get(cfg.model_type)
    if family is None:
        raise GGUFExportError(
            f"no GGUF writer for architecture {cfg.model_type!r} "
            f"({', '.join(getattr(cfg, 'architectures', None) or [])}); known: {', '.join(FAMILIES)}"
        )
    family.check(cfg)
    return family


def gguf_arch(model: Any) -> str:
    """llama.cpp's architecture name for a bridge's model (``"llama"``, ``"gemma3"``), or a
    :class:`GGUFExportError` naming an architecture this module does not write."""
    return _family(model.original_model.config).arch


# ---------------------------------------------------------------------------- tensors


def gguf_tensors(hf: Any) -> Iterator[tuple[str, np.ndarray]]:
    """``(llama.cpp name, float32 array)`` of every weight of a plain Hugging Face model,
    transformed as llama.cpp expects (Q/K row order for Llama, ``1 + w`` norms for Gemma)."""
    import gguf

    cfg = hf.config
    family = _family(cfg)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == family.arch)
    names = gguf.get_tensor_name_map(arch, int(cfg.num_hidden_layers))
    state = hf.state_dict()
    tied = getattr(cfg, "tie_word_embeddings", False) or (
        "lm_head.weight" in state
        and state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    )
    for key, value in state.items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"{cfg.model_type}: no llama.cpp name for the weight {key!r}")
        data = value.detach().to(device="cpu", dtype=torch.float32).numpy()
        yield name, family.transform(name, data, cfg)


def _encode(name: str, data: np.ndarray, kind: GGUFType) -> tuple[np.ndarray, Any]:
    """``(bytes or floats, ggml type)``: norms and vectors stay F32, as llama.cpp keeps
    them; a matrix whose rows are not whole Q8_0 blocks (32 values) falls back to F16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    qtype = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[kind]
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        qtype = Q.F32
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, Q.F16), Q.F16


# ---------------------------------------------------------------------------- the model file


def save_gguf(
    model: Any,
    path: str | os.PathLike[str],
    *,
    type: GGUFType = "f16",
    force: bool = False,
    name: str | None = None,
    tokenizer: Any = None,
    pre_tokenizer: str | None = None,
) -> Path:
    """Write a bridge's model as it is now (with its tokenizer and chat template) as a
    GGUF file for llama.cpp; ``type`` ``"f32"``, ``"f16"`` or ``"q8_0"``.

    Refuses an existing ``path`` unless ``force``; written atomically. ``tokenizer``
    defaults to the one in the model's directory (:func:`source_tokenizer`);
    ``pre_tokenizer`` names llama.cpp's pre-tokenizer for a byte-level BPE tokenizer this
    module does not recognise (a SentencePiece one needs none).

    >>> save_gguf(orthogonalize(model, r), "edited-q8_0.gguf", type="q8_0")  # doctest: +SKIP
    """
    import gguf

    if type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {type!r}; choose one of {', '.join(GGUF_TYPES)}")
    target = _target(path, force)
    hf = plain_hf_model(model)
    cfg = hf.config
    family = _family(cfg)
    tokenizer = source_tokenizer(model) if tokenizer is None else tokenizer
    tensors = [(n, *_encode(n, d, type)) for n, d in gguf_tensors(hf)]
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[type]

    def fill(w: Any) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or Path(str(getattr(cfg, "_name_or_path", "") or family.arch)).name)
        family.hparams(w, cfg)
        w.add_file_type(int(file_type))
        write_tokenizer(
            w, tokenizer, int(cfg.vocab_size), pre=pre_tokenizer, space_runs=family.space_runs
        )
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor_name, data, qtype in tensors:
            w.add_tensor(tensor_name, data, raw_dtype=qtype)

    return _write_atomically(target, family.arch, fill)


def save_orthogonalized_gguf(
    model: Any,
    direction: Float[Tensor, " d_model"],
    path: str | os.PathLike[str],
    *,
    type: GGUFType = "f16",
    force: bool = False,
    name: str | None = None,
) -> Path:
    """Orthogonalise ``direction`` out of ``model``'s weights (in place; see
    :func:`cosmic_tl.export.orthogonalize`) and write it with :func:`save_gguf`."""
    if type not in GGUF_TYPES:  # before the edit, so that a typo leaves the model alone
        raise GGUFExportError(f"unknown GGUF type {type!r}; choose one of {', '.join(GGUF_TYPES)}")
    _target(path, force)
    gguf_arch(model)
    orthogonalize(model, direction)
    return save_gguf(model, path, type=type, force=force, name=name)


# ---------------------------------------------------------------------------- control vector


def control_vector_slot(layer: int, n_layers: int) -> int:
    """The llama.cpp control-vector index whose addition equals cosmic_tl's addition at the
    input of block ``layer``: ``layer − 1`` (llama.cpp adds ``direction.i`` to the output
    of block ``i``, for ``1 ≤ i < n_layers``)."""
    if not 0 <= layer < n_layers:
        raise GGUFExportError(f"layer {layer} is outside the model's {n_layers} blocks")
    if layer == 0:
        raise GGUFExportError(
            "the pick is at layer 0, the input of the first block (the embeddings), which is "
            "no block's output; llama.cpp control vectors add only to block outputs"
        )
    if layer == 1:
        raise GGUFExportError(
            "the pick is at layer 1, the output of block 0, which llama.cpp never steers "
            "(its control vectors start at direction.1, the output of block 1)"
        )
    return layer - 1


def _check_addition(mode: Mode, linear: bool) -> None:
    """A control vector adds a fixed vector: refuse ACE addition unless only its linear
    part is wanted, and warn then."""
    if mode == "ace" and not linear:
        raise GGUFExportError(
            "an ACE pick's addition first moves the activation's projection on r̂ to the "
            "harmless mean's, which a llama.cpp control vector (a fixed vector added to a "
            "block's output) cannot do; pass --linear-addition (linear=True) to export its "
            "linear part, + α r, alone"
        )
    if mode == "ace":
        log.warning(
            "warning: exporting the linear part (+ α r) of an ACE pick; llama.cpp will not "
            "move the projection to the harmless mean first, so it is not the run's ACE addition"
        )


def save_control_vector(
    path: str | os.PathLike[str],
    direction: Float[Tensor, " d_model"],
    *,
    layer: int,
    n_layers: int,
    mode: Mode = "lce",
    linear: bool = False,
    model_hint: str = "llama",
    alpha: float = 1.0,
    force: bool = False,
) -> Path:
    """Write ``direction`` as a llama.cpp control vector that adds it at the input of
    block ``layer`` (the output of block ``layer − 1``).

    One F32 tensor per steerable layer, ``direction.1`` … ``direction.{n_layers−1}``, all
    zero but ``direction.{layer−1}``, which holds ``r`` unscaled: the scale is llama.cpp's
    (``--control-vector-scaled FILE α``; ``alpha`` is only recorded). ACE addition (affine
    ablation, then ``+ α r``) is not a fixed vector and is refused; ``linear=True`` writes
    its linear part alone, with a warning.
    """
    import gguf

    _check_addition(mode, linear)
    if direction.ndim != 1 or not bool(torch.isfinite(direction).all()):
        raise GGUFExportError(
            f"direction must be a finite [d_model] vector, got {tuple(direction.shape)}"
        )
    slot = control_vector_slot(layer, n_layers)
    target = _target(path, force)
    r = direction.detach().to(device="cpu", dtype=torch.float32).numpy()

    def fill(w: Any) -> None:
        w.add_string("controlvector.model_hint", model_hint)
        w.add_int32("controlvector.layer_count", n_layers - 1)
        w.add_int32("cosmic_tl.layer", layer)
        w.add_string("cosmic_tl.hook", f"blocks.{layer}.hook_resid_pre")
        w.add_string("cosmic_tl.mode", mode)
        w.add_float32("cosmic_tl.alpha", float(alpha))
        for i in range(1, n_layers):
            w.add_tensor(f"direction.{i}", r if i == slot else np.zeros_like(r))

    del gguf  # imported so that a missing package fails before any file is created
    return _write_atomically(target, "controlvector", fill)


def control_vector_command(
    model_file: str | os.PathLike[str],
    control_vector: str | os.PathLike[str],
    *,
    layer: int,
    n_layers: int,
    alpha: float,
) -> str:
    """The ``llama-cli`` command line that adds ``α r`` at the input of block ``layer``."""
    slot = control_vector_slot(layer, n_layers)
    return (
        f"llama-cli -m {model_file} --control-vector-scaled {control_vector} {alpha:g} "
        f"--control-vector-layer-range {slot} {slot}"
    )


# ---------------------------------------------------------------------------- one export

GGUFPart = Literal["edited", "original", "control-vector"]
GGUF_PARTS: tuple[GGUFPart, ...] = ("edited", "original", "control-vector")


@dataclass(frozen=True)
class GGUFExport:
    """What :func:`export_gguf` wrote: ``files`` by part, the llama.cpp command line
    that applies the control vector and the model file that command runs (both ``None``
    without a control vector; the model file is written only with the ``"original"`` part)."""

    files: dict[GGUFPart, Path]
    command: str | None
    command_model: Path | None = None


def gguf_file_names(type: GGUFType) -> dict[GGUFPart, str]:
    """The file each part is written to inside the output directory."""
    return {
        "edited": f"model-orthogonalized-{type}.gguf",
        "original": f"model-{type}.gguf",
        "control-vector": "control-vector.gguf",
    }


def export_gguf(
    model: Any,
    direction: Float[Tensor, " d_model"],
    out: str | os.PathLike[str],
    *,
    layer: int,
    mode: Mode,
    alpha: float = 1.0,
    type: GGUFType = "f16",
    parts: tuple[GGUFPart, ...] = GGUF_PARTS,
    linear: bool = False,
    force: bool = False,
) -> GGUFExport:
    """A pick for llama.cpp, in the directory ``out``: the model with ``direction``
    orthogonalised out (``"edited"``), the model as it is (``"original"``, which the
    control vector steers) and the control vector adding ``α r`` at block ``layer``.

    Every check (type, architecture, pick layer, ACE, existing files) runs before the
    first file is written; the model is edited in place after ``"original"`` is written.
    """
    unknown = [p for p in parts if p not in GGUF_PARTS]
    if unknown or not parts:
        raise GGUFExportError(f"unknown parts {unknown}; choose from {', '.join(GGUF_PARTS)}")
    if type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {type!r}; choose one of {', '.join(GGUF_TYPES)}")
    arch = gguf_arch(model)
    n_layers = int(model.cfg.n_layers)
    directory = Path(out)
    names = gguf_file_names(type)
    files = {p: directory / names[p] for p in GGUF_PARTS if p in parts}
    for path in files.values():
        _target(path, force)
    command = base = None
    if "control-vector" in files:
        control_vector_slot(layer, n_layers)
        if mode == "ace" and not linear:
            _check_addition(mode, linear)
    if "original" in files:
        save_gguf(model, files["original"], type=type, force=force)
    if "edited" in files:
        save_orthogonalized_gguf(model, direction, files["edited"], type=type, force=force)
    if "control-vector" in files:
        save_control_vector(
            files["control-vector"],
            direction,
            layer=layer,
            n_layers=n_layers,
            mode=mode,
            linear=linear,
            model_hint=arch,
            alpha=alpha,
            force=force,
        )
        base = files.get("original", directory / names["original"])
        command = control_vector_command(
            base, files["control-vector"], layer=layer, n_layers=n_layers, alpha=alpha
        )
    return GGUFExport(files=dict(files), command=command, command_model=base)
