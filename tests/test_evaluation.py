"""Judges, Wilson intervals, batched generation under interventions, JSONL round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
from beartype import beartype
from conftest import HARMFUL, HARMLESS
from jaxtyping import jaxtyped

from cosmic_tl.evaluation import (
    DEFAULT_REFUSAL_PHRASES,
    ClassifierJudge,
    EvalResult,
    JudgeWarning,
    Rate,
    SubstringJudge,
    attack_success_rate,
    evaluate,
    generate,
    greedy_tokens,
    load_completions,
    refusal_rate,
    save_completions,
    stop_token_ids,
    wilson_interval,
)
from cosmic_tl.interventions import Intervention, intervene
from cosmic_tl.templates import batches

PROMPTS = [HARMLESS[1], HARMFUL[0], "Hi", HARMLESS[2]]  # different lengths
N_NEW = 8

# ---------------------------------------------------------------- judges


def test_default_phrases_are_the_reference_twelve():
    assert len(DEFAULT_REFUSAL_PHRASES) == 12
    assert {"I'm sorry", "As an AI", "I can't", "I'm not able to"} <= set(DEFAULT_REFUSAL_PHRASES)


def test_substring_judge_on_hand_written_completions():
    completions = [
        "I'm sorry, but I can't help with that.",
        "Sure! Here is a recipe for sourdough bread: ...",
        "AS AN AI LANGUAGE MODEL I will not do that.",  # case-insensitive
        "i cannot assist with this request",
        "Step 1: preheat the oven.",
        "",  # empty: counted as a refusal (not jailbroken)
        "x",  # shorter than 2 characters
        " \n ",  # whitespace only
        "OK",  # two characters: judged on its content
    ]
    verdicts = SubstringJudge()(["p"] * len(completions), completions)
    assert verdicts == [True, False, True, True, False, True, True, True, False]


def test_substring_judge_custom_phrases_and_min_chars():
    judge = SubstringJudge(phrases=["not allowed"], min_chars=0)
    assert judge(["a", "b", "c"], ["That is NOT ALLOWED.", "I'm sorry", ""]) == [True, False, False]
    assert judge.phrases == ("not allowed",)


@pytest.mark.parametrize("phrases", [[], ("",)])
def test_substring_judge_rejects_empty_phrases(phrases):
    with pytest.raises(ValueError, match="phrase"):
        SubstringJudge(phrases=phrases)


def test_judges_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        SubstringJudge()(["a", "b"], ["c"])


def test_classifier_judge_failure_on_one_item_keeps_the_rest():
    def fn(prompt: str, completion: str) -> bool:
        if prompt == "boom":
            raise RuntimeError("classifier crashed")
        return "no" in completion

    judge = ClassifierJudge(fn)
    with pytest.warns(JudgeWarning, match=r"item 1 .*'boom'.*classifier crashed"):
        verdicts = judge(["a", "boom", "c"], ["no way", "sure", "sure"])
    assert verdicts == [True, None, False]
    rate = refusal_rate(verdicts)
    assert (rate.k, rate.n, rate.n_ignored) == (1, 2, 1)


# ---------------------------------------------------------------- metrics


def _wilson_closed_form(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    root = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return tuple((p + z**2 / (2 * n) + s * root) / (1 + z**2 / n) for s in (-1, 1))  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [(0, 10, (0.0, 0.2775)), (5, 10, (0.2366, 0.7634)), (10, 10, (0.7225, 1.0))],
)
def test_wilson_interval_textbook_values(k, n, expected):
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(expected[0], abs=1e-4)
    assert high == pytest.approx(expected[1], abs=1e-4)


@pytest.mark.parametrize(("k", "n"), [(1, 3), (7, 50), (99, 100), (256, 512)])
def test_wilson_interval_matches_closed_form(k, n):
    assert wilson_interval(k, n) == pytest.approx(_wilson_closed_form(k, n), abs=1e-12)


def test_wilson_interval_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for bad in [(3, 2), (-1, 2), (0, -1)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_rates_ignore_failed_verdicts():
    verdicts = [True, False, None, True, True]
    refused, asr = refusal_rate(verdicts), attack_success_rate(verdicts)
    assert (refused.k, refused.n, refused.n_ignored, refused.rate) == (3, 4, 1, 0.75)
    assert (asr.k, asr.n, asr.rate) == (1, 4, 0.25)
    assert (refused.low, refused.high) == wilson_interval(3, 4)
    assert Rate.from_dict(json.loads(json.dumps(refused.to_dict()))) == refused
    empty = refusal_rate([None])
    assert empty.n == 0 and math.isnan(empty.rate) and empty.to_dict()["rate"] is None


# ---------------------------------------------------------------- generation


def _direction(model, seed: int = 1) -> torch.Tensor:
    return torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(seed))


def test_batched_generation_equals_one_prompt_at_a_time(tiny):
    batched = generate(tiny, PROMPTS, max_new_tokens=N_NEW, batch_size=4, progress=False)
    alone = [generate(tiny, [p], max_new_tokens=N_NEW, progress=False)[0] for p in PROMPTS]
    assert batched == alone
    assert all(isinstance(c, str) for c in batched) and len(set(batched)) > 1


@pytest.mark.parametrize("kind", ["add", "ablate"])
def test_cached_generation_equals_uncached_under_intervention(tiny, kind):
    """Hooks must act on generated tokens too, which only the cached path could miss."""
    iv = Intervention(kind, "lce", 4 * _direction(tiny), layer=1)
    [batch] = batches(tiny.tokenizer, PROMPTS, 4)
    stops = stop_token_ids(tiny)
    with intervene(tiny, iv):
        cached, uncached = (
            greedy_tokens(
                tiny,
                batch.tokens,
                batch.attention_mask,
                max_new_tokens=N_NEW,
                stop_ids=stops,
                use_cache=use_cache,
            )
            for use_cache in (True, False)
        )
    assert torch.equal(cached, uncached)


def test_first_generated_token_is_argmax_of_hooked_forward(tiny):
    iv = Intervention("add", "lce", 4 * _direction(tiny), layer=1)
    [batch] = batches(tiny.tokenizer, PROMPTS, 4)
    checked = jaxtyped(typechecker=beartype)(greedy_tokens)
    with intervene(tiny, iv):
        logits = tiny(batch.tokens, attention_mask=batch.attention_mask)
        new = checked(
            tiny,
            batch.tokens,
            batch.attention_mask,
            max_new_tokens=2,
            stop_ids=stop_token_ids(tiny),
        )
    plain = tiny(batch.tokens, attention_mask=batch.attention_mask)
    assert new.shape == (len(PROMPTS), 2)
    assert torch.equal(new[:, 0], logits[:, -1].argmax(-1))
    # The intervention matters here, so the hooks were really applied.
    assert not torch.equal(new[:, 0], plain[:, -1].argmax(-1))


def test_generation_unembeds_only_the_last_prompt_position(tiny):
    """The prompt's pass yields one row of logits per prompt, not one per position;
    the tokens are those of the full-logit forward (previous test) either way."""
    [batch] = batches(tiny.tokenizer, PROMPTS, 4)
    widths: list[int] = []

    def record(logits, hook):
        widths.append(logits.shape[1])

    with tiny.hooks(fwd_hooks=[("unembed.hook_out", record)]):
        new = greedy_tokens(
            tiny, batch.tokens, batch.attention_mask, max_new_tokens=3, stop_ids=stop_token_ids(tiny)
        )
    assert batch.tokens.shape[1] > 1 and widths == [1] * new.shape[1]


def test_generation_errors(tiny):
    with pytest.raises(ValueError, match="no instructions"):
        generate(tiny, [], progress=False)
    long_prompt = "Summarise this: " + "word " * 240  # the tiny model's context is 256
    with pytest.raises(ValueError, match=r"prompt 1 is \d+ tokens.*'Summarise this: word"):
        generate(tiny, ["Hi", long_prompt], max_new_tokens=4, progress=False)
    fits_alone = "Summarise this: " + "word " * 170  # fits, but not with 64 new tokens
    generate(tiny, [fits_alone], max_new_tokens=1, progress=False)
    with pytest.raises(ValueError, match="minus 64"):
        generate(tiny, [fits_alone], max_new_tokens=64, progress=False)


# ---------------------------------------------------------------- evaluate and files


def test_evaluate_and_jsonl_round_trip(tiny, tmp_path):
    def refuses_short(prompt: str, completion: str) -> bool:
        if prompt == "Hi":
            raise ValueError("no verdict")
        return len(completion) < 10

    with pytest.warns(JudgeWarning):
        result = evaluate(
            tiny,
            PROMPTS,
            judge=ClassifierJudge(refuses_short),
            max_new_tokens=4,
            batch_size=3,
            progress=False,
        )
    assert isinstance(result, EvalResult) and result.prompts == tuple(PROMPTS)
    assert result.verdicts[2] is None and result.rate.n == 3 and result.rate.n_ignored == 1
    assert result.asr.k == result.rate.n - result.rate.k

    path = save_completions(tmp_path / "out" / "completions.jsonl", result)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [set(r) for r in rows] == [{"prompt", "completion", "refusal"}] * len(PROMPTS)
    assert load_completions(path) == result
    assert [p.name for p in path.parent.iterdir()] == ["completions.jsonl"]  # no temp file left


def test_jsonl_round_trip_unicode_and_bad_lines(tmp_path):
    verdicts = (True, None)
    result = EvalResult(("q1", "q2 ✓"), ("I'm sorry\nno", "Voilà 🚀"), verdicts, refusal_rate(verdicts))
    path = tmp_path / "c.jsonl"
    save_completions(path, result)
    assert load_completions(path) == result
    path.write_text('{"prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c.jsonl:1"):
        load_completions(path)
