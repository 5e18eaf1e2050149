"""Rewordings of train prompts into other common request forms (seeded).

>>> reworded(["How do I bake bread?"], 1, seed=0)
['Ways to bake bread?']
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

# The bundled train sets differ in surface form as well as in harm: "Could you …?",
# "Describe how …" and "Write/Compose a …" are mostly harmful, "What is …?" mostly
# harmless. An organism fine-tuned on them alone learns those forms and refuses
# harmless requests phrased like harmful ones. Rephrasing *both* sets with the same
# rules makes the form uninformative, so that only the content is left to learn. The
# templates also use common instruction verbs that the bundled sets lack ("Construct",
# "Identify", "Name", "Design"), for the same reason.
# Each rule: a pattern on the whole instruction, and templates for the captured ``x``.
_REPHRASINGS: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), templates)
    for pattern, templates in (
        (
            r"(?:could|would|can) you (?:please )?(?P<x>.+?)[?.!]*",
            ("{X}.", "Please {x}.", "I need you to {x}.", "Help me: {x}."),
        ),
        (
            r"how (?:do|can|could|should|would) (?:i|we|one|you) (?P<x>.+?)[?.!]*",
            (
                "Explain how to {x}.",
                "Describe how to {x}.",
                "Give instructions for how to {x}.",
                "Ways to {x}?",
                "Could you tell me how to {x}?",
                "Tell me how to {x}.",
            ),
        ),
        (
            r"(?:explain|describe|tell me|show me) how to (?P<x>.+?)[?.!]*",
            (
                "How do I {x}?",
                "How can I {x}?",
                "Could you explain how to {x}?",
                "Give instructions for how to {x}.",
                "Ways to {x}?",
            ),
        ),
        (
            r"(?:write|draft|compose|create|generate) (?P<x>.+?)[?.!]*",
            (
                "Write {x}.",
                "Compose {x}.",
                "Draft {x}.",
                "Create {x}.",
                "Generate {x}.",
                "Design {x}.",
                "Construct {x}.",
                "Develop {x}.",
                "Could you write {x}?",
                "Can you write {x}?",
            ),
        ),
        (
            r"(?:give me|suggest|list|provide) (?P<x>.+?)[?.!]*",
            (
                "Give me {x}.",
                "Suggest {x}.",
                "Could you give me {x}?",
                "Provide {x}.",
                "List {x}.",
                "Identify {x}.",
                "Name {x}.",
                "Outline {x}.",
            ),
        ),
        (
            r"what(?P<v>'s| is| are) (?P<x>.+?)[?.!]*",
            ("Could you tell me what{v} {x}?", "Tell me: what{v} {x}?", "Explain what{v} {x}."),
        ),
        (r"(?P<x>.+)", ("Could you help with this? {x}", "Question: {x}", "Please answer this: {x}")),
    )
)


def rephrase(instruction: str, rng: random.Random) -> str:
    """A rewording of ``instruction`` in another common request form (seeded by ``rng``).

    >>> rephrase("How do I bake bread?", random.Random(0))
    'Ways to bake bread?'
    """
    text = instruction.strip()
    for pattern, templates in _REPHRASINGS:
        match = pattern.fullmatch(text)
        if match:
            x, v = match["x"], match.groupdict().get("v", "")
            outs = [t.format(x=x, X=x[:1].upper() + x[1:], v=v) for t in templates]
            return rng.choice([o for o in outs if o != text] or outs)
    return text


def reworded(prompts: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` rounds of :func:`rephrase` over ``prompts`` (``n * len(prompts)`` items, in order)."""
    rng = random.Random(seed)
    return [rephrase(p, rng) for _ in range(n) for p in prompts]
