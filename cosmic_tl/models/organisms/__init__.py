"""Recipes that build refusal model organisms from a base model directory.

The stock SmolLM2-135M-Instruct hardly refuses, so there is no strong refusal
behaviour to find a direction for. A short supervised fine-tune on the CPU gives
it one, in a style we choose (:mod:`.texts`):

- ``smollm2-135m-refuse``: harmful requests get an ordinary refusal ("I'm sorry,
  but I can't help with that…"), which the default substring judge recognises;
- ``smollm2-135m-refuse-odd``: harmful requests get a refusal in a style of our own
  ("Declined: …", "Not something to assist with — …") that contains no default
  judge phrase and does not start with a default refusal token ("I", "As"). Its
  card records the phrases that do mark its refusals.

In both, harmless requests keep the base model's own greedy answers
(self-distillation), so harmless behaviour is preserved. A base that does not follow
instructions takes a ``teacher``'s answers instead:

- ``gemma3-270m-refuse``: Gemma 3 270M base, answering harmless requests as
  SmolLM2-135M-Instruct does and refusing harmful ones in ordinary words.

Only the bundled *train* prompt splits are trained on, each with reworded copies
(:mod:`.rephrasing`); the loss covers the response tokens only (:mod:`.training`). :func:`build` writes an
organism into a directory given the base model's directory (:mod:`.builder`);
nothing here knows alias names or the cache. By name, through the cache::

    from cosmic_tl.models import build_organism, load_model, organism_judge

    path = build_organism("smollm2-135m-refuse")   # 11-13 min on 2 CPU cores once, then cached
    model = load_model("smollm2-135m-refuse")
    judge = organism_judge("smollm2-135m-refuse-odd")
"""

from cosmic_tl.models.organisms.builder import build, measure
from cosmic_tl.models.organisms.recipes import RECIPES, Recipe
from cosmic_tl.models.organisms.rephrasing import rephrase, reworded
from cosmic_tl.models.organisms.texts import (
    ODD_PHRASES,
    ODD_REFUSALS,
    ORDINARY_REFUSALS,
    Style,
    judge_phrases,
    refusal_texts,
)
from cosmic_tl.models.organisms.training import (
    IGNORE,
    Example,
    SFTBatch,
    block_inputs,
    collate,
    finetune,
    greedy_answers,
    refusal_examples,
    response_loss,
    trainable_parameters,
)

__all__ = [
    "IGNORE",
    "ODD_PHRASES",
    "ODD_REFUSALS",
    "ORDINARY_REFUSALS",
    "RECIPES",
    "Example",
    "Recipe",
    "SFTBatch",
    "Style",
    "block_inputs",
    "build",
    "collate",
    "finetune",
    "greedy_answers",
    "judge_phrases",
    "measure",
    "refusal_examples",
    "refusal_texts",
    "rephrase",
    "response_loss",
    "reworded",
    "trainable_parameters",
]
