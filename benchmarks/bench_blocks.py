"""Rate of a model's transformer blocks alone, loaded by ``transformers`` (no bridge, no hooks).

The engine's work is the blocks (it unembeds last positions only), so the rate the
blocks reach in the plain model is the ceiling for the engine's share of the matmul
rate on the day's machine. This prints, for each ``--shapes`` batch (prompts × tokens,
random token ids), the best-of-``--repeats`` time of the decoder's blocks (embedding,
blocks and final norm, no unembedding), their GFLOP/s (``2 × tokens × block weights ×
layers``) and the share of the matmul rate measured before and after. With
``--compile``, the same with every decoder layer wrapped in ``torch.compile`` (fusing
the blocks' elementwise work), its speed ratio and the largest difference of the
output from the uncompiled one.

    python benchmarks/bench_blocks.py [--model gemma3-270m] [--shapes 8x24 8x36 32x36] [--compile]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from _common import matmul_rate
from transformers import AutoModelForCausalLM

from cosmic_tl.models import ensure_alias


def blocks_seconds(decoder: Any, ids: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """Best-of-``repeats`` wall time of one decoder forward, and its output."""
    with torch.no_grad():
        out = decoder(input_ids=ids).last_hidden_state  # also the warm-up (and compilation)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            decoder(input_ids=ids)
            best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m", help="alias or local HF directory")
    ap.add_argument("--shapes", nargs="+", default=["8x24", "8x36", "16x24", "32x36"])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd layers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    source = ensure_alias(args.model) if "/" not in args.model else args.model
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
            plain = [layer.forward for layer in layers]
            for layer in layers:
                layer.forward = torch.compile(layer.forward, dynamic=False)
            try:
                fused, out_c = blocks_seconds(decoder, ids, args.repeats)
            finally:
                for layer, forward in zip(layers, plain, strict=True):
                    layer.forward = forward
            line += (
                f"; compiled {fused * 1e3:7.1f} ms, {eager / fused:.2f}x, "
                f"max |diff| {float((out - out_c).abs().max()):.1e}"
            )
        print(line, flush=True)
    after = matmul_rate()
    print(f"matmul rate after: {after:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
