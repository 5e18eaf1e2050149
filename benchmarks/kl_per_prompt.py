"""Each harmless validation prompt's share of a candidate's KL, from a run directory.

COSMIC's KL filter (and the baselines') drops a candidate whose ablation moves the
next-token distribution of the harmless validation prompts by more than a threshold,
averaged over the prompts. A few prompts that the model refuses, or nearly refuses, can
carry most of that mean. This script ablates one candidate of a finished run (the
run's mode, placement and system prompt) and prints, per prompt, its KL and the top
next token with and without the ablation, then the mean beside the KL that the run's
scores hold for the cell::

    python benchmarks/kl_per_prompt.py --run runs/pairs --position -1 --layer 13
    python benchmarks/kl_per_prompt.py --run runs/pairs            # the best cell the filter dropped

Prompts come from the run's harmless validation set unless ``--prompts FILE`` names
another file. Reads the run's candidates; computes one forward per prompt and candidate.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from cosmic_tl.candidates import Candidates
from cosmic_tl.config import Config, torch_dtype
from cosmic_tl.interventions import Intervention, intervene
from cosmic_tl.models import load_model
from cosmic_tl.pipeline import load_run_prompts
from cosmic_tl.prompts import load_prompts
from cosmic_tl.rundir import RunDir
from cosmic_tl.scoring import Scores, kl_divergence
from cosmic_tl.selection import NoCandidateError, ranking_order, select_cosmic
from cosmic_tl.store import read_json
from cosmic_tl.templates import chat_prompts


def best_dropped(scores: Scores, cfg: Config) -> tuple[int, int]:
    """The highest-ranked cell COSMIC's KL filter dropped, else COSMIC's pick."""
    try:
        sel = select_cosmic(scores, cfg.selection)
    except NoCandidateError as err:
        sel = err.selection
    order = ranking_order(scores, "cosmic", cfg.selection)
    cell = next(((i, j) for i, j in order if sel.reasons[i][j] == "kl"), None)
    if cell is not None:
        return scores.positions[cell[0]], cell[1]
    if sel.pick is None:
        raise SystemExit(f"no candidate was dropped by KL and none was picked: {sel.message}")
    return sel.pick


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a run directory with candidates and scores")
    ap.add_argument("--position", type=int, help="candidate position (default: see above)")
    ap.add_argument("--layer", type=int)
    ap.add_argument("--prompts", help="harmless prompts (default: the run's validation set)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = RunDir(Path(args.run))
    cfg = Config.from_dict(read_json(run.config))
    scores = Scores.load(run.scores())
    if (args.position is None) != (args.layer is None):
        ap.error("give both --position and --layer, or neither")
    pos, layer = (args.position, args.layer) if args.position is not None else best_dropped(scores, cfg)
    model = load_model(cfg.model, device=cfg.device, dtype=torch_dtype(cfg.dtype))
    cands = Candidates.load(run.candidates())
    cands.check_compatible(model)
    ablation = Intervention(
        "ablate",
        cfg.mode,
        cands.direction(pos, layer).float(),
        layer=layer,
        reference=cands.reference(pos, layer).float(),
        placement=cfg.ablation_placement,
    )
    texts = (
        load_prompts(args.prompts, split="val")
        if args.prompts
        else load_run_prompts(cfg)["harmless_val"]
    )
    prompts = chat_prompts(model.tokenizer, texts, system=cfg.system_prompt)
    rows = []
    with torch.no_grad():
        for text, ids in zip(prompts.instructions, prompts.ids, strict=True):
            tokens = torch.tensor([ids], device=model.cfg.device)
            clean = model(tokens)[:, -1]
            with intervene(model, ablation):
                ablated = model(tokens)[:, -1]
            kl = float(kl_divergence(clean, ablated)[0])
            tops = [model.tokenizer.decode(int(x.argmax())) for x in (clean[0], ablated[0])]
            rows.append((kl, tops, text))
    print(f"model={cfg.model} mode={cfg.mode} candidate position {pos}, layer {layer}")
    print(f"{'KL':>7}  {'share':>5}  {'top token clean → ablated':28}  prompt")
    total = sum(r[0] for r in rows)
    for kl, (a, b), text in sorted(rows, key=lambda r: -r[0]):
        share = kl / total if total else math.nan
        print(f"{kl:7.3f}  {share:5.0%}  {a!r:>12} → {b!r:12}  {text[:70]}")
    i = scores.positions.index(pos)
    held = scores.grids["KL"][i, layer]
    computed = bool(scores.computed["KL"][i, layer])
    print(
        f"mean KL over {len(rows)} prompts: {total / len(rows):.4f}; the run's KL for the cell: "
        + (f"{float(held):.4f}" if computed else "not computed")
        + f" (threshold {cfg.selection.kl_threshold:g})"
    )


if __name__ == "__main__":
    main()
