"""cosmic_tl on every family TransformerBridge boots, measured on tiny random models.

For Gemma 2, Gemma 3, Qwen2, Mistral, Phi-3 and Llama (``tests/tiny_models.py``: four
random blocks, the family's turn format as the chat template, sliding windows shorter
than the prompts where the family has them):

- the engine's grids equal the straightforward reference loop, ACE and LCE, with and
  without shared prompt tokens;
- the orthogonalised export, loaded as plain Hugging Face, equals hook-based LCE
  ablation where it can (no post-norms), and on Gemma what it actually is;
- greedy generation under an intervention equals a manual hooked forward, token by token;
- the end-of-instruction tokens are the ones written out by hand from the turn format.

Then the bad inputs: a bridge without a hook point cosmic_tl reads, a chat template that
puts nothing after the instruction.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import HARMFUL, HARMLESS
from reference_impl import reference_scores
from tiny_models import FAMILIES, WINDOW, Family, family_tokenizer, save_family
from torch import Tensor

from cosmic_tl.candidates import Candidates, compute_candidates
from cosmic_tl.evaluation import generate, stop_token_ids
from cosmic_tl.interventions import Intervention, ablate, intervene, unit
from cosmic_tl.models import load_model
from cosmic_tl.planner import score_candidates
from cosmic_tl.scoring import encode_refusal_tokens
from cosmic_tl.templates import ChatTemplateError, end_of_instruction, format_prompt, prompts_for

engine = importlib.import_module("cosmic_tl.engine")

TRAIN_H, TRAIN_L = HARMFUL, HARMLESS
# Two prompts of different lengths each: one batch of two, with padding, on every family.
VAL_H, VAL_L = [HARMFUL[0], HARMFUL[2]], [HARMLESS[1], HARMLESS[2]]
GRIDS = ("S_abl", "S_add", "KL", "bypass", "induce", "KL_linear", "bypass_mode", "induce_mode")
TOL = 1e-4


@dataclasses.dataclass
class Tiny:
    family: Family
    path: Path
    model: Any
    candidates: Candidates  # at the last EOI position only


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny_family(request, tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Tiny:
    family = FAMILIES[request.param]
    path = save_family(tmp_path_factory.mktemp(f"tiny-{family.name}"), family)
    model = load_model(path, device="cpu")
    c = compute_candidates(model, TRAIN_H, TRAIN_L, batch_size=4, progress=False)
    last = slice(-1, None)  # the engine treats every position alike; one row keeps it fast
    c = dataclasses.replace(
        c,
        directions=c.directions[last],
        harmful_mean=c.harmful_mean[last],
        harmless_mean=c.harmless_mean[last],
        positions=c.positions[last],
        position_labels=c.position_labels[last],
        eoi_token_ids=c.eoi_token_ids[last],
    )
    return Tiny(family, path, model, c)


def _direction(d_model: int, seed: int = 3) -> Tensor:
    return torch.randn(d_model, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------ end-of-instruction tokens


def test_eoi_tokens_are_the_turn_formats_tokens(tiny_family):
    """EOI tokens: what the family's turn format puts after the instruction, token by token."""
    tok = tiny_family.model.tokenizer
    eoi = end_of_instruction(tok)
    assert tuple(tok.decode([t]) for t in eoi.token_ids) == tiny_family.family.eoi
    # ... and they are the last tokens of every real prompt, right after the instruction's.
    for text in VAL_H:
        ids = tok(format_prompt(tok, text), add_special_tokens=False)["input_ids"]
        k = len(eoi.token_ids)
        assert tuple(ids[-k:]) == eoi.token_ids
        assert tok.decode(ids[:-k]).endswith(text)


# ---------------------------------------------------- the engine against the plain loop

_REFERENCE: dict[tuple[str, str], dict[str, Any]] = {}


