"""Wall time of the behavioural audit on a run directory (the CPU preset by default).

Runs (or resumes) the run's stages up to selection with ``cosmic-tl``'s pipeline, then the
audit with K per method and a stratified sample, from scratch (its record and checkpoint
files are removed first, unless ``--resume``), and prints the audit's wall time, the
number of candidates and the generation work per candidate.

    python benchmarks/bench_audit.py RUN_DIR [--model smollm2-135m-refuse-odd] [--mode ace]
        [--k 8] [--stratified 8] [--threads N] [--resume]

A RUN_DIR that holds a run keeps its own settings; otherwise a CPU-preset run of
``--model`` is made there first (not timed). Last line:
``audit_seconds=<s> candidates=<n> seconds_per_candidate=<s>``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import torch

from cosmic_tl.config import Config, preset
from cosmic_tl.pipeline import Pipeline
from cosmic_tl.rundir import RunDir
from cosmic_tl.store import read_json, record_paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--model", default="smollm2-135m-refuse-odd")
    ap.add_argument("--mode", default="ace", choices=["ace", "lce"])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--stratified", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--resume", action="store_true", help="keep a finished or partial audit")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run = RunDir(args.run)
    if run.config.is_file():
        cfg = Config.from_dict(read_json(run.config))
    else:
        cfg = preset("cpu", model=args.model, mode=args.mode)
    with Pipeline(cfg, args.run, progress=False) as pipe:
        t0 = time.perf_counter()
        pipe.evaluate()
        print(f"stages up to evaluate: {time.perf_counter() - t0:.1f} s (reused where done)")
        if not args.resume:
            for path in record_paths(run.audit):
                path.unlink(missing_ok=True)
            shutil.rmtree(run.audit_parts, ignore_errors=True)
        t0 = time.perf_counter()
        result = pipe.audit(k=args.k, stratified=args.stratified, seed=args.seed)
        seconds = time.perf_counter() - t0
        pipe.report()
    n = len(result.rows)
    print(
        f"[{cfg.model}, {cfg.mode}, n_test {cfg.n_test}, max_new_tokens {cfg.max_new_tokens}, "
        f"torch threads {torch.get_num_threads()}] audit of {n} candidates "
        f"(K={args.k} per method + {args.stratified} stratified): {seconds:.1f} s"
    )
    for m, s in result.methods.items():
        print(
            f"  {m}: pick {s.pick} behaviour {s.pick_score}; best {s.best} {s.best_score} "
            f"(removed by {s.best_removed_by!r}); best passing {s.best_kept} {s.best_kept_score}; "
            f"regret {s.regret}; Spearman {s.spearman} (n={s.n_spearman})"
        )
    print(f"audit_seconds={seconds:.1f} candidates={n} seconds_per_candidate={seconds / max(n, 1):.1f}")


if __name__ == "__main__":
    main()
