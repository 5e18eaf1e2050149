"""Speed of the stability resamples against re-running the pipeline on each resample.

On a run directory (made by ``cosmic-tl run``/``score``; its model, prompts and
settings are used): build the shared work once (per-prompt train activations, the val
runners' clean caches), time ``--resamples`` resamples, then time the straightforward
computation of the first ``--reruns`` resamples — ``compute_candidates`` and
``score_candidates`` on the explicitly resampled prompt lists, then the selections — and
check that both give the same picks. Nothing is written to the run directory.

    python benchmarks/bench_stability.py runs/NAME [--resamples 10] [--seed 0] [--reruns 1]

Last line: ``per_resample=<s> rerun=<s> ratio=<rerun/per_resample> picks_agree=<true|false>``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cosmic_tl.bootstrap import SETS
from cosmic_tl.candidates import compute_candidates
from cosmic_tl.config import Config
from cosmic_tl.pipeline import Pipeline
from cosmic_tl.rundir import RunDir, filtered_method, run_methods
from cosmic_tl.selection import SELECT, NoCandidateError
from cosmic_tl.store import read_json


def rerun(pipe: Pipeline, indices: dict[str, tuple[int, ...]]) -> dict[str, object]:
    """The picks of a full re-run on the resampled lists (methods on the run's own prompts)."""
    cfg = pipe.cfg
    drawn = {n: pipe.chat(n).subset(list(indices[n])) for n in SETS}
    cands = compute_candidates(
        pipe.model,
        drawn["harmful_train"],
        drawn["harmless_train"],
        batch_size=cfg.batch_size,
        progress=False,
    )
    methods = [m for m in run_methods(cfg) if not filtered_method(m, cfg)]
    pipe.progress = False
    scores = pipe._score(
        cands, drawn["harmful_val"], drawn["harmless_val"], tuple(methods[1:]), cfg.refusal_tokens
    )
    picks: dict[str, object] = {}
    for m in methods:
        try:
            picks[m] = SELECT[m](scores, cfg.selection, cands).pick
        except NoCandidateError:
            picks[m] = None
    return picks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run directory")
    ap.add_argument("--resamples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reruns", type=int, default=1, help="resamples to re-run the straightforward way")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config.from_dict(read_json(RunDir(args.run).config))
    print(
        f"run {args.run}: {cfg.model}, {cfg.mode}, n_train {cfg.n_train}, n_val {cfg.n_val}, threads {torch.get_num_threads()}"
    )
    with Pipeline(cfg, args.run, progress=False, say=lambda _: None) as pipe:
        pipe.scores()  # up to date in a finished run; the filter's outcome is needed
        _ = pipe.model
        t0 = time.perf_counter()
        boot = pipe.bootstrap(args.seed)
        setup = time.perf_counter() - t0
        print(f"shared work (train activations, val runners): {setup:.1f} s", flush=True)
        done = []
        for b in range(args.resamples):
            r = boot.resample(b)
            done.append(r)
            print(
                f"resample {b}: {r.seconds:.1f} s, {r.stats.get('passes', 0):.0f} passes, picks {r.picks}",
                flush=True,
            )
        per = sum(r.seconds for r in done) / len(done)
        agree = True
        times = []
        for b in range(min(args.reruns, args.resamples)):
            t0 = time.perf_counter()
            picks = rerun(pipe, done[b].indices)
            times.append(time.perf_counter() - t0)
            same = all(done[b].picks[m] == p for m, p in picks.items())
            agree &= same
            print(
                f"re-run of resample {b}: {times[-1]:.1f} s, picks {picks} ({'same' if same else 'DIFFERENT'})",
                flush=True,
            )
    st = boot.summary(done)
    for name, m in st.methods.items():
        r = m.modal_share
        print(
            f"{name}: modal {m.modal} {r.k}/{r.n} [{r.low:.2f}, {r.high:.2f}], no pick {m.n_none}, mean cosine {m.mean_cosine:.3f}"
        )
    rer = sum(times) / len(times) if times else float("nan")
    total = setup + sum(r.seconds for r in done)
    print(f"total for {args.resamples} resamples: {total:.1f} s (shared work {setup:.1f} s)")
    print(
        f"per_resample={per:.1f} rerun={rer:.1f} ratio={rer / per:.2f} picks_agree={str(agree).lower()}"
    )


if __name__ == "__main__":
    main()
