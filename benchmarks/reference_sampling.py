"""Does ``reference_sample`` draw the prompt lists the published COSMIC code drew?

Loads the four splits in ../shared/data/cosmic-splits the way the published loader does
(each record's ``instruction``, in file order, nothing dropped), samples them with
``reference_sample(..., n_train=64, n_val=16, seed=42)`` and compares with the prompt
lists recorded in the reference fixture. Prints one line per set and, last,
``sampling_equal=true|false``.

    python benchmarks/reference_sampling.py [--splits DIR] [--fixture PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cosmic_tl as ct

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = ("harmful_train", "harmless_train", "harmful_val", "harmless_val")


def first_difference(ours: list[str], theirs: list[str]) -> str:
    """Where two prompt lists first differ, in a line."""
    if len(ours) != len(theirs):
        return f"lengths {len(ours)} vs {len(theirs)}"
    i = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
    return f"item {i}: ours {ours[i][:60]!r} vs reference {theirs[i][:60]!r}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--splits", type=Path, default=SHARED / "cosmic-splits")
    ap.add_argument(
        "--fixture",
        type=Path,
        default=SHARED / "reference-fixtures/smollm2-135m-instruct_ace_seed42_ntrain64_nval16.json",
    )
    args = ap.parse_args()
    splits = {
        name: [r["instruction"] for r in json.loads((args.splits / f"{name}.json").read_text())]
        for name in SETS
    }
    recorded = json.loads(args.fixture.read_text())["prompts"]
    sampled = ct.reference_sample(*(splits[s] for s in SETS), n_train=64, n_val=16, seed=42)
    drawn = dict(zip(SETS, sampled, strict=True))
    equal = True
    for name in SETS:
        same = drawn[name] == recorded[name]
        equal &= same
        detail = "" if same else f"; first difference at {first_difference(drawn[name], recorded[name])}"
        print(f"{name}: {len(splits[name])} in split, {len(drawn[name])} drawn, equal={same}{detail}")
    # For contrast: each set from its own seeded generator (sample_prompts) is not the same.
    separate = [ct.sample_prompts(splits[s], len(recorded[s]), seed=42) for s in SETS]
    matches = sum(a == recorded[s] for a, s in zip(separate, SETS, strict=True))
    print(f"per-set seeded sampling (sample_prompts) equals the reference for {matches} of 4 sets")
    print(f"sampling_equal={str(equal).lower()}")


if __name__ == "__main__":
    main()
