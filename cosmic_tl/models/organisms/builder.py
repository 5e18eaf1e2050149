"""Build an organism from a recipe into a directory, and measure what it refuses.

:func:`build` is given the base model's directory (and its card); it never looks an
alias up. :mod:`cosmic_tl.models.catalogue` resolves the base and calls it inside
:func:`cosmic_tl.models.cache.ensure`. Building is deterministic for a recipe on
one machine and thread count::

    card = build(recipe, out_dir, base_dir=Path("path/to/hf-dir"))
    heldout = measure(out_dir, recipe)

A recipe with a ``teacher`` is also given the teacher's directory (``teacher_dir``):
the harmless targets are then the teacher's greedy answers, not the base's. Given an
``answers_cache`` folder and the teacher's card, those answers (text) are kept there,
keyed by everything they depend on, and a later build of any recipe that asks for the
same answers reads them instead of generating them again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from cosmic_tl.evaluation import SubstringJudge, evaluate
from cosmic_tl.models.boot import boot
from cosmic_tl.models.organisms.recipes import Recipe
from cosmic_tl.models.organisms.rephrasing import reworded
from cosmic_tl.models.organisms.texts import Style, judge_phrases, refusal_texts
from cosmic_tl.models.organisms.training import (
    Example,
    answer_stop_ids,
    end_of_turn_id,
    finetune,
    greedy_answers,
    refusal_examples,
    student_examples,
    teacher_texts,
)
from cosmic_tl.prompts import load_bundled, prompts_sha256, sample_prompts
from cosmic_tl.store import read_json, write_json
from cosmic_tl.templates import chat_prompts, pad_id


def build(
    recipe: Recipe,
    out: Path,
    base_dir: Path,
    base_card: dict[str, Any] | None = None,
    *,
    teacher_dir: Path | None = None,
    teacher_card: dict[str, Any] | None = None,
    answers_cache: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune the model in ``base_dir`` into ``out`` (a plain HF directory); return the card.

    ``base_dir`` holds the model that ``recipe.base`` names, and ``base_card`` its own
    card when it is a cached alias (recorded in this card); ``teacher_dir`` and
    ``teacher_card`` the same for ``recipe.teacher``, which a recipe with a teacher
    needs. Called through
    :func:`cosmic_tl.models.cache.ensure`, which writes ``out`` as a temporary
    folder and renames it into place only if this returns.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    timings: dict[str, float] = {}
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    harmful = sample_prompts(load_bundled("harmful", "train"), recipe.n_harmful, recipe.seed)
    harmless = sample_prompts(load_bundled("harmless", "train"), recipe.n_harmless, recipe.seed)
    for kind, split, n in (
        ("harmful", "train_extra", recipe.n_harmful_extra),
        ("harmless", "train_tasks", recipe.n_tasks),
        ("harmless", "train_contrast", recipe.n_contrast),
        ("harmless", "train_everyday", recipe.n_everyday),
        ("harmful", "train_everyday", recipe.n_harmful_everyday),
    ):
        if n:
            (harmful if kind == "harmful" else harmless).extend(
                sample_prompts(load_bundled(kind, split), n, recipe.seed)
            )

    t = time.perf_counter()
    harmful_all = [*harmful, *reworded(harmful, recipe.rephrasings, recipe.seed)]
    refusals = refusal_examples(tokenizer, harmful_all, recipe.style, recipe.seed)
    gen = {"max_new_tokens": recipe.distill_tokens, "batch_size": recipe.gen_batch_size}
    from_cache = False
    if recipe.teacher is None:
        answers = greedy_answers(model, tokenizer, harmless, **gen, progress=progress)
    else:
        if teacher_dir is None:
            raise ValueError(f"recipe {recipe.name!r} has teacher {recipe.teacher!r}; pass teacher_dir")
        texts, from_cache = _teacher_texts(
            recipe, harmless, teacher_dir, teacher_card, answers_cache, gen, progress
        )
        if recipe.answer_opener:
            texts = [(recipe.answer_opener + text, ended) for text, ended in texts]
        answers = student_examples(tokenizer, harmless, texts)
    timings["base_answers" if recipe.teacher is None else "teacher_answers"] = time.perf_counter() - t
    dropped: list[str] = []
    if recipe.drop_refusing_answers:
        harmless, answers, dropped = drop_refusing(tokenizer, harmless, answers, recipe.style)
    # A reworded harmless prompt keeps the base's answer to the original wording.
    harmless_re = reworded(harmless, recipe.rephrasings, recipe.seed + 1)
    harmless_all = [*harmless, *harmless_re]
    answers += [
        Example(tuple(ids), a.response_ids)
        for ids, a in zip(
            chat_prompts(tokenizer, harmless_re).ids, answers * recipe.rephrasings, strict=True
        )
    ]

    t = time.perf_counter()
    losses = finetune(model, refusals, answers, recipe, pad_id(tokenizer), progress=progress)
    timings["train"] = time.perf_counter() - t
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    listed = model.generation_config.eos_token_id
    if end_of_turn_id(tokenizer) not in ([listed] if isinstance(listed, int) else list(listed or [])):
        # The organism ends its answers with the template's end of turn (Gemma's
        # <end_of_turn>, not its <eos>): generation must stop there too.
        model.generation_config.eos_token_id = answer_stop_ids(model, tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model

    t = time.perf_counter()
    heldout = measure(out, recipe, progress=progress) if recipe.eval_n > 0 else None
    timings["measure"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start

    import transformers

    return {
        "organism": recipe.name,
        "recipe": recipe.settings(),
        "base_model": recipe.base,
        "base_card": base_card,
        **(
            {
                "teacher": recipe.teacher,
                "teacher_card": teacher_card,
                "teacher_answers_cached": from_cache,
            }
            if recipe.teacher
            else {}
        ),
        "style": recipe.style,
        "judge_phrases": list(judge_phrases(recipe.style)),
        "data": {
            "harmful_train_sha256": prompts_sha256(harmful),
            "harmless_train_sha256": prompts_sha256(harmless),
            "harmful_sft_prompts_sha256": prompts_sha256(harmful_all),
            "harmless_sft_prompts_sha256": prompts_sha256(harmless_all),
            "refusals_sha256": prompts_sha256(refusal_texts(recipe.style)),
            ("base_answers_sha256" if recipe.teacher is None else "teacher_answers_sha256"): (
                prompts_sha256([str(list(a.response_ids)) for a in answers])
            ),
            "n_harmful": len(refusals),
            "n_harmless": len(answers),
            **({"dropped_refusing_answers": dropped} if recipe.drop_refusing_answers else {}),
        },
        "training": {
            "optimizer": "AdamW",
            "trainable_parameters": n_trainable,
            "frozen": "embeddings (tied unembedding) and blocks below train_from",
            "loss": "cross-entropy on response tokens, mean per sequence",
            "losses": [round(x, 4) for x in losses],
            "torch_threads": torch.get_num_threads(),
        },
        "heldout": heldout,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def drop_refusing(
    tokenizer: Any, prompts: list[str], answers: list[Example], style: Style
) -> tuple[list[str], list[Example], list[str]]:
    """The harmless prompts and target answers without those whose answer ``style``'s
    judge calls a refusal; and the prompts left out."""
    texts = [tokenizer.decode(list(a.response_ids), skip_special_tokens=True) for a in answers]
    verdicts = SubstringJudge(judge_phrases(style))(prompts, texts)
    kept = [i for i, v in enumerate(verdicts) if not v]
    left_out = [p for p, v in zip(prompts, verdicts, strict=True) if v]
    return [prompts[i] for i in kept], [answers[i] for i in kept], left_out


def _teacher_texts(
    recipe: Recipe,
    prompts: list[str],
    teacher_dir: Path,
    teacher_card: dict[str, Any] | None,
    answers_cache: Path | None,
    gen: dict[str, int],
    progress: bool,
) -> tuple[list[tuple[str, bool]], bool]:
    """The teacher's answer texts, from ``answers_cache`` when kept there; and whether they were."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, key = None, {}
    if answers_cache is not None and teacher_card is not None:
        key = {
            "teacher": recipe.teacher,
            "teacher_card": teacher_card,
            "prompts_sha256": prompts_sha256(prompts),
            **gen,
            "torch_threads": torch.get_num_threads(),
            "versions": [torch.__version__, transformers.__version__],
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        path = answers_cache / f"{digest}.json"
        if path.is_file():
            kept = read_json(path)
            if kept.get("key") == key and len(kept["answers"]) == len(prompts):
                return [(str(t), bool(e)) for t, e in kept["answers"]], True
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    teacher_tok = AutoTokenizer.from_pretrained(teacher_dir)
    texts = teacher_texts(teacher, teacher_tok, prompts, **gen, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"key": key, "answers": [list(a) for a in texts]})
    return texts, False


