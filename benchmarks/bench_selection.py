"""Speed of the scoring engine against the straightforward reference loop.

On a model (default smollm2-135m-instruct; ``--model gemma3-270m`` for Gemma 3's 262k
vocabulary) with bundled prompts: first one plain Hugging Face forward and one bridge
forward of the harmful validation batch (full logits, as the loop runs them), then, for
ACE and LCE, the reference loop (three full forward passes per candidate, full logits,
every layer) and the engine side by side in one process: wall times, the speed ratio,
executed GFLOP (the engine's include its clean passes and the shared-prefix check) and
GFLOP/s against the measured matmul rate (for the engine also against the rate measured
right before and right after it), and whether the COSMIC and baseline picks agree. The
loop's FLOP count includes, outside LCE mode, its three extra passes per candidate with
linear interventions for the refusal-token baseline. Then the engine alone on the CPU
preset (n_train 64, n_val 16, ACE).

The "plain HF forward" is the model loaded a second time by ``transformers`` alone: the
bridge's ``original_model`` runs through the bridge's components.

    python benchmarks/bench_selection.py [--model NAME] [--n-train 32] [--n-val 8] [--skip-preset] [--threads N]
    python benchmarks/bench_selection.py --preset-only   # just the CPU-preset timing
    python benchmarks/bench_selection.py --engine-only [--modes ace]   # the engine's rate, no loop

Last line: ``speedup=<min ratio over modes> picks_agree=<true|false>``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from _common import forward_flops, matmul_rate, sample
from reference_impl import _batches, as_scores, reference_scores

import cosmic_tl as ct
from cosmic_tl.selection import NoCandidateError


def picks(scores: ct.Scores) -> tuple[object, object]:
    try:
        cosmic = ct.select_cosmic(scores).pick
    except NoCandidateError as err:
        cosmic = ("none", tuple(sorted(err.selection.counts.items())))
    return cosmic, ct.select_refusal_tokens(scores).pick


def plain_hf(model: Any) -> Any:
    """The bridge's model loaded again by ``transformers`` alone, from the directory or
    hub name the bridge booted (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    source = model.original_model.config.name_or_path
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


def time_forwards(model: Any, hf: Any, prompts: list[str], rate: float, repeats: int = 3) -> None:
    """One batch through the plain HF model ``hf`` and through the bridge, full logits
    (best of ``repeats``), with its FLOP split into blocks and unembedding."""
    [batch] = list(_batches(model, prompts, len(prompts)))
    tokens, mask = batch.tokens, batch.attention_mask
    blocks = forward_flops(model, [batch], full_logits=False) - 2.0 * tokens.shape[0] * (
        model.cfg.d_model * model.cfg.d_vocab
    )
    total = forward_flops(model, [batch], full_logits=True)
    print(
        f"batch {tuple(tokens.shape)}: {total / 1e9:.1f} GFLOP per full-logit forward "
        f"({blocks / 1e9:.1f} in the {model.cfg.n_layers} blocks, {(total - blocks) / 1e9:.1f} "
        f"in the unembedding)"
    )
    for name, run in (
        ("plain HF forward", lambda: hf(tokens, attention_mask=mask).logits),
        ("bridge forward", lambda: model(tokens, attention_mask=mask)),
    ):
        best = float("inf")
        with torch.no_grad():
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - t0)
        print(
            f"{name:<17} {best:6.2f} s  {total / best / 1e9:6.1f} GFLOP/s "
            f"({total / best / 1e9 / rate:.0%} of matmul rate)",
            flush=True,
        )


def time_engine(
    model: object,
    cands: ct.Candidates,
    h_val: list[str],
    l_val: list[str],
    mode: str,
    batch_size: int,
    rate: float,
) -> tuple[ct.Scores, float]:
    """Score all candidates with the engine once; print its wall time and GFLOP/s (clean
    passes included) against ``rate`` and against the matmul rate measured right before
    and right after it (the machine's own rate drifts by 10-30 % within minutes)."""
    before = matmul_rate()
    t0 = time.perf_counter()
    eng = ct.score_candidates(
        model, cands, h_val, l_val, mode=mode, batch_size=batch_size, progress=False
    )
    seconds = time.perf_counter() - t0
    after = matmul_rate()
    gflop = eng.stats["gflop"]
    print(
        f"[{mode}] engine:         {seconds:8.1f} s  {gflop:9.0f} GFLOP  "
        f"{gflop / seconds:6.1f} GFLOP/s ({gflop / seconds / rate:.0%} of matmul rate); "
        f"picks (cosmic, baseline) {picks(eng)}",
        flush=True,
    )
    print(
        f"[{mode}] matmul rate right before / after the engine: {before:.1f} / {after:.1f} GFLOP/s "
        f"(the engine at {gflop / seconds / before:.0%} / {gflop / seconds / after:.0%} of it)",
        flush=True,
    )
    return eng, seconds


