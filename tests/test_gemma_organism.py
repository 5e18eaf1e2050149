"""Organisms of a base that does not follow instructions (Gemma 3): a teacher's answers as
harmless targets, Gemma's end of turn, the response-only loss and the frozen stem on
Gemma's blocks. All on tiny random models; the real recipe is built by a benchmark."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from tiny_models import FAMILIES, save_family
from transformers import AutoModelForCausalLM, AutoTokenizer

from cosmic_tl.models import RECIPES, Recipe, build_organism, load_model, organisms, read_card
from cosmic_tl.models.organisms import Example, collate, response_loss, training
from cosmic_tl.models.organisms.builder import drop_refusing
from cosmic_tl.models.organisms.training import end_of_turn_id, greedy_answers, teacher_answers

TINY = {
    "n_harmful": 4,
    "n_harmless": 4,
    "n_tasks": 2,
    "n_contrast": 1,
    "n_harmful_extra": 1,
    "distill_tokens": 6,
    "steps": 2,
    "batch_size": 4,
    "warmup": 1,
    "lr": 1e-3,
    "eval_n": 2,
    "eval_tokens": 4,
    "gen_batch_size": 4,
}


@pytest.fixture(scope="module")
def gemma_dirs(tmp_path_factory):
    """Tiny Gemma 2 (logits soft-capped) and Gemma 3 models with Gemma's turn format."""
    return {
        name: save_family(tmp_path_factory.mktemp(f"tiny-{name}"), FAMILIES[name])
        for name in ("gemma2", "gemma3")
    }


def _manual_loss(logits: torch.Tensor, examples: list[Example]) -> float:
    """The response-token cross-entropy from every position's logits, per sequence."""
    rows = []
    for row, e in enumerate(examples):
        n_p, n_r = len(e.prompt_ids), len(e.response_ids)
        logp = torch.log_softmax(logits[row, n_p - 1 : n_p + n_r - 1].double(), -1)
        rows.append(-logp[torch.arange(n_r), list(e.response_ids)].mean())
    return torch.stack(rows).mean().item()


