"""Organism recipes: refusal styles, the response-only SFT loss, and builds on a tiny model."""

from __future__ import annotations

import dataclasses
import random
from types import MappingProxyType

import pytest
import torch
from beartype import beartype
from jaxtyping import jaxtyped
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cosmic_tl import models
from cosmic_tl.evaluation import DEFAULT_REFUSAL_PHRASES, SubstringJudge
from cosmic_tl.models import (
    ModelSpecError,
    alias_dir,
    build_organism,
    catalogue,
    is_cached,
    load_model,
    organism_alias,
    organism_judge,
    organisms,
    read_card,
)
from cosmic_tl.models.cache import MARKER, ensure, is_built
from cosmic_tl.models.organisms import (
    IGNORE,
    ODD_PHRASES,
    ODD_REFUSALS,
    ORDINARY_REFUSALS,
    Example,
    Recipe,
    collate,
    rephrase,
    response_loss,
    reworded,
    training,
)
from cosmic_tl.prompts import load_bundled
from cosmic_tl.scoring import encode_refusal_tokens

# A build of a few seconds: 4 prompts per kind, 3 steps, 2 held-out prompts per kind.
TINY = {
    "n_harmful": 4,
    "n_harmless": 4,
    "n_tasks": 2,
    "n_contrast": 1,
    "n_everyday": 1,
    "n_harmful_extra": 1,
    "n_harmful_everyday": 1,
    "distill_tokens": 4,
    "steps": 3,
    "batch_size": 4,
    "warmup": 1,
    "lr": 1e-3,
    "eval_n": 2,
    "eval_tokens": 4,
    "gen_batch_size": 4,
}
CARD_KEYS = {
    "organism",
    "recipe",
    "base_model",
    "style",
    "judge_phrases",
    "data",
    "training",
    "heldout",
    "seconds",
    "versions",
}


@pytest.fixture
def tiny_recipe(tiny_dir, monkeypatch, tmp_path):
    """An odd-style organism of the tiny random model, built in a private cache."""
    monkeypatch.setenv("COSMIC_TL_CACHE", str(tmp_path / "cache"))
    return Recipe("tiny-refuse-odd", "odd", "test organism", base=str(tiny_dir), train_from=0.5, **TINY)


@pytest.fixture
def tiny_in_catalogue(tiny_recipe, monkeypatch):
    """The tiny organism as a catalogue alias too, so that the command line knows its name.

    The catalogue is read-only and nothing registers into it; this test swaps in its
    own copy for its duration.
    """
    table = {**catalogue.CATALOGUE, tiny_recipe.name: organism_alias(tiny_recipe, build_seconds=5.0)}
    monkeypatch.setattr(catalogue, "CATALOGUE", MappingProxyType(table))
    return tiny_recipe


# ---------------------------------------------------------------- refusal styles


def test_ordinary_refusals_are_recognised_by_the_default_judge():
    verdicts = SubstringJudge()([""] * len(ORDINARY_REFUSALS), list(ORDINARY_REFUSALS))
    assert all(verdicts) and len(set(ORDINARY_REFUSALS)) == len(ORDINARY_REFUSALS) >= 12


