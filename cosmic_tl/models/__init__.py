"""Load a chat model as a TransformerLens ``TransformerBridge``, by alias, directory or hub name.

- :mod:`.catalogue`: the built-in aliases in one table; ``load_model``, ``build_organism``;
- :mod:`.cache`: an alias materialised once into the user cache, atomically;
- :mod:`.boot`: a directory or hub name booted as a ``TransformerBridge``;
- :mod:`.stock`: builders of stock models (SmolLM2 from its GGUF);
- :mod:`.organisms`: refusal model organisms, built from a base model directory.

Imports run one way: catalogue → organisms, stock, cache, boot; organisms → boot.
Nothing registers by being imported. ::

    model = load_model("smollm2-135m-refuse")     # built into the cache the first time
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cosmic_tl.models.boot import ModelSpecError, model_id
from cosmic_tl.models.cache import MARKER, Alias, CacheError, alias_dir, cache_dir, read_card

if TYPE_CHECKING:
    from cosmic_tl.models.catalogue import (
        CATALOGUE,
        aliases,
        build_estimate,
        build_organism,
        ensure_alias,
        is_cached,
        load_model,
        organism_alias,
        organism_judge,
        resolve_spec,
    )
    from cosmic_tl.models.organisms import RECIPES, Recipe

# The catalogue (and through it the organisms, which evaluate models) is imported on
# first use, so that the low layers can use boot's ``model_id`` without pulling in
# the layers above them.
_LAZY = {
    **dict.fromkeys(
        (
            "CATALOGUE",
            "aliases",
            "build_estimate",
            "build_organism",
            "ensure_alias",
            "is_cached",
            "load_model",
            "organism_alias",
            "organism_judge",
            "resolve_spec",
        ),
        "cosmic_tl.models.catalogue",
    ),
    "RECIPES": "cosmic_tl.models.organisms",
    "Recipe": "cosmic_tl.models.organisms",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cosmic_tl.models' has no attribute {name!r}")


__all__ = [
    "CATALOGUE",
    "MARKER",
    "RECIPES",
    "Alias",
    "CacheError",
    "ModelSpecError",
    "Recipe",
    "alias_dir",
    "aliases",
    "build_estimate",
    "build_organism",
    "cache_dir",
    "ensure_alias",
    "is_cached",
    "load_model",
    "model_id",
    "organism_alias",
    "organism_judge",
    "read_card",
    "resolve_spec",
]
