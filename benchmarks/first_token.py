"""How sure an organism is when it refuses: its first response token, prompt by prompt.

An organism's refusals open with a few tokens ("I'm sorry…", "I can't…", "As an AI…"),
while its answers to harmless prompts open with hundreds of different tokens. Greedy
decoding takes the single most likely token, so an organism can refuse a prompt whose
refusal openers hold well under half the probability, when the answer's probability is
spread over many openers. This script measures how often that happens.

For each prompt set: the greedy answers (``--max-new-tokens``, the organism's own judge),
and at the first response position the *opener mass* (the summed probability of the
first tokens of the organism's refusal texts; an upper bound on the probability of
refusing, since "I" also opens some answers) and the largest probability of any other
token. Printed per set: the refused and the answered prompts' median opener mass, and
how many refused prompts had an opener mass below one half ("plurality refusals").

    python benchmarks/first_token.py [--organisms NAME_OR_DIR ...] [--threads N]
                                     [--extra harmless_mine=PATH ...] [--sets test]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from organisms import extra_sets, organism, prompt_sets

import cosmic_tl as ct
from cosmic_tl.models.organisms.texts import Style, refusal_texts


def opener_ids(tokenizer: Any, style: Style) -> list[int]:
    """First token of each refusal text as the organism writes it after the prompt."""
    return sorted({tokenizer.encode(text, add_special_tokens=False)[0] for text in refusal_texts(style)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organisms", nargs="+", default=["gemma3-270m-refuse"])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--extra", nargs="+", default=[], help="NAME=PATH prompt files of your own")
    ap.add_argument("--sets", nargs="*", choices=("test", "shared-val", "shared-train"), default=[])
    ap.add_argument("--n-shared-harmless", type=int, default=100)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = prompt_sets(args.sets, args.n_shared_harmless, 0) | extra_sets(args.extra)
    if not sets:
        raise SystemExit("no prompt sets (give --sets or --extra)")

    for name in args.organisms:
        model, card, judge = organism(name, rebuild=False)
        openers = opener_ids(model.tokenizer, card["style"])
        shown = [model.tokenizer.decode([i]) for i in openers]
        print(f"\n== {name}: refusal openers {shown}")
        print(
            f"{'prompts':<20}{'n':>5}{'refused':>9}   {'opener mass (median)':<28}"
            f"{'refused with mass < 0.5':>24}"
        )
        for set_name, prompts in sets.items():
            probs = torch.softmax(ct.clean_logits(model, prompts).double(), -1)
            mass = probs[:, openers].sum(-1)
            rest = probs.clone()
            rest[:, openers] = 0
            top_other = rest.max(-1).values
            result = ct.evaluate(
                model, prompts, judge=judge, max_new_tokens=args.max_new_tokens, progress=False
            )
            refused = [i for i, v in enumerate(result.verdicts) if v]
            answered = [i for i, v in enumerate(result.verdicts) if v is False]
            med_r = statistics.median(mass[refused].tolist()) if refused else float("nan")
            med_a = statistics.median(mass[answered].tolist()) if answered else float("nan")
            plural = [i for i in refused if mass[i] < 0.5]
            print(
                f"{set_name:<20}{len(prompts):>5}{len(refused):>9}   "
                f"refused {med_r:.2f}, answered {med_a:.2f}{'':<6}{len(plural):>10} of {len(refused)}"
            )
            if set_name.startswith("harmless"):
                for i in refused:
                    print(
                        f"{'':<8}mass {float(mass[i]):.2f}, top other {float(top_other[i]):.2f} "
                        f"({model.tokenizer.decode([int(rest[i].argmax())])!r}): {prompts[i][:70]!r}"
                    )


if __name__ == "__main__":
    main()