def measure(model_dir: Path, recipe: Recipe, *, progress: bool = True) -> dict[str, Any]:
    """Refusal rates of a built organism on bundled *test* prompts (never trained on).

    Rates use the organism's own judge; the default judge's verdicts on harmful
    prompts are recorded too, which shows whether the style evades it.
    """
    bridge = boot(model_dir, device="cpu")
    own = SubstringJudge(judge_phrases(recipe.style))
    out: dict[str, Any] = {
        "split": "test",
        "n_per_kind": recipe.eval_n,
        "max_new_tokens": recipe.eval_tokens,
    }
    for kind in ("harmful", "harmless"):
        prompts = sample_prompts(load_bundled(kind, "test"), recipe.eval_n, recipe.seed)
        result = evaluate(
            bridge,
            prompts,
            judge=own,
            max_new_tokens=recipe.eval_tokens,
            batch_size=recipe.gen_batch_size,
            progress=progress,
        )
        default = SubstringJudge()(list(result.prompts), list(result.completions))
        out[f"{kind}_refusal"] = result.rate.to_dict()
        out[f"{kind}_refusal_default_judge"] = (
            sum(bool(v) for v in default) / len(default) if default else None
        )
        out[f"{kind}_prompts_sha256"] = prompts_sha256(prompts)
    return out
