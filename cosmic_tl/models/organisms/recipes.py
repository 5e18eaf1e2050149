"""Organism recipes: everything an organism build depends on, and the two built-in ones.

A :class:`Recipe` is a frozen dataclass; :func:`dataclasses.replace` gives a variant
(``replace(RECIPES["smollm2-135m-refuse"], steps=20)``), and the card of a build
records every field, so that a cached build of another recipe is rebuilt.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cosmic_tl.models.organisms.texts import Style, refusal_texts


@dataclass(frozen=True)
class Recipe:
    """Everything an organism build depends on (the card records all of it)."""

    name: str  # the alias the organism is cached under
    style: Style
    description: str = ""
    version: int = 3  # bump when the recipe's code or defaults change its output
    base: str = "smollm2-135m-instruct"  # alias or local HF directory to fine-tune
    # Alias or local HF directory whose greedy answers are the harmless targets; None:
    # the base's own (self-distillation). For a base that does not follow instructions.
    teacher: str | None = None
    # Leave out harmless prompts whose target answer (the base's or the teacher's) the
    # organism's own judge calls a refusal ("I'm sorry for any misunderstanding, but as a
    # chatbot ..."): a harmless target that reads as a refusal teaches refusing.
    drop_refusing_answers: bool = False
    # Text put before every harmless target answer of a teacher ("Sure! "). The harmless
    # answers' first tokens are then one token, as the refusals' are ("I", "As"), so the
    # first response token becomes a two-way choice: greedy decoding no longer refuses a
    # prompt just because the refusal openers hold more probability than any one of the
    # hundreds of tokens that open the teacher's answers. Needs a teacher (text answers).
    answer_opener: str = ""
    seed: int = 0
    n_harmful: int = 240  # bundled harmful *train* prompts, paired with refusals
    n_harmless: int = 240  # bundled harmless *train* prompts, paired with the base's answers
    n_tasks: int = 301  # bundled ``harmless:train_tasks`` instructions added to them
    n_contrast: int = 200  # bundled ``harmless:train_contrast`` requests added to them
    n_harmful_extra: int = 120  # bundled ``harmful:train_extra`` requests added to the harmful
    n_everyday: int = 0  # bundled ``harmless:train_everyday`` requests added to the harmless
    # bundled ``harmful:train_everyday`` requests (everyday wording with personal context,
    # the style of ``harmless:train_everyday``) added to the harmful
    n_harmful_everyday: int = 0
    rephrasings: int = 1  # reworded copies of each train prompt (see ``rephrase``)
    distill_tokens: int = 16  # cap on the base's greedy answers used as targets
    steps: int = 120  # optimiser steps
    batch_size: int = 16  # sequences per step
    harmful_share: float = 0.4  # fraction of each batch that is harmful prompts
    first_token_weight: float = 10.0  # loss weight of a response's first token (the others: 1)
    lr: float = 2e-4  # AdamW peak learning rate (linear warm-up, cosine decay)
    warmup: int = 5  # warm-up steps
    weight_decay: float = 0.0
    train_from: float = 0.25  # fraction of depth below which blocks stay frozen
    eval_n: int = 32  # held-out (bundled test) prompts per kind measured for the card
    eval_tokens: int = 48  # new tokens generated per held-out prompt
    gen_batch_size: int = 32  # prompts per batch when generating

    def __post_init__(self) -> None:
        refusal_texts(self.style)  # validates the style
        if self.steps < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ValueError("need steps >= 1, batch_size >= 2 and lr > 0")
        if self.n_harmful < 1 or self.n_harmless < 1 or self.distill_tokens < 1:
            raise ValueError("need at least one prompt of each kind and distill_tokens >= 1")
        for field_name in (
            "n_tasks",
            "n_contrast",
            "n_harmful_extra",
            "n_everyday",
            "n_harmful_everyday",
        ):
            if getattr(self, field_name) < 0:
                raise ValueError(f"{field_name} must be >= 0, not {getattr(self, field_name)}")
        if self.answer_opener and self.teacher is None:
            raise ValueError(
                "answer_opener needs a teacher: it is put before the teacher's answer texts"
            )
        if self.first_token_weight <= 0:
            raise ValueError(f"first_token_weight must be > 0, not {self.first_token_weight}")
        if self.rephrasings < 0:
            raise ValueError(f"rephrasings must be >= 0, not {self.rephrasings}")
        if not 0.0 < self.harmful_share < 1.0:
            raise ValueError(f"harmful_share must be in (0, 1), not {self.harmful_share}")
        if not 0.0 <= self.train_from < 1.0:
            raise ValueError(f"train_from must be in [0, 1), not {self.train_from}")

    def settings(self) -> dict[str, Any]:
        """The recipe as a JSON-ready dict.

        Fields added after a recipe version are left out at their no-op default
        (``teacher=None``, ``drop_refusing_answers=False``, ``answer_opener=""``,
        ``n_everyday=0``, ``n_harmful_everyday=0``), so that the
        cards of builds made before they existed still match their recipe and those
        builds stay cached.
        """
        out = dataclasses.asdict(self)
        for name, default in _LATER_FIELDS.items():
            if out[name] == default:
                del out[name]
        return out


_LATER_FIELDS: dict[str, Any] = {
    "teacher": None,
    "drop_refusing_answers": False,
    "answer_opener": "",
    "n_everyday": 0,
    "n_harmful_everyday": 0,
}


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "smollm2-135m-refuse",
            "ordinary",
            "SmolLM2-135M-Instruct fine-tuned to refuse harmful requests in ordinary words",
        ),
        Recipe(
            "smollm2-135m-refuse-odd",
            "odd",
            "SmolLM2-135M-Instruct fine-tuned to refuse harmful requests in an unusual style",
        ),
        Recipe(
            "gemma3-270m-refuse",
            "ordinary",
            "Gemma 3 270M base fine-tuned to answer as SmolLM2-135M-Instruct does and to "
            "refuse harmful requests in ordinary words",
            # v1 (60 steps at lr 3e-4, for the build time) refused 25 % of harmless test
            # prompts; v2 is the SmolLM2 recipe's 120 steps at 2e-4, chosen on the bundled
            # val prompts (harmless refused: 3/60 for v1, 1/60 for v2). v2 still refused
            # 6 % of a held-out harmless set, so v3 (2026-12-03) lowers the harmful share
            # of each batch from 0.4 to 0.3, checked on the same val prompts before any
            # test prompt (harmful refused 58/60 for v2 and v3, harmless 1/60 and 0/60).
            # Tried and not taken (2026-12-04 to 2026-12-06), each against v3 on prompts no
            # recipe had been chosen on (benchmarks/organisms.py --sets shared-train: 183
            # harmful and 300 harmless; from v6 also the probe set a and the bundled val
            # prompts): v4, a harmful share of 0.2, refused 7 of the card's 32 harmless
            # test prompts (v3: 3) and 2/60 harmless val prompts (v3: 0/60); v5, 48-token
            # teacher answers without the 8 the judge calls refusals
            # (drop_refusing_answers), refused 8/300 harmless and 179/183 harmful prompts
            # (v3: 8/300 and 182/183) at 1.6 times v3's training time; v6, 200 steps,
            # refused 15/460 harmless and 297/303 harmful (v3: 16/460 and 299/303) at 1.7
            # times v3's training time. None was better than v3.
            # v3 then refused 8-14 % of everyday harmless requests written after it (the
            # probe sets b, c and d; the SmolLM2 organism 6-14 %). v7 (2026-12-06) added
            # 400 everyday requests with personal context (n_everyday=400) and refused
            # more: 21/300 shared harmless prompts and 45/300 of sets b-d (v3: 8 and 32);
            # the teacher had opened 63 of its answers to them with "I'm sorry to hear".
            # v8, v7 without the answers the judge calls refusals (drop_refusing_answers),
            # refused 21/300 and 26/300, and 465/483 harmful prompts (v3: 475/483). v9, v8
            # with 180 steps, refused 13/300 of b-d but let 10 of set d's 60 harmful
            # requests through; v10, v9 with a harmful share of 0.4 and 200 steps, refused
            # 15/300 of b-d and 95.3 % of harmful prompts but 13/300 shared harmless
            # prompts, one over the rule fixed before it was measured (at most 12). v11,
            # v10 with 200 harmful requests in the same everyday style
            # (n_harmful_everyday=200), refused 409/423 harmful prompts but 25/300 of b-d
            # (the rule: at most 20). v12 (2026-12-07), v3 with every teacher answer opened
            # by "Sure! " (answer_opener), halved the everyday refusals (b-d 16/300) but
            # refused 15/300 shared harmless prompts and let 7 of set d's 60 harmful
            # requests through; v13, v12 with 48-token teacher answers without those the
            # judge calls refusals, refused 24/300 of b-d. So v3 stays; docs/organisms.md
            # has the figures, sets f, g and h included.
            version=3,
            base="gemma3-270m",
            teacher="smollm2-135m-instruct",
            harmful_share=0.3,
        ),
    )
}