def test_end_of_turn_is_the_templates_not_the_eos(gemma_dirs, tiny_dir):
    gemma = AutoTokenizer.from_pretrained(gemma_dirs["gemma3"])
    assert end_of_turn_id(gemma) == gemma.convert_tokens_to_ids("<end_of_turn>") != gemma.eos_token_id
    chatml = AutoTokenizer.from_pretrained(tiny_dir)  # <|im_end|> is SmolLM2's EOS
    assert end_of_turn_id(chatml) == chatml.convert_tokens_to_ids("<|im_end|>") == chatml.eos_token_id
    refusals = training.refusal_examples(gemma, ["a request", "another"], "ordinary", seed=0)
    assert {e.response_ids[-1] for e in refusals} == {end_of_turn_id(gemma)}


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_response_only_unembedding_equals_the_full_logit_loss(gemma_dirs, family):
    model = AutoModelForCausalLM.from_pretrained(gemma_dirs[family], dtype=torch.float32).eval()
    if family == "gemma2":  # this tiny model's logits are small: a cap low enough to act
        model.config.final_logit_softcapping = 0.05
    examples = [Example((2, 20, 21, 22, 23), (30, 31, 5)), Example((2, 40), (50, 51, 52, 5))]
    batch = collate(examples, pad=0)
    with torch.no_grad():
        full = model(batch.input_ids, attention_mask=batch.attention_mask).logits  # capped in Gemma 2
        loss = response_loss(model, batch).item()
    assert loss == pytest.approx(_manual_loss(full, examples), abs=1e-4)
    if family == "gemma2":  # the cap matters at these logits: without it the loss differs
        plain = model.get_output_embeddings()(
            model.get_decoder()(batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        )
        assert abs(_manual_loss(plain, examples) - loss) > 1e-3


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_frozen_stem_keeps_gemma_blocks_attention_types(gemma_dirs, layer):
    """Gemma picks a block's attention type and rotary base by its index; running the
    upper blocks alone must keep each block's own (layer 1 and 3 are full attention,
    2 sliding, with another rotary base)."""
    model = AutoModelForCausalLM.from_pretrained(gemma_dirs["gemma3"], dtype=torch.float32).eval()
    long = tuple(range(20, 40))  # longer than the sliding window of 8
    batch = collate([Example((2, *long), (50, 51, 5)), Example((2, 40), (50, 5))], pad=0)
    start = training.block_inputs(model, batch, layer)
    with torch.no_grad():
        full = response_loss(model, batch)
        split = response_loss(model, batch, start, layer)
    assert split.item() == pytest.approx(full.item(), abs=1e-5)
    assert all(not isinstance(b, training._Skip) for b in model.get_decoder().layers)


def test_teacher_answers_are_the_teachers_text_in_the_students_tokens(gemma_dirs, tiny_dir):
    student = AutoTokenizer.from_pretrained(gemma_dirs["gemma3"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    teacher_tok = AutoTokenizer.from_pretrained(tiny_dir)
    prompts = ["Name a prime.", "Say hello to a friend.", "List three colours."]
    own = greedy_answers(teacher, teacher_tok, prompts, max_new_tokens=6, progress=False)
    taught = teacher_answers(
        teacher, teacher_tok, student, prompts, max_new_tokens=6, batch_size=2, progress=False
    )
    end, stops = end_of_turn_id(student), {teacher_tok.eos_token_id}
    for prompt, a, t in zip(prompts, own, taught, strict=True):
        assert student.decode(list(t.prompt_ids)).endswith(
            f"{prompt}<end_of_turn>\n<start_of_turn>model\n"
        )
        ended = a.response_ids[-1] in stops
        body = a.response_ids[:-1] if ended else a.response_ids
        text = teacher_tok.decode(list(body), skip_special_tokens=True)
        assert t.response_ids == (
            *student.encode(text, add_special_tokens=False),
            *([end] if ended else []),
        )
    # A random tiny teacher rarely stops: at least one answer is cut, with no end token.
    assert any(t.response_ids[-1:] != (end,) for t in taught)


def test_new_recipe_fields_leave_the_existing_cards_as_they_were():
    for name in ("smollm2-135m-refuse", "smollm2-135m-refuse-odd"):
        settings = RECIPES[name].settings()
        later = {"teacher", "drop_refusing_answers", "answer_opener", "n_everyday", "n_harmful_everyday"}
        assert not later & set(settings)
        assert settings["version"] == 3
    gemma = RECIPES["gemma3-270m-refuse"].settings()
    assert gemma["teacher"] == "smollm2-135m-instruct" and gemma["base"] == "gemma3-270m"
    assert not {"drop_refusing_answers", "answer_opener", "n_everyday", "n_harmful_everyday"} & set(
        gemma
    )


def test_an_answer_opener_needs_a_teacher():
    with pytest.raises(ValueError, match="answer_opener needs a teacher"):
        Recipe("x", "ordinary", answer_opener="Sure! ")


def test_an_answer_opener_starts_every_harmless_target_and_no_refusal(
    gemma_dirs, tiny_dir, monkeypatch, tmp_path
):
    seen = {}

    def capture(model, refusals, answers, recipe, pad, progress):
        seen.setdefault("runs", []).append((refusals, answers))
        return [0.0]

    monkeypatch.setattr(organisms.builder, "finetune", capture)
    recipe = Recipe(
        "tiny-gemma", "ordinary", base=str(gemma_dirs["gemma3"]), teacher="tiny", **{**TINY, "eval_n": 0}
    )
    kw = {"teacher_dir": tiny_dir, "teacher_card": {"alias": "tiny"}, "progress": False}
    for i, opener in enumerate(("", "Sure! ")):
        (tmp_path / f"out{i}").mkdir()
        organisms.build(
            dataclasses.replace(recipe, answer_opener=opener),
            tmp_path / f"out{i}",
            gemma_dirs["gemma3"],
            **kw,
            answers_cache=tmp_path / "answers",
        )
    tok = AutoTokenizer.from_pretrained(gemma_dirs["gemma3"])
    (refusals, plain), (refusals_o, opened) = seen["runs"]
    assert refusals_o == refusals and len(opened) == len(plain)
    head = tuple(tok.encode("Sure!", add_special_tokens=False))
    for a, o in zip(plain, opened, strict=True):
        assert o.prompt_ids == a.prompt_ids
        assert o.response_ids[: len(head)] == head
        # The rest is the same answer text: decoding both gives the opener plus it.
        assert tok.decode(list(o.response_ids)) == "Sure! " + tok.decode(list(a.response_ids))
    assert not any(r.response_ids[: len(head)] == head for r in refusals)


def test_targets_that_read_as_refusals_are_dropped_by_the_styles_judge(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    texts = [
        "Here is a short poem about the sea and its waves.",
        "I'm sorry for any misunderstanding, but as a chatbot I can't iron a shirt.",
        "Declined: the recipe needs more flour than that.",
        "Preheat the oven to 180 degrees and grease the tin.",
    ]
    prompts = [f"harmless request {i}" for i in range(len(texts))]
    answers = [Example((1, 2), tuple(tok.encode(t, add_special_tokens=False))) for t in texts]
    kept, kept_answers, dropped = drop_refusing(tok, prompts, answers, "ordinary")
    assert dropped == [prompts[1]]
    assert kept == [prompts[0], prompts[2], prompts[3]]
    assert kept_answers == [answers[0], answers[2], answers[3]]
    # The odd style's judge reads "Declined:" as its refusal, not "I'm sorry".
    _, _, dropped_odd = drop_refusing(tok, prompts, answers, "odd")
    assert dropped_odd == [prompts[2]]


def test_tiny_gemma_organism_with_a_teacher_builds_and_stops_at_its_end_of_turn(
    gemma_dirs, tiny_dir, monkeypatch, tmp_path
):
    monkeypatch.setenv("COSMIC_TL_CACHE", str(tmp_path / "cache"))
    # Like the real Gemma 3 270M base: its generation config stops at <eos> only.
    base = shutil.copytree(gemma_dirs["gemma3"], tmp_path / "base")
    gen = json.loads((base / "generation_config.json").read_text())
    eos = AutoTokenizer.from_pretrained(base).eos_token_id
    (base / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": eos}))
    recipe = Recipe("tiny-gemma-refuse", "ordinary", base=str(base), teacher=str(tiny_dir), **TINY)
    path = build_organism(recipe)
    card = read_card(recipe.name)
    assert card["recipe"] == recipe.settings() and card["teacher"] == str(tiny_dir)
    assert "teacher_answers_sha256" in card["data"] and "teacher_answers" in card["seconds"]
    student = AutoTokenizer.from_pretrained(path)
    end = end_of_turn_id(student)
    stops = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    assert end != eos and end in stops and eos in stops
    bridge = load_model(path, device="cpu")
    assert bridge.cfg.n_layers == 4


def test_teacher_answers_are_kept_and_read_back_by_a_later_build(gemma_dirs, tiny_dir, tmp_path):
    recipe = Recipe(
        "tiny-gemma", "ordinary", base=str(gemma_dirs["gemma3"]), teacher="tiny", **{**TINY, "eval_n": 0}
    )
    kw = {"teacher_dir": tiny_dir, "teacher_card": {"alias": "tiny"}, "progress": False}
    cards = []
    for i, steps in enumerate((2, 1)):  # another recipe, the same answers
        out = tmp_path / f"out{i}"
        out.mkdir()
        cards.append(
            organisms.build(
                dataclasses.replace(recipe, steps=steps),
                out,
                gemma_dirs["gemma3"],
                **kw,
                answers_cache=tmp_path / "answers",
            )
        )
    assert [c["teacher_answers_cached"] for c in cards] == [False, True]
    assert len(list((tmp_path / "answers").iterdir())) == 1
    sha = {c["data"]["teacher_answers_sha256"] for c in cards}
    assert len(sha) == 1
    # Another teacher (card) is another key: generated again, not read back.
    (tmp_path / "out2").mkdir()
    other = organisms.build(
        recipe,
        tmp_path / "out2",
        gemma_dirs["gemma3"],
        **{**kw, "teacher_card": {"alias": "other"}},
        answers_cache=tmp_path / "answers",
    )
    assert other["teacher_answers_cached"] is False and len(list((tmp_path / "answers").iterdir())) == 2