def _reference(tiny: Tiny, mode: str) -> dict[str, Any]:
    """The straightforward loop's grids (computed once per family and mode)."""
    key = (tiny.family.name, mode)
    if key not in _REFERENCE:
        _REFERENCE[key] = reference_scores(
            tiny.model,
            tiny.candidates.directions,
            tiny.candidates.harmless_mean,
            TRAIN_H,
            TRAIN_L,
            VAL_H,
            VAL_L,
            mode=mode,
            token_ids=encode_refusal_tokens(tiny.model.tokenizer, ["I"]),
            batch_size=2,
        )
    return _REFERENCE[key]


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("mode", ["ace", "lce"])
def test_engine_grids_equal_the_reference_loop(tiny_family, mode, share_prefix, monkeypatch):
    model = tiny_family.model
    for prompts in (VAL_H, VAL_L):
        lengths = prompts_for(model, prompts).lengths
        assert len(set(lengths)) > 1 and max(lengths) > WINDOW  # padding, and windows matter
    if share_prefix:
        # Share whatever the prompts have in common, however little it saves, so that
        # the shared-prefix replay runs on every family (Gemma's is 4 tokens of ~20).
        monkeypatch.setattr(engine, "_MIN_SHARED_SAVING", 0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the build-time check must not fall back
            assert engine.Runner(model, VAL_H, batch_size=2).shared_tokens > 0
            assert engine.Runner(model, VAL_L, batch_size=2).shared_tokens > 0
    ref = _reference(tiny_family, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = score_candidates(
            model,
            tiny_family.candidates,
            VAL_H,
            VAL_L,
            mode=mode,
            full=True,
            batch_size=2,  # one padded batch per set
            share_prefix=share_prefix,
            progress=False,
            refusal_tokens=["I"],
            baseline=("refusal_tokens", "substring"),
        )
    assert got.eval_layers == ref["eval_layers"]
    for name in GRIDS:
        torch.testing.assert_close(got.grids[name], ref["grids"][name], atol=TOL, rtol=0)
    # the grids are not trivially equal: interventions change the scores
    assert float(got.grids["KL"].max()) > 1e-3


# ------------------------------------------------------------------ the weight export


def _plain_hf_logits(path: Path, tokens: Tensor, mask: Tensor) -> Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens, attention_mask=mask).logits


def _logits(model: Any, tokens: Tensor, mask: Tensor, hooks=()) -> Tensor:
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        return model(tokens, attention_mask=mask)


def test_orthogonalised_export_equals_hook_ablation(tiny_family, tmp_path):
    from cosmic_tl.export import PostNormWarning, save_orthogonalized

    fam, model = tiny_family.family, tiny_family.model
    [b] = prompts_for(model, [*VAL_H, *VAL_L]).batches(6)  # one left-padded batch
    real = b.attention_mask.bool()  # padded positions are not compared
    r = _direction(model.cfg.d_model)
    by_hooks = {}
    for placement in ("residual", "published"):
        with intervene(model, Intervention("ablate", "lce", r, placement=placement)):
            by_hooks[placement] = _logits(model, b.tokens, b.attention_mask)
    clean = _logits(model, b.tokens, b.attention_mask)

    fresh = load_model(tiny_family.path, device="cpu")
    if fam.post_norm:
        with pytest.warns(PostNormWarning, match="equals neither LCE ablation placement"):
            out = save_orthogonalized(fresh, r, tmp_path / "ortho")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = save_orthogonalized(fresh, r, tmp_path / "ortho")
    got = _plain_hf_logits(out, b.tokens, b.attention_mask)
    assert float((got - clean)[real].abs().max()) > 1e-2  # the edit does something

    if not fam.post_norm:
        # Both placements are the same hook points here, and the weight edit is them.
        torch.testing.assert_close(got[real], by_hooks["residual"][real], atol=TOL, rtol=0)
        assert torch.equal(by_hooks["residual"], by_hooks["published"])
        return
    # Gemma: the edit removes r̂ from the embeddings and from the attention / MLP outputs
    # before the post-norms, and that is all it does ...
    r_hat = unit(r)

    def fn(act: Tensor, hook: Any) -> Tensor:
        return ablate(act, r_hat)

    edit = [("blocks.0.hook_resid_pre", fn)] + [
        (f"blocks.{i}.{p}", fn)
        for i in range(model.cfg.n_layers)
        for p in ("attn.hook_out", "mlp.hook_out")
    ]
    torch.testing.assert_close(
        got[real], _logits(model, b.tokens, b.attention_mask, edit)[real], atol=TOL, rtol=0
    )
    # ... so it equals neither placement: the post-norms put r̂ back into the residual stream.
    for placement, logits in by_hooks.items():
        assert float((got - logits)[real].abs().max()) > 1e-2, placement


# ------------------------------------------------------------------------- generation


def _manual_greedy(model: Any, ids: list[int], iv: Intervention, n: int, stops: list[int]) -> str:
    """Greedy tokens from full hooked forwards of one prompt, one token at a time."""
    tokens = torch.tensor([ids])
    new: list[int] = []
    for _ in range(n):
        with torch.no_grad(), intervene(model, iv):
            nxt = int(model(tokens)[0, -1].argmax())
        if nxt in stops:
            break
        new.append(nxt)
        tokens = torch.cat([tokens, torch.tensor([[nxt]])], dim=1)
    return model.tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["lce-ablate", "ace-add"])
