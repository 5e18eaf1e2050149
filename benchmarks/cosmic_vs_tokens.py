"""COSMIC against the refusal-token baseline on the refusal organisms.

On each organism, candidates and scores are computed once (CPU-preset sizes:
64 train and 16 validation prompts per kind); COSMIC and the baseline (default
refusal tokens, "I" for SmolLM2) pick from the same candidates. Each pick is then
evaluated on bundled test prompts, judged with the organism's own phrases:

- ablation on harmful prompts → attack success rate (ASR, higher = the direction
  mediates refusal);
- addition on harmless prompts → induced refusal rate (higher = the direction
  carries refusal);
- KL on harmless validation prompts under ablation (from the score grid).

    python benchmarks/cosmic_vs_tokens.py [--organisms NAME ...] [--n-test 32] [--mode ace]

Prints one table; the last line is ``done``.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import sample

import cosmic_tl as ct
from cosmic_tl.models import RECIPES, build_organism, organism_judge
from cosmic_tl.selection import NoCandidateError


def fmt(rate: ct.Rate | None) -> str:
    return "—" if rate is None else f"{rate.rate:.0%} [{rate.low:.0%},{rate.high:.0%}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organisms", nargs="+", default=sorted(RECIPES))
    ap.add_argument("--mode", default="ace", choices=("ace", "lce"))
    cfg = ct.preset("cpu")
    ap.add_argument("--n-train", type=int, default=cfg.n_train)
    ap.add_argument("--n-val", type=int, default=cfg.n_val)
    ap.add_argument("--n-test", type=int, default=cfg.n_test)
    ap.add_argument("--max-new-tokens", type=int, default=cfg.max_new_tokens)
    ap.add_argument("--seed", type=int, default=cfg.seed)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = {"max_new_tokens": args.max_new_tokens, "batch_size": 32, "progress": False}
    h_tr, l_tr = (sample(k, "train", args.n_train, args.seed) for k in ("harmful", "harmless"))
    h_val, l_val = (sample(k, "val", args.n_val, args.seed) for k in ("harmful", "harmless"))
    h_test, l_test = (sample(k, "test", args.n_test, args.seed) for k in ("harmful", "harmless"))
    rows = []
    notes: list[str] = []
    for name in args.organisms:
        build_organism(name)
        start = time.perf_counter()
        model = ct.load_model(name, device="cpu")
        judge = organism_judge(name)
        cands = ct.compute_candidates(model, h_tr, l_tr, progress=False)
        scores = ct.score_candidates(model, cands, h_val, l_val, mode=args.mode, progress=False)
        select_s = time.perf_counter() - start
        picks: dict[str, ct.Selection | str] = {}
        try:
            picks["COSMIC"] = ct.select_cosmic(scores, candidates=cands)
        except NoCandidateError as err:
            picks["COSMIC"] = err.selection.message
        baseline = ct.select_refusal_tokens(scores, candidates=cands)
        picks["refusal tokens"] = baseline if baseline.found else baseline.message
        if isinstance(picks["COSMIC"], ct.Selection) and baseline.found:
            comp = ct.compare(picks["COSMIC"], baseline)
            print(f"{name}: same pick={comp.same_pick}, direction cosine={comp.direction_cosine:.3f}")
        none_asr = ct.evaluate(model, h_test, judge=judge, **gen).asr
        none_refusal = ct.evaluate(model, l_test, judge=judge, **gen).rate
        rows.append((name, "no intervention", "", fmt(none_asr), fmt(none_refusal), ""))
        for method, sel in picks.items():
            if isinstance(sel, str):
                rows.append((name, method, "none (see below)", "—", "—", ""))
                notes.append(f"{name}, {method}: {sel}")
                continue
            assert sel.direction is not None and sel.layer is not None
            ablation = ct.Intervention("ablate", args.mode, sel.direction, sel.layer, sel.reference)
            addition = ct.Intervention("add", args.mode, sel.direction, sel.layer, sel.reference)
            asr = ct.evaluate(model, h_test, judge=judge, intervention=ablation, **gen).asr
            induced = ct.evaluate(model, l_test, judge=judge, intervention=addition, **gen).rate
            kl = sel.scores.get("KL")
            pick = f"pos {sel.position}, layer {sel.layer}"
            rows.append(
                (name, method, pick, fmt(asr), fmt(induced), f"{kl:.3f}" if kl is not None else "?")
            )
        print(f"{name}: selection {select_s:.0f}s, total {time.perf_counter() - start:.0f}s", flush=True)

    print(
        f"\nmode={args.mode} n_train={args.n_train} n_val={args.n_val} n_test={args.n_test} "
        f"max_new_tokens={args.max_new_tokens}; judge = each organism's own phrases"
    )
    head = ("organism", "method", "pick", "ASR (harmful, ablated)", "refusal (harmless, added)", "KL")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    for note in notes:  # why a method picked nothing, below the table to keep it narrow
        print(note)
    print("done")


if __name__ == "__main__":
    main()
