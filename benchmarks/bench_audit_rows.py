"""How many rows the audit should stack: generation wall time at several row budgets.

Generates greedy answers for 8 random-direction ablations (LCE, so every row carries
48 new tokens on most prompts) on the first 32 bundled harmful test prompts, with the
audit's own stacked generation (``audit.generate_rows``) at each ``--rows`` budget in
turn, twice round, so that contention on a shared machine shows up as disagreement
between the two rounds. Prints seconds, tokens and tokens per second per budget.

    python benchmarks/bench_audit_rows.py [--model smollm2-135m-instruct] [--rows 64 128] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

import cosmic_tl as ct
from cosmic_tl.audit import generate_rows
from cosmic_tl.interventions import Intervention
from cosmic_tl.templates import prompts_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ct.load_model(args.model)
    harmful = prompts_for(model, ct.load_bundled("harmful", "test")[:32])
    gen = torch.Generator().manual_seed(0)
    ivs = [
        Intervention("ablate", "lce", torch.randn(model.cfg.d_model, generator=gen))
        for _ in range(args.candidates)
    ]
    print(f"[{args.model}, torch threads {torch.get_num_threads()}]")
    for round_ in (1, 2):
        for rows in args.rows:
            t0 = time.perf_counter()
            out = generate_rows(model, harmful, ivs, max_new_tokens=args.max_new_tokens, max_rows=rows)
            seconds = time.perf_counter() - t0
            n = sum(len(r) for o in out for r in o)
            print(
                f"round {round_}, max_rows {rows}: {seconds:.1f} s for {len(ivs)} interventions "
                f"x {len(harmful)} prompts, {n} tokens, {n / seconds:.0f} tokens/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
