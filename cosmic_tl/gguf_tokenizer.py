"""The tokenizer of a GGUF file, as llama.cpp reads it, from a Hugging Face fast tokenizer.

llama.cpp knows tokenizers by ``tokenizer.ggml.model``; two are written here:

- ``"gpt2"``, **byte-level BPE** (SmolLM2): tokens, merges, token types and the name of
  the pre-tokenizer that splits the text before merging (``tokenizer.ggml.pre``);
- ``"llama"``, **SentencePiece BPE** (Gemma 3; Llama 2 and Mistral style): tokens,
  scores and token types, no merges. llama.cpp joins the adjacent pair whose joined piece
  has the highest score, so the scores are the merge order: a piece's score is minus its
  rank among the pieces ordered by the first merge that makes it. Added tokens score
  −1000 (CONTROL if special, else USER_DEFINED with ``▁`` spelled as a space), byte pieces
  ``<0xNN>`` are BYTE with score 0, as llama.cpp's converter writes them.

Any other kind (a Unigram model, WordPiece) is refused by name: llama.cpp's ``"llama"``
tokenizer merges by score, which is not a unigram model's segmentation.

Both write the special ids, whether BOS/EOS are added, and the chat template
(``tokenizer.chat_template``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from typing import Any, Literal, cast

TokenizerModel = Literal["gpt2", "llama"]


class GGUFExportError(ValueError):
    """The model, tokenizer, pick or output path cannot be written as asked."""


# llama.cpp's converter names a byte-level BPE pre-tokenizer by hashing how the tokenizer
# splits a test text. We recognise the tokenizers we write by their vocabulary instead:
# sha256 over the tokenizer's tokens in id order and its merges (see _fingerprint).
KNOWN_PRE_TOKENIZERS: dict[str, str] = {
    # SmolLM / SmolLM2 (49152 tokens), llama.cpp's "smollm"
    "ae74b2a2c5bed17762861623bca674411d40387a0202d53c03c8bdafb2b81679": "smollm",
}

SPACE = "\u2581"  # SentencePiece's "▁", which stands for a space inside its pieces
ADDED_SCORE = -1000.0  # what llama.cpp's converter gives added and padding tokens
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    """The fast tokenizer's ``tokenizer.json`` as a dict."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(f"{type(tokenizer).__name__} has no fast (tokenizers) backend to read")
    return cast(dict[str, Any], json.loads(backend.to_str()))


def _components(node: Any) -> list[dict[str, Any]]:
    """A normalizer / pre-tokenizer / decoder and, for a ``Sequence``, its members."""
    if not isinstance(node, dict):
        return []
    members = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders") or []
    return [node, *(c for m in members for c in _components(m))]


