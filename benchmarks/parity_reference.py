"""Parity with the published COSMIC reference code on the stock SmolLM2.

Reads ../shared/data/reference-fixtures/*.json (scores computed by the reference code),
recomputes candidates and scores with cosmic_tl on the exact same prompts, and prints
the evaluation layers, the largest grid differences and both picks.

    python benchmarks/parity_reference.py [--fixture PATH] [--lazy-only]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cosmic_tl as ct

DEFAULT = (
    Path(__file__).resolve().parents[2]
    / "shared/data/reference-fixtures/smollm2-135m-instruct_ace_seed42_ntrain64_nval16.json"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", type=Path, default=DEFAULT)
    ap.add_argument("--lazy-only", action="store_true", help="skip the full-grid comparison")
    args = ap.parse_args()
    fx = json.loads(args.fixture.read_text())
    p = fx["prompts"]
    model = ct.load_model("smollm2-135m-instruct", device="cpu")
    eoi = ct.end_of_instruction(model.tokenizer)
    print(
        f"EOI ids ours={list(eoi.token_ids)} reference={fx['eoi_token_ids']} "
        f"equal={list(eoi.token_ids) == fx['eoi_token_ids']}"
    )
    t0 = time.perf_counter()
    cands = ct.compute_candidates(model, p["harmful_train"], p["harmless_train"], progress=False)
    print(f"candidates {tuple(cands.directions.shape)} in {time.perf_counter() - t0:.1f} s")
    mode = "ace"
    ref = {
        k: torch.full((len(cands.positions), cands.n_layers), float("nan"), dtype=torch.float64)
        for k in ("S_abl", "S_add", "KL")
    }
    for row in fx["scores"]:
        i = cands.positions.index(row["position"])
        for k in ref:
            ref[k][i, row["layer"]] = row[k]
    runs = [("lazy", False)] if args.lazy_only else [("lazy", False), ("full", True)]
    ok = True
    for label, full in runs:
        t0 = time.perf_counter()
        s = ct.score_candidates(
            model,
            cands,
            p["harmful_val"],
            p["harmless_val"],
            mode=mode,
            full=full,
            baseline=False,
            progress=False,
        )
        took = time.perf_counter() - t0
        pick = ct.select_cosmic(s).pick
        diffs = {k: float((s.grids[k] - ref[k])[s.computed[k]].abs().max()) for k in ref}
        same_layers = sorted(s.eval_layers) == sorted(fx["eval_layers_L_low"])
        ref_pick = (fx["pick"]["position"], fx["pick"]["layer"])
        ok &= same_layers and pick == ref_pick and max(diffs.values()) < 1e-3
        print(
            f"[{label}] {took:.1f} s; eval layers ours={list(s.eval_layers)} "
            f"reference={fx['eval_layers_L_low']}; max |diff| "
            + ", ".join(f"{k}={v:.2e}" for k, v in diffs.items())
            + f"; cells computed {int(s.computed['KL'].sum())} KL / "
            f"{int(s.computed['S_abl'].sum())} S_abl; pick ours={pick} reference={ref_pick}"
        )
    print(f"parity={'true' if ok else 'false'}")


if __name__ == "__main__":
    main()
