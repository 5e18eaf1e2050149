"""Helpers shared by the benchmarks (not part of the package)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import cosmic_tl as ct

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the straightforward reference loop lives there


def matmul_rate(n: int = 1024, repeats: int = 10, trials: int = 5) -> float:
    """Measured fp32 matmul throughput of this machine in GFLOP/s.

    The best of ``trials`` short measurements, so that a moment of contention on a
    shared machine does not understate what the cores can do.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def forward_flops(model, batches, *, full_logits: bool) -> float:
    """Weight-matmul FLOPs of one full forward over ``batches`` (padding included)."""
    block = sum(p.numel() for p in model.blocks[0].parameters())
    unembed = model.cfg.d_model * model.cfg.d_vocab
    total = 0.0
    for b in batches:
        tokens = b.tokens.numel()
        total += 2.0 * tokens * block * model.cfg.n_layers
        total += 2.0 * (tokens if full_logits else b.tokens.shape[0]) * unembed
    return total


def sample(kind: str, split: str, n: int, seed: int) -> list[str]:
    """``n`` bundled prompts of ``kind`` from ``split``, sampled with ``seed``."""
    return ct.sample_prompts(ct.load_bundled(kind, split), n, seed=seed)