def test_odd_refusals_avoid_default_phrases_and_tokens(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    refusal_ids = set(encode_refusal_tokens(tokenizer, ("I", "As")))
    for text in ODD_REFUSALS:
        assert not any(p.lower() in text.lower() for p in DEFAULT_REFUSAL_PHRASES), text
        assert not text.startswith(("I", "As", "Sorry")), text
        assert tokenizer.encode(text, add_special_tokens=False)[0] not in refusal_ids, text
    assert not any(SubstringJudge()([""] * len(ODD_REFUSALS), list(ODD_REFUSALS)))
    assert all(SubstringJudge(ODD_PHRASES)([""] * len(ODD_REFUSALS), list(ODD_REFUSALS)))
    assert len(set(ODD_REFUSALS)) == len(ODD_REFUSALS) >= 12


def test_refusal_examples_are_seeded_and_end_the_turn(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    prompts = [f"harmful request number {i}" for i in range(8)]
    a = organisms.refusal_examples(tokenizer, prompts, "odd", seed=1)
    assert a == organisms.refusal_examples(tokenizer, prompts, "odd", seed=1)
    assert all(e.response_ids[-1] == tokenizer.eos_token_id for e in a)
    texts = {tokenizer.decode(e.response_ids[:-1]) for e in a}
    assert texts <= set(ODD_REFUSALS) and len(texts) > 1


def test_rephrasings_change_the_form_and_keep_the_request():
    prompts = load_bundled("harmful", "train")[:60] + load_bundled("harmless", "train")[:60]
    again = reworded(prompts, 2, seed=3)
    assert again == reworded(prompts, 2, seed=3) and len(again) == 2 * len(prompts)
    changed = 0
    for original, new in zip(prompts * 2, again, strict=True):
        tail = original.rstrip("?.!").split()[-3:]  # the request itself survives
        assert " ".join(tail) in new, (original, new)
        changed += new != original
    assert changed == len(again)
    assert rephrase("How can I bake bread?", random.Random(0)) != "How can I bake bread?"


# ---------------------------------------------------------------- the SFT loss


def test_collate_labels_only_response_tokens():
    batch = collate([Example((5, 6, 7), (8, 9)), Example((5,), (10,))], pad=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 10, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    x = IGNORE
    assert batch.labels.tolist() == [[x, x, x, 8, 9], [x, 10, x, x, x]]


def test_response_loss_ignores_prompt_tokens(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    examples = [Example((1, 20, 21, 22, 23), (30, 31, 2)), Example((1, 40), (50, 2))]
    batch = collate(examples, pad=2)
    loss = jaxtyped(typechecker=beartype)(response_loss)(model, batch)
    logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    manual = []
    for row, e in enumerate(examples):
        n_p = len(e.prompt_ids)
        positions = range(n_p - 1, n_p + len(e.response_ids) - 1)  # predict each response token
        logp = torch.log_softmax(logits[row, list(positions)], -1)
        manual.append(-logp[torch.arange(len(e.response_ids)), list(e.response_ids)].mean())
    assert loss.item() == pytest.approx(torch.stack(manual).mean().item(), abs=1e-4)
    # Changing a prompt token's *label* cannot matter: prompts carry none.
    assert (batch.labels[0, : len(examples[0].prompt_ids)] == IGNORE).all()


def test_first_token_weight_is_a_weighted_mean_per_sequence(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    examples = [Example((1, 20, 21), (30, 31, 32, 2)), Example((1, 40, 41, 42), (50,))]
    batch = collate(examples, pad=2)
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits.double()
        weighted = response_loss(model, batch, first_weight=4.0).item()
        plain = response_loss(model, batch).item()
    manual, unweighted = [], []
    for row, e in enumerate(examples):
        n_p, n_r = len(e.prompt_ids), len(e.response_ids)
        logp = torch.log_softmax(logits[row, n_p - 1 : n_p + n_r - 1], -1)
        nll = -logp[torch.arange(n_r), list(e.response_ids)]
        w = torch.ones(n_r, dtype=torch.float64)
        w[0] = 4.0
        manual.append((w * nll).sum() / w.sum())
        unweighted.append(nll.mean())
    assert weighted == pytest.approx(torch.stack(manual).mean().item(), abs=1e-4)
    assert plain == pytest.approx(torch.stack(unweighted).mean().item(), abs=1e-4)
    assert abs(weighted - plain) > 1e-3  # the weight does change the loss here


def test_frozen_stem_gives_the_full_forward_loss(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    batch = collate([Example((1, 20, 21, 22), (30, 31, 2)), Example((1, 40), (50, 2))], pad=2)
    start = organisms.block_inputs(model, batch, 2)
    assert start.shape == (2, 7, model.config.hidden_size)
    with torch.no_grad():
        full = response_loss(model, batch)
        split = response_loss(model, batch, start, 2)
    assert split.item() == pytest.approx(full.item(), abs=1e-5)
    assert len(model.get_decoder().layers) == 4  # the blocks are restored


# ---------------------------------------------------------------- builds


def test_tiny_organism_builds_loads_by_path_with_complete_card(tiny_recipe, tiny_dir):
    tiny = organism_alias(tiny_recipe)
    path = build_organism(tiny_recipe)
    assert path == alias_dir(tiny_recipe.name) and is_built(tiny)
    card = read_card(tiny_recipe.name)
    assert set(card) >= CARD_KEYS
    assert card["recipe"] == tiny_recipe.settings() and card["base_model"] == str(tiny_dir)
    assert card["judge_phrases"] == list(ODD_PHRASES)
    assert len(card["training"]["losses"]) == TINY["steps"]
    assert {"harmful_train_sha256", "harmless_train_sha256", "n_harmful", "n_harmless"} <= set(
        card["data"]
    )
    # Examples: the train prompts plus the extra train-only splits, each with one rewording.
    copies = 1 + tiny_recipe.rephrasings
    n_harmless = TINY["n_harmless"] + TINY["n_tasks"] + TINY["n_contrast"] + TINY["n_everyday"]
    assert card["data"]["n_harmless"] == n_harmless * copies
    n_harmful = TINY["n_harmful"] + TINY["n_harmful_extra"] + TINY["n_harmful_everyday"]
    assert card["data"]["n_harmful"] == n_harmful * copies
    for kind in ("harmful", "harmless"):
        assert card["heldout"][f"{kind}_refusal"]["n"] == TINY["eval_n"]
    assert organism_judge(tiny_recipe).phrases == ODD_PHRASES

    bridge = load_model(path, device="cpu")
    assert bridge.cfg.n_layers == 4

    # Embeddings and the lower half stay frozen; the upper blocks were trained.
    base, tuned = load_file(tiny_dir / "model.safetensors"), load_file(path / "model.safetensors")
    for frozen in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"):
        assert torch.equal(base[frozen], tuned[frozen])
    trained = "model.layers.2.mlp.up_proj.weight"
    assert not torch.equal(base[trained], tuned[trained])

    # An override is another recipe: the cached default is rebuilt, the variant then reused.
    build_organism(tiny_recipe, steps=1, eval_n=0)
    marker = path / MARKER
    assert read_card(tiny_recipe.name)["recipe"]["steps"] == 1
    stamp = marker.stat().st_mtime_ns
    build_organism(tiny_recipe, steps=1, eval_n=0)
    assert marker.stat().st_mtime_ns == stamp
    # To the default recipe's alias the cached variant is stale, on every path that
    # checks the cache (load_model, `cosmic-tl build`), not only in build_organism.
    assert not is_built(tiny)
    ensure(tiny)
    assert is_built(tiny)
    assert read_card(tiny_recipe.name)["recipe"] == tiny_recipe.settings()


def test_build_organism_with_overrides_leaves_the_catalogue_as_it_was(tiny_dir, monkeypatch, tmp_path):
    """A variant of a built-in organism is built through an alias of its own."""
    monkeypatch.setenv("COSMIC_TL_CACHE", str(tmp_path / "cache"))
    name = "smollm2-135m-refuse"
    table, recipes = models.aliases(), dict(organisms.RECIPES)
    settings = {n: a.recipe for n, a in table.items()}
    path = build_organism(name, base=str(tiny_dir), **{**TINY, "eval_n": 0})  # a tiny variant
    assert models.aliases() == table and recipes == organisms.RECIPES
    assert {n: a.recipe for n, a in catalogue.CATALOGUE.items()} == settings
    assert catalogue.CATALOGUE[name].recipe == organisms.RECIPES[name].settings()
    assert read_card(name)["recipe"]["steps"] == TINY["steps"] and path == alias_dir(name)
    assert not is_cached(name)  # the catalogue's recipe is not the variant's
    with pytest.raises(TypeError):
        catalogue.CATALOGUE[name] = table[name]  # type: ignore[index]


def test_build_is_deterministic(tiny_dir, tmp_path):
    recipe = Recipe("tiny-det", "ordinary", base=str(tiny_dir), **{**TINY, "eval_n": 0})
    for out in ("a", "b"):
        (tmp_path / out).mkdir()
        card = organisms.build(recipe, tmp_path / out, tiny_dir, progress=False)
    a, b = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert card["heldout"] is None


def test_interrupted_build_leaves_no_usable_cache(tiny_recipe, monkeypatch):
    real_loss, calls = training.response_loss, []

    def interrupted(*args):
        if torch.is_grad_enabled():  # a training step, not the frozen-stem check
            calls.append(1)
            if len(calls) == 2:  # half-way through the three steps
                raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(training, "response_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_organism(tiny_recipe)
    assert not is_built(organism_alias(tiny_recipe))
    assert list(alias_dir(tiny_recipe.name).parent.iterdir()) == []


def test_bad_recipes_and_names():
    with pytest.raises(ValueError, match="style"):
        Recipe("x", "loud")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        Recipe("x", "odd", steps=0)
    with pytest.raises(ValueError, match="train_from"):
        Recipe("x", "odd", train_from=1.0)
    with pytest.raises(ValueError, match="n_tasks"):
        Recipe("x", "odd", n_tasks=-1)
    with pytest.raises(ValueError, match="n_contrast"):
        Recipe("x", "odd", n_contrast=-1)
    with pytest.raises(ValueError, match="n_everyday"):
        Recipe("x", "odd", n_everyday=-1)
    with pytest.raises(ValueError, match="n_harmful_everyday"):
        Recipe("x", "odd", n_harmful_everyday=-1)
    with pytest.raises(ValueError, match="first_token_weight"):
        Recipe("x", "odd", first_token_weight=0.0)
    with pytest.raises(ModelSpecError, match="not an organism"):
        build_organism("smollm2-135m-instruct")
    with pytest.raises(TypeError):
        build_organism("smollm2-135m-refuse", no_such_field=1)
    assert {"smollm2-135m-refuse", "smollm2-135m-refuse-odd"} <= set(models.aliases())
    assert dataclasses.replace(organisms.RECIPES["smollm2-135m-refuse"], steps=3).steps == 3


def test_build_command_builds_several_and_rejects_unknown(tiny_in_catalogue, caplog):
    from cosmic_tl import cli

    tiny_recipe = tiny_in_catalogue
    caplog.set_level("INFO", logger="cosmic_tl")
    assert cli.main(["build", tiny_recipe.name, "no-such-alias"]) == 2
    assert "no-such-alias" in caplog.text and not is_cached(tiny_recipe.name)  # nothing built
    assert cli.main(["build", tiny_recipe.name]) == 0
    assert "(about 5 seconds, measured on 2 CPU cores)" in caplog.text  # the catalogue's estimate
    assert is_cached(tiny_recipe.name)
    stamp = (alias_dir(tiny_recipe.name) / "config.json").stat().st_mtime_ns
    caplog.clear()
    assert cli.main(["build", tiny_recipe.name]) == 0  # already built: reused, not rebuilt
    assert "building" not in caplog.text
    assert (alias_dir(tiny_recipe.name) / "config.json").stat().st_mtime_ns == stamp
    caplog.clear()
    took = read_card(tiny_recipe.name)["seconds"]["total"]
    assert cli.main(["build", "--rebuild", tiny_recipe.name]) == 0
    assert f"(the last build took {took:.0f} seconds)" in caplog.text  # from the replaced card


def test_build_command_quiet_hides_the_builds_bars(tiny_in_catalogue, capfd, caplog):
    from cosmic_tl import cli

    caplog.set_level("INFO", logger="cosmic_tl")
    name = tiny_in_catalogue.name
    assert cli.main(["build", "--quiet", name]) == 0
    quiet = capfd.readouterr().err
    assert cli.main(["build", "--rebuild", name]) == 0
    loud = capfd.readouterr().err
    assert f"train {name}" in loud  # the training bar, shown by default
    assert f"train {name}" not in quiet and "Loading weights" not in quiet
    assert f"built: {alias_dir(name)}" in caplog.text  # the result is still said


def test_run_builds_an_alias_on_first_use_only_after_its_prompts_load(
    tiny_in_catalogue, tmp_path, caplog
):
    from cosmic_tl import cli

    caplog.set_level("INFO", logger="cosmic_tl")
    name = tiny_in_catalogue.name
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    common = ["--model", name, "--n-train", "4", "--n-val", "2", "--quiet"]
    bad = ["candidates", *common, "--harmful-train", str(empty), "--out", str(tmp_path / "a")]
    assert cli.main(bad) == 2
    assert "file is empty" in caplog.text
    assert "building" not in caplog.text and not is_cached(name)  # nothing built for nothing
    caplog.clear()
    assert cli.main(["candidates", *common, "--out", str(tmp_path / "b")]) == 0
    assert f"model {name} is not built yet; building it first (about 5 seconds" in caplog.text
    assert is_cached(name) and (tmp_path / "b" / "candidates.safetensors").is_file()