def test_generation_under_intervention_equals_manual_hooked_forward(tiny_family, kind):
    model, n_new = tiny_family.model, 4
    r = _direction(model.cfg.d_model)
    if kind == "lce-ablate":
        iv = Intervention("ablate", "lce", r)
    else:
        iv = Intervention("add", "ace", r, layer=1, reference=_direction(model.cfg.d_model, 4))
    prompts = prompts_for(model, [*VAL_H, *VAL_L[:1]])
    assert len(set(prompts.lengths)) > 1  # a padded batch
    got = generate(model, prompts, intervention=iv, max_new_tokens=n_new, batch_size=4, progress=False)
    stops = stop_token_ids(model)
    want = [_manual_greedy(model, list(ids), iv, n_new, stops) for ids in prompts.ids]
    assert got == want
    assert any(want), "every completion is empty; the check needs tokens"


# ------------------------------------------------------------ clean passes' unembedding


def test_clean_passes_unembed_the_last_position_only(tiny_family):
    """Runner's clean passes, the activation means and clean_logits: logits [batch, 1, d_vocab]."""
    from cosmic_tl.activations import mean_activations

    model = tiny_family.model
    shapes: list[tuple[int, ...]] = []

    def grab(act: Tensor, hook) -> None:
        shapes.append(tuple(act.shape))

    with model.hooks(fwd_hooks=[("unembed.hook_out", grab)]):
        engine.Runner(model, VAL_H, batch_size=2)
        mean_activations(model, VAL_H, n_eoi=2, batch_size=2, progress=False)
        engine.clean_logits(model, VAL_H, batch_size=2)
    assert shapes and all(len(s) == 3 and s[1] == 1 for s in shapes), shapes


# ------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "dropped", ["blocks.2.hook_resid_pre", "blocks.1.hook_resid_post", "ln_final.hook_out"]
)
def test_a_missing_hook_point_is_a_clear_error(tiny, monkeypatch, dropped):
    """A bridge that lacks a hook point cosmic_tl reads: an error naming the model and it."""
    from cosmic_tl.activations import mean_activations
    from cosmic_tl.models.boot import model_id

    real = type(tiny).hook_dict
    monkeypatch.setattr(
        type(tiny),
        "hook_dict",
        property(lambda self: {k: v for k, v in real.fget(self).items() if k != dropped}),
    )
    missing = f"{model_id(tiny)} has no hook point '{dropped}', which"
    with pytest.raises(ValueError, match=re.escape(f"{missing} computing the activation means needs")):
        mean_activations(tiny, VAL_H, n_eoi=2, progress=False)
    with pytest.raises(ValueError, match=re.escape(f"{missing} the engine's block replay")):
        engine.Runner(tiny, VAL_H)
    with pytest.raises(ValueError, match=re.escape(missing)):
        compute_candidates(tiny, TRAIN_H, TRAIN_L, progress=False)


@pytest.mark.parametrize(
    "template",
    [
        # the instruction is the last thing rendered: no generation prompt, no closing marker
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}{% endfor %}",
        # a generation prompt that the template ignores
        "{{ messages[-1]['content'] }}",
    ],
)
def test_a_template_without_eoi_tokens_is_a_clear_error(template):
    tok = family_tokenizer(FAMILIES["llama"])
    tok.chat_template = template
    tok.name_or_path = "tiny/llama-no-eoi"
    with pytest.raises(
        ChatTemplateError, match=r"'tiny/llama-no-eoi' puts no tokens after the instruction"
    ):
        end_of_instruction(tok)


def test_a_template_that_changes_the_instruction_or_is_missing_is_a_clear_error():
    tok = family_tokenizer(FAMILIES["llama"])
    tok.name_or_path = "tiny/llama-odd"
    tok.chat_template = "{{ messages[-1]['content'] | upper }}<|im_end|>"
    with pytest.raises(
        ChatTemplateError, match=r"'tiny/llama-odd' does not place the instruction verbatim"
    ):
        end_of_instruction(tok)
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match=r"tokenizer of 'tiny/llama-odd' has no chat template"):
        end_of_instruction(tok)
