"""Rate of the last-position unembedding against the number of rows in one product.

The engine's logit passes unembed each prompt's last position; with a few rows the
``[rows, d_model] × [d_model, d_vocab]`` product is bound by reading the matrix, not by
arithmetic, which is why ``Runner.run_many`` stacks many passes' rows into one product.
This prints, for the model's own unembedding, the best-of-five time and GFLOP/s per row
count beside the machine's matmul rate measured right before and after.

    python benchmarks/bench_unembed.py [--model gemma3-270m] [--rows 8 16 32 64 128 160] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import matmul_rate

import cosmic_tl as ct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32, 64, 128, 160])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = ct.load_model(args.model, device="cpu")
    d_model, d_vocab = int(model.cfg.d_model), int(model.cfg.d_vocab)
    print(f"model={args.model} d_model={d_model} d_vocab={d_vocab} threads={args.threads}")
    before = matmul_rate()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for rows in args.rows:
            x = torch.randn(rows, 1, d_model, generator=g)
            model.unembed(x)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                model.unembed(x)
                best = min(best, time.perf_counter() - t0)
            rate = 2.0 * rows * d_model * d_vocab / best / 1e9
            print(f"rows {rows:4d}: {best * 1e3:7.1f} ms  {rate:6.1f} GFLOP/s", flush=True)
    after = matmul_rate()
    print(f"matmul rate (1024², best of five) before / after: {before:.1f} / {after:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