def time_preset(model: object, *, baseline: bool) -> float:
    """Candidates + scoring + selection at CPU-preset sizes (ACE), timed and printed."""
    cfg = ct.preset("cpu")
    h_tr, l_tr = (sample(k, "train", cfg.n_train, cfg.seed) for k in ("harmful", "harmless"))
    h_val, l_val = (sample(k, "val", cfg.n_val, cfg.seed) for k in ("harmful", "harmless"))
    t0 = time.perf_counter()
    c = ct.compute_candidates(model, h_tr, l_tr, batch_size=cfg.batch_size, progress=False)
    s = ct.score_candidates(
        model, c, h_val, l_val, mode="ace", batch_size=cfg.batch_size, baseline=baseline, progress=False
    )
    sel = ct.select_cosmic(s, candidates=c)
    base = ct.select_refusal_tokens(s, candidates=c).pick if baseline else "(baseline off)"
    seconds = time.perf_counter() - t0
    print(
        f"[cpu preset, ace, baseline {'on' if baseline else 'off'}] candidates + scoring + selection: "
        f"{seconds:.1f} s (n_train {cfg.n_train}, n_val {cfg.n_val}); cosmic pick {sel.pick}, "
        f"baseline pick {base}",
        flush=True,
    )
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--n-val", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--skip-preset", action="store_true", help="skip the CPU-preset timing")
    ap.add_argument(
        "--preset-only",
        action="store_true",
        help="only time the CPU preset, with the baseline on and off (last line: preset_seconds=...)",
    )
    ap.add_argument(
        "--engine-only",
        action="store_true",
        help="skip the reference loop (no ratio): the forwards and the engine's GFLOP/s only",
    )
    ap.add_argument("--modes", nargs="+", choices=("ace", "lce"), default=["ace", "lce"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    rate = matmul_rate()
    print(f"threads={torch.get_num_threads()} measured fp32 matmul rate: {rate:.1f} GFLOP/s")
    model = ct.load_model(args.model, device="cpu")
    if args.preset_only:
        on, off = time_preset(model, baseline=True), time_preset(model, baseline=False)
        print(f"preset_seconds={on:.1f} preset_seconds_without_baseline={off:.1f}")
        return
    h_tr, l_tr = (sample(k, "train", args.n_train, args.seed) for k in ("harmful", "harmless"))
    h_val, l_val = (sample(k, "val", args.n_val, args.seed) for k in ("harmful", "harmless"))
    time_forwards(model, plain_hf(model), h_val, rate)
    cands = ct.compute_candidates(model, h_tr, l_tr, batch_size=args.batch_size, progress=False)
    k, n = cands.directions.shape[:2]
    token_ids = ct.encode_refusal_tokens(model.tokenizer, ct.default_refusal_tokens(args.model))
    pass_flops = forward_flops(model, list(_batches(model, h_val, args.batch_size)), full_logits=True)
    pass_flops += 2 * forward_flops(
        model, list(_batches(model, l_val, args.batch_size)), full_logits=True
    )
    print(
        f"model={args.model} layers={n} positions={k} candidates={k * n} "
        f"n_train={args.n_train} n_val={args.n_val}"
    )

    ratios, agree = [], []
    for mode in args.modes:
        if args.engine_only:
            time_engine(model, cands, h_val, l_val, mode, args.batch_size, rate)
            continue
        t0 = time.perf_counter()
        ref = reference_scores(
            model,
            cands.directions,
            cands.harmless_mean,
            h_tr,
            l_tr,
            h_val,
            l_val,
            mode=mode,
            token_ids=token_ids,
            batch_size=args.batch_size,
        )
        t_ref = time.perf_counter() - t0
        # Three full passes per candidate (train means excluded); outside LCE mode three
        # more with linear interventions, for the refusal-token baseline's grids.
        ref_flops = k * n * pass_flops * (1 if mode == "lce" else 2)
        print(
            f"[{mode}] reference loop: {t_ref:8.1f} s  {ref_flops / 1e9:9.0f} GFLOP  "
            f"{ref_flops / t_ref / 1e9:6.1f} GFLOP/s ({ref_flops / t_ref / 1e9 / rate:.0%} of matmul rate)"
        )
        eng, t_eng = time_engine(model, cands, h_val, l_val, mode, args.batch_size, rate)
        ref_picks, eng_picks = picks(as_scores(ref, eng, mode, cands.directions)), picks(eng)
        diff = max(
            float((eng.grids[g][eng.computed[g]] - ref["grids"][g][eng.computed[g]]).abs().max())
            for g in eng.grids
            if g in ref["grids"] and bool(eng.computed[g].any())
        )
        ok = ref_picks == eng_picks
        ratios.append(t_ref / t_eng)
        agree.append(ok)
        print(
            f"[{mode}] speedup {t_ref / t_eng:.2f}x; max |grid diff| on computed cells {diff:.2e}; "
            f"picks (cosmic, baseline) reference={ref_picks} engine={eng_picks} agree={ok}"
        )

    if not args.skip_preset:
        time_preset(model, baseline=True)
    if args.engine_only:
        return
    print(f"speedup={min(ratios):.2f} picks_agree={'true' if all(agree) else 'false'}")


if __name__ == "__main__":
    main()