def _is_metaspace(spec: dict[str, Any]) -> bool:
    """Whether spaces become ``▁`` before the model sees the text (SentencePiece's way)."""
    parts = _components(spec.get("normalizer")) + _components(spec.get("pre_tokenizer"))
    return any(
        p.get("type") == "Metaspace" or (p.get("type") == "Replace" and p.get("content") == SPACE)
        for p in parts
    )


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether a ``▁`` is put before the text (llama.cpp's ``add_space_prefix``)."""
    for p in _components(spec.get("normalizer")) + _components(spec.get("pre_tokenizer")):
        if p.get("type") == "Prepend" and p.get("prepend") == SPACE:
            return True
        if p.get("type") == "Metaspace" and (
            p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never")
            in ("first", "always")
        ):
            return True
    return False


def tokenizer_model(spec: dict[str, Any]) -> TokenizerModel:
    """llama.cpp's name for the tokenizer a ``tokenizer.json`` describes, or an error
    naming a kind that is not written."""
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    kind = model.get("type")
    if kind == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
        return "gpt2"
    if kind == "BPE" and model.get("byte_fallback") and _is_metaspace(spec):
        return "llama"
    if kind == "Unigram":
        raise GGUFExportError(
            "a Unigram (SentencePiece unigram) tokenizer is not written: llama.cpp's "
            "SentencePiece tokenizer ('llama') joins pieces by score, as SentencePiece's BPE "
            "models do, which is not a unigram model's segmentation; only byte-level BPE "
            "(GPT-2 style, as SmolLM2's) and SentencePiece BPE (byte fallback and '▁' for "
            "spaces, as Gemma 3's) are"
        )
    raise GGUFExportError(
        "only byte-level BPE (GPT-2 style, as SmolLM2's) and SentencePiece BPE (byte "
        "fallback and '▁' for spaces, as Gemma 3's) tokenizers are written; this one is "
        f"{kind} (byte fallback {bool(model.get('byte_fallback'))}) with a "
        f"{decoder.get('type')} decoder"
    )


# ---------------------------------------------------------------------------- byte-level BPE


def _merges(spec: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def _fingerprint(tokens: list[str], merges: list[str]) -> str:
    h = hashlib.sha256("\n".join(tokens).encode())
    h.update(b"\n\n")
    h.update("\n".join(merges).encode())
    return h.hexdigest()


def _by_id(tokenizer: Any, vocab_size: int) -> dict[int, str]:
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(by_id)}, the model only {vocab_size}")
    return by_id


def bpe_vocab(tokenizer: Any, vocab_size: int, pre: str | None) -> tuple[list[str], list[int], str]:
    """``(tokens, token types, pre-tokenizer name)`` as llama.cpp's ``gpt2`` tokenizer wants
    them: every id up to ``vocab_size``, added tokens marked CONTROL (special) or
    USER_DEFINED, ids the tokenizer lacks as UNUSED ``[PAD{i}]``."""
    import gguf

    spec = tokenizer_json(tokenizer)
    by_id = _by_id(tokenizer, vocab_size)
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    if pre is None:
        own = [by_id[i] for i in sorted(by_id)]
        pre = KNOWN_PRE_TOKENIZERS.get(_fingerprint(own, _merges(spec)))
    if pre is None:
        raise GGUFExportError(
            "llama.cpp must be told how this BPE tokenizer splits text before merging "
            f"(tokenizer.ggml.pre) and it is not one this writer knows "
            f"({', '.join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))}); pass pre_tokenizer="
        )
    return tokens, [int(t) for t in types], pre


# ---------------------------------------------------------------------------- SentencePiece BPE


def _merge_ranks(spec: dict[str, Any]) -> dict[str, int]:
    """Each piece that a merge makes, with the rank of the first merge that makes it."""
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(spec["model"].get("merges", [])):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if len(pair) == 2:
            ranks.setdefault(pair[0] + pair[1], rank)
    return ranks


def is_space_run(token: str) -> bool:
    """A piece of two or more ``▁`` alone: in Gemma's SentencePiece model a user-defined run
    of spaces, which llama.cpp's converter writes with spaces (and transformers' GGUF
    reader spells with ``▁`` again, as a plain piece)."""
    return len(token) >= 2 and set(token) == {SPACE}


def sentencepiece_vocab(
    tokenizer: Any, vocab_size: int, *, space_runs: bool = False
) -> tuple[list[str], list[float], list[int], bool]:
    """``(tokens, scores, token types, add_space_prefix)`` as llama.cpp's ``llama``
    (SentencePiece) tokenizer wants them, for every id up to ``vocab_size``.

    Scores follow the merges (see the module docstring); pieces that no merge makes
    (single characters) come after the merged ones, by id. ``space_runs``: write pieces
    made of ``▁`` alone as user-defined runs of spaces (Gemma, :func:`is_space_run`).
    """
    import gguf

    T = gguf.TokenType
    spec = tokenizer_json(tokenizer)
    by_id = _by_id(tokenizer, vocab_size)
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items() if i < vocab_size}
    unk = spec["model"].get("unk_token")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    scores = [ADDED_SCORE] * vocab_size
    types = [int(T.UNUSED)] * vocab_size
    normal = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            continue
        if i in added:
            special = added[i].special
            types[i] = int(T.CONTROL if special else T.USER_DEFINED)
            tokens[i] = added[i].content if special else added[i].content.replace(SPACE, " ")
        elif space_runs and is_space_run(token):
            types[i], tokens[i] = int(T.USER_DEFINED), token.replace(SPACE, " ")
        elif _BYTE_PIECE.fullmatch(token):
            types[i], scores[i] = int(T.BYTE), 0.0
        elif token == unk:
            types[i], scores[i] = int(T.UNKNOWN), 0.0
        else:
            types[i] = int(T.NORMAL)
            normal.append(i)
    ranks = _merge_ranks(spec)
    unmerged = len(spec["model"].get("merges", []))  # after every merge: pieces no merge makes
    for position, i in enumerate(sorted(normal, key=lambda i: (ranks.get(tokens[i], unmerged), i))):
        scores[i] = -float(position)
    return tokens, scores, types, _adds_space_prefix(spec)


# ---------------------------------------------------------------------------- writing


def write_tokenizer(
    w: Any, tokenizer: Any, vocab_size: int, *, pre: str | None = None, space_runs: bool = False
) -> TokenizerModel:
    """Write ``tokenizer`` into the GGUF writer ``w`` as llama.cpp's converter does: its
    pieces, special ids, BOS/EOS flags and chat template (gguf's ``SpecialVocab`` reads
    the saved tokenizer files). Returns llama.cpp's tokenizer model name."""
    import gguf

    kind = tokenizer_model(tokenizer_json(tokenizer))
    if kind == "gpt2":
        tokens, types, pre = bpe_vocab(tokenizer, vocab_size, pre)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        kinds = None
    else:
        tokens, scores, types, space_prefix = sentencepiece_vocab(
            tokenizer, vocab_size, space_runs=space_runs
        )
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(space_prefix)
        # a causal model has no use for a mask token (llama.cpp's Gemma 3 file has none)
        kinds = ("bos", "eos", "unk", "sep", "pad", "cls")
    # gguf warns that Gemma's pair template (<bos> A <bos> B) has no separator, which
    # only decides add_sep_token (False, as in llama.cpp's Gemma files)
    quiet = logging.getLogger("gguf.vocab")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="cosmic-tl-tokenizer-") as tmp:
            tokenizer.save_pretrained(tmp)
            special = gguf.SpecialVocab(
                tmp, load_merges=kind == "gpt2", special_token_types=kinds, n_vocab=vocab_size
            )
    finally:
        quiet.setLevel(level)
    if kind == "gpt2" and not special.merges:
        special.merges = _merges(tokenizer_json(tokenizer))
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    # Whether llama.cpp adds BOS / EOS to a text, as the tokenizer itself does.
    ids = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and (
        ids[:1] == [tokenizer.bos_token_id]
    )
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and (
        ids[-1:] == [tokenizer.eos_token_id]
    )
    special.add_to_gguf(w, quiet=True)
    return kind
