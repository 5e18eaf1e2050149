"""LCE ablation's placement on blocks with post-sub-layer norms (Gemma 2 and 3).

Gemma's blocks add ``post_attention_layernorm(self_attn(x))`` and
``post_feedforward_layernorm(mlp(x))`` to the residual stream. The ``"residual"``
placement edits what is added (the bridge's ``hook_attn_out`` / ``hook_mlp_out``);
``"published"`` edits the modules' outputs before the post-norms, as the published
code does. Checked here against an independent Hugging Face implementation, and on a
Llama, where the two placements are the same hook points.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import HARMFUL, HARMLESS
from tiny_models import save_tiny
from torch import Tensor

from cosmic_tl.interventions import HookPoints, Intervention, intervene, intervention_hooks
from cosmic_tl.models import load_model
from cosmic_tl.templates import batches

PROMPTS = [*HARMFUL[:2], *HARMLESS[:2]]
TOL = 1e-4
# Gemma-style blocks, SmolLM2's tokenizer and template (so a 24-token shared system turn);
# sliding windows shorter than the prompts (about 35 tokens), so that they matter.
GEMMA = dict(
    head_dim=16,
    sliding_window=16,
    layer_types=["sliding_attention", "full_attention"] * 2,
)


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return save_tiny(
        tmp_path_factory.mktemp("tiny-gemma3"), Gemma3ForCausalLM, Gemma3TextConfig, **GEMMA
    )


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # A low logit cap (the real one is 30) so that capped and uncapped logits differ clearly.
    return save_tiny(
        tmp_path_factory.mktemp("tiny-gemma2"),
        Gemma2ForCausalLM,
        Gemma2Config,
        final_logit_softcapping=5.0,
        **GEMMA,
    )


@pytest.fixture(scope="module")
def models(gemma3_dir: Path, gemma2_dir: Path, tiny_dir: Path, tiny) -> dict[str, tuple[Path, object]]:
    """name -> (HF directory, booted TransformerBridge)."""
    return {
        "gemma3": (gemma3_dir, load_model(gemma3_dir, device="cpu")),
        "gemma2": (gemma2_dir, load_model(gemma2_dir, device="cpu")),
        "llama": (tiny_dir, tiny),
    }


def _direction(d_model: int) -> Tensor:
    return torch.randn(d_model, generator=torch.Generator().manual_seed(3))


def _batch(model):
    return batches(model.tokenizer, PROMPTS, len(PROMPTS))[0]


@torch.no_grad()
def _bridge_logits(model, iv: Intervention | None) -> Tensor:
    b = _batch(model)
    if iv is None:
        return model(b.tokens, attention_mask=b.attention_mask)
    with intervene(model, iv):
        return model(b.tokens, attention_mask=b.attention_mask)


# ------------------------------------------------------------- which hooks fire


def test_hook_points_on_post_norm_blocks(models):
    """On Gemma, hook_attn_out / hook_mlp_out are the post-norms' outputs; on Llama the modules'."""
    for name in ("gemma3", "gemma2"):
        hd = models[name][1].hook_dict
        for i in range(4):
            assert hd[f"blocks.{i}.hook_attn_out"] is hd[f"blocks.{i}.ln1_post.hook_out"]
            assert hd[f"blocks.{i}.hook_mlp_out"] is hd[f"blocks.{i}.ln2_post.hook_out"]
            assert hd[f"blocks.{i}.hook_attn_out"] is not hd[f"blocks.{i}.attn.hook_out"]
    hd = models["llama"][1].hook_dict
    for i in range(4):
        assert hd[f"blocks.{i}.hook_attn_out"] is hd[f"blocks.{i}.attn.hook_out"]
        assert hd[f"blocks.{i}.hook_mlp_out"] is hd[f"blocks.{i}.mlp.hook_out"]


# --------------------------------------------------------- the residual placement


def _captured(model, iv: Intervention, names: list[str]) -> dict[str, Tensor]:
    store: dict[str, Tensor] = {}

    def grab(act: Tensor, hook, name: str) -> None:
        store[name] = act.detach().clone()

    b = _batch(model)
    hooks = [(n, partial(grab, name=n)) for n in names]
    with torch.no_grad(), intervene(model, iv), model.hooks(fwd_hooks=hooks):
        model(b.tokens, attention_mask=b.attention_mask)
    return store


def _along(v: Tensor, r: Tensor) -> Tensor:
    """|v·r̂| / |v| for every token vector (0 for a zero vector, e.g. Gemma's pad embedding)."""
    return (v @ (r / r.norm())).abs() / v.norm(dim=-1).clamp_min(1e-30)


@pytest.mark.parametrize("name", ["gemma3", "gemma2", "llama"])
def test_residual_placement_keeps_every_block_input_and_output_orthogonal(models, name):
    model = models[name][1]
    r = _direction(model.cfg.d_model)
    names = [f"blocks.{i}.{p}" for i in range(4) for p in ("hook_resid_pre", "hook_resid_post")]
    acts = _captured(model, Intervention("ablate", "lce", r), names)
    for n in names:
        assert float(_along(acts[n], r).max()) <= TOL, n
    if name != "llama":
        # The published placement lets the post-norms' elementwise scale put r̂ back.
        leaky = _captured(model, Intervention("ablate", "lce", r, placement="published"), names)
        worst = max(float(_along(leaky[f"blocks.{i}.hook_resid_post"], r).max()) for i in range(4))
        assert worst > 1e-2


# ------------------------------------------- an independent Hugging Face reference


def _hf_ablated_logits(path: Path, model, r: Tensor, modules: tuple[str, str]) -> Tensor:
    """Logits of plain Hugging Face with ``v − (v·r̂) r̂`` on every decoder layer's input
    and on the outputs of ``modules`` of every layer (PyTorch forward hooks)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    r_hat = r / (r.norm() + 1e-8)

    def proj(v: Tensor) -> Tensor:
        return v - (v @ r_hat).unsqueeze(-1) * r_hat

    def on_input(_module, args, kwargs):
        if args:
            return (proj(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": proj(kwargs["hidden_states"])}

    def on_output(_module, _args, out):
        return (proj(out[0]), *out[1:]) if isinstance(out, tuple) else proj(out)

    for layer in hf.model.layers:
        layer.register_forward_pre_hook(on_input, with_kwargs=True)
        for m in modules:
            getattr(layer, m).register_forward_hook(on_output)
    b = _batch(model)
    with torch.no_grad():
        return hf(b.tokens, attention_mask=b.attention_mask).logits


# Which Hugging Face modules' outputs each placement edits. (Llama's
# post_attention_layernorm is its pre-MLP norm, not a post-norm.)
HF_MODULES = {
    ("gemma", "published"): ("self_attn", "mlp"),
    ("gemma", "residual"): ("post_attention_layernorm", "post_feedforward_layernorm"),
    ("llama", "published"): ("self_attn", "mlp"),
    ("llama", "residual"): ("self_attn", "mlp"),
}


@pytest.mark.parametrize("placement", ["published", "residual"])
@pytest.mark.parametrize("name", ["gemma3", "gemma2", "llama"])
def test_placement_equals_plain_hugging_face(models, name, placement):
    path, model = models[name]
    r = _direction(model.cfg.d_model)
    ours = _bridge_logits(model, Intervention("ablate", "lce", r, placement=placement))
    family = "llama" if name == "llama" else "gemma"
    ref = _hf_ablated_logits(path, model, r, HF_MODULES[family, placement])
    real = _batch(model).attention_mask.bool()  # padded positions are not compared
    torch.testing.assert_close(ours[real], ref[real], atol=TOL, rtol=0)
    # ... and the ablation is not a no-op
    assert float((ours - _bridge_logits(model, None))[real].abs().max()) > 1e-2


@pytest.mark.parametrize("name", ["gemma3", "gemma2", "llama"])
def test_placements_differ_only_with_post_norms(models, name):
    model = models[name][1]
    r = _direction(model.cfg.d_model)
    res = _bridge_logits(model, Intervention("ablate", "lce", r))
    pub = _bridge_logits(model, Intervention("ablate", "lce", r, placement="published"))
    if name == "llama":
        assert torch.equal(res, pub)
    else:
        real = _batch(model).attention_mask.bool()
        assert float((res - pub)[real].abs().max()) > 1e-2 * float(res[real].abs().max())


def test_placement_is_validated_and_ignored_elsewhere(models):
    model = models["gemma3"][1]
    r = _direction(model.cfg.d_model)
    # Under the tests' runtime type checks the Literal annotation already refuses it in
    # __init__; the dataclass's own check is what users get, so call it directly.
    bad = object.__new__(Intervention)
    for f in dataclasses.fields(Intervention):
        object.__setattr__(bad, f.name, getattr(Intervention("ablate", "lce", r), f.name))
    object.__setattr__(bad, "placement", "post")
    with pytest.raises(ValueError, match="placement must be 'residual' or 'published', not 'post'"):
        bad.__post_init__()
    for kind, mode in (("add", "lce"), ("ablate", "ace"), ("add", "ace")):
        a = Intervention(kind, mode, r, 2, r * 0.5)
        b = dataclasses.replace(a, placement="published")
        assert [n for n, _ in intervention_hooks(a, model)] == [
            n for n, _ in intervention_hooks(b, model)
        ]
    points = HookPoints.of(model)
    assert points.ablation_names("published")[:3] == [
        "blocks.0.hook_resid_pre",
        "blocks.0.attn.hook_out",
        "blocks.0.mlp.hook_out",
    ]
    # the older (intervention, n_layers, d_model) form: the bridge's standard names
    old = intervention_hooks(Intervention("ablate", "lce", r), 4, model.cfg.d_model)
    assert [n for n, _ in old] == points.ablation_names("residual")


# ------------------------------------------------------ a bridge lacking a hook point


def test_missing_hook_point_is_a_clear_error(models, monkeypatch):
    model = models["gemma3"][1]
    r = _direction(model.cfg.d_model)
    names = set(model.hook_dict)
    fake = SimpleNamespace(
        cfg=SimpleNamespace(n_layers=4, d_model=model.cfg.d_model, model_name="fake-hybrid"),
        hook_dict=dict.fromkeys(names - {"blocks.3.hook_mlp_out"}),
    )
    with pytest.raises(ValueError, match=r"fake-hybrid has no hook point 'blocks.3.hook_mlp_out'"):
        intervention_hooks(Intervention("ablate", "lce", r), fake)
    # the published placement does not need that hook point
    assert len(intervention_hooks(Intervention("ablate", "lce", r, placement="published"), fake)) == 12

    # a real bridge whose blocks lack the modules' own outputs: intervene refuses
    # before any hook is attached
    real = type(model).hook_dict

    def without_module_outputs(self):
        return {
            k: v for k, v in real.fget(self).items() if not k.endswith(("attn.hook_out", "mlp.hook_out"))
        }

    monkeypatch.setattr(type(model), "hook_dict", property(without_module_outputs))
    pub = Intervention("ablate", "lce", r, placement="published")
    missing = r"has no hook point 'blocks.0.attn.hook_out' \(and 7 more\)"
    with pytest.raises(ValueError, match=missing), intervene(model, pub):
        pass
    monkeypatch.undo()
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values() if hasattr(hp, "fwd_hooks"))


# ------------------------------------------------------------ the engine's replay


def _plain_last_logits(model, prompts: list[str], iv: Intervention) -> Tensor:
    from cosmic_tl.templates import prompts_for

    out = torch.empty(len(prompts), model.cfg.d_vocab)
    for b in prompts_for(model, prompts).batches(2):
        with torch.no_grad(), intervene(model, iv):
            out[list(b.index)] = model(b.tokens, attention_mask=b.attention_mask)[:, -1].float()
    return out


def _runner_matches_plain(model, prompts: list[str], **runner_kwargs) -> None:
    from cosmic_tl.engine import Runner

    runner = Runner(model, prompts, batch_size=2, **runner_kwargs)
    r = _direction(model.cfg.d_model)
    for placement in ("residual", "published"):
        iv = Intervention("ablate", "lce", r, placement=placement)
        got = runner.run(iv, eval_layers=(1,), logits=True).logits
        assert got is not None
        torch.testing.assert_close(got, _plain_last_logits(model, prompts, iv), atol=TOL, rtol=0)


def test_engine_replays_gemma3_whole_prompts(models):
    """Block replay on Gemma 3 (sliding-window and full layers, per-layer RoPE)."""
    _runner_matches_plain(models["gemma3"][1], PROMPTS, share_prefix=False)


def test_engine_shares_prompt_tokens_on_gemma3_without_padding(models):
    """Shared prompt tokens on Gemma 3 work when no padding sits inside the sequence."""
    from cosmic_tl.engine import Runner

    model = models["gemma3"][1]
    same_length = ["Describe a cat to me now", "Describe a dog to me now"]
    assert len(set(batches(model.tokenizer, same_length, 2)[0].attention_mask.sum(1).tolist())) == 1
    assert Runner(model, same_length, batch_size=2).shared_tokens > 0
    _runner_matches_plain(model, same_length)


def test_engine_shares_prompt_tokens_on_gemma3_with_padding(models):
    """With padding the rest of each prompt is right-padded after the shared tokens, so a
    sliding-window layer whose window is shorter than the prompt sees the same tokens as
    in a whole-prompt forward (left padding would put the padding inside the sequence)."""
    from cosmic_tl.engine import Runner

    model = models["gemma3"][1]
    lengths = batches(model.tokenizer, PROMPTS, 2)
    assert any(len(set(b.attention_mask.sum(1).tolist())) > 1 for b in lengths)
    assert max(int(b.attention_mask.sum(1).max()) for b in lengths) > 16  # the window
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to whole prompts
        runner = Runner(model, PROMPTS, batch_size=2)
    assert runner.shared_tokens > 0
    _runner_matches_plain(model, PROMPTS)


def test_engine_replays_gemma2(models):
    _runner_matches_plain(models["gemma2"][1], PROMPTS, share_prefix=False)
