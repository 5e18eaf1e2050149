"""Rate of a model's transformer blocks alone, loaded by ``transformers`` (no bridge, no hooks).

The engine's work is the blocks (it unembeds last positions only), so the rate the
blocks reach in the plain model is the ceiling for the engine's share of the matmul
rate on the day's machine. This prints, for each ``--shapes`` batch (prompts × tokens,
random token ids), the best-of-``--repeats`` time of the decoder's blocks (embedding,
blocks and final norm, no unembedding), their GFLOP/s (``2 × tokens × block weights ×
layers``) and the share of the matmul rate measured before and after. With
``--compile``, the same with every decoder layer wrapped in ``torch.compile`` (fusing
the blocks' elementwise work), its speed ratio and the largest difference of the
output from the uncompiled one; ``--compile attention`` compiles each layer's attention
module only (its q/k norms, rotary embeddings, key/value repeats and softmax).

    python benchmarks/bench_blocks.py [--model gemma3-270m] [--shapes 8x24 8x36 32x36] [--compile layers|attention]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from _common import matmul_rate
from transformers import AutoModelForCausalLM

from cosmic_tl.models import ensure_alias, resolve_spec


def blocks_seconds(decoder: Any, ids: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """Best-of-``repeats`` wall time of one decoder forward, and its output."""
    with torch.no_grad():
        # The first call is the warm-up (and the compilation); no KV cache is built.
        out = decoder(input_ids=ids, use_cache=False).last_hidden_state
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            decoder(input_ids=ids, use_cache=False)
            best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m", help="alias, local HF directory or hub name")
    ap.add_argument("--shapes", nargs="+", default=["8x24", "8x36", "16x24", "32x36"])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--compile",
        choices=("layers", "attention"),
        default=None,
        help="also time each decoder layer, or only its attention, wrapped in torch.compile",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # Every layer shares its forward's code: let each layer and shape have its own graph.
    torch._dynamo.config.recompile_limit = 1024
    kind, name = resolve_spec(args.model)
    source = ensure_alias(name) if kind == "alias" else name
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    decoder = hf.get_decoder()
    layers = decoder.layers
    per_block = sum(p.numel() for p in layers[0].parameters())
    vocab = int(hf.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    print(
        f"model={args.model} layers={len(layers)} weights per block={per_block / 1e6:.2f} M threads={args.threads}"
    )
    before = matmul_rate()
    print(f"matmul rate (1024², best of five): {before:.1f} GFLOP/s")
    for shape in args.shapes:
        n, t = (int(x) for x in shape.split("x"))
        ids = torch.randint(1000, min(vocab, 30000), (n, t), generator=gen)
        gflop = 2.0 * n * t * per_block * len(layers) / 1e9
        eager, out = blocks_seconds(decoder, ids, args.repeats)
        line = (
            f"{n:3d} x {t:3d} tokens: {eager * 1e3:7.1f} ms  {gflop / eager:6.1f} GFLOP/s "
            f"({gflop / eager / before:.0%} of matmul rate)"
        )
        if args.compile:
            mods = [layer if args.compile == "layers" else layer.self_attn for layer in layers]
            plain = [m.forward for m in mods]
            for m in mods:
                m.forward = torch.compile(m.forward, dynamic=False)
            try:
                fused, out_c = blocks_seconds(decoder, ids, args.repeats)
            finally:
                for m, forward in zip(mods, plain, strict=True):
                    m.forward = forward
            line += (
                f"; {args.compile} compiled {fused * 1e3:7.1f} ms, {eager / fused:.2f}x, "
                f"max |diff| {float((out - out_c).abs().max()):.1e}"
            )
        print(line, flush=True)
    after = matmul_rate()
    print(f"matmul rate after: {after:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
