"""A straightforward implementation of COSMIC's scoring, following the reference loop.

Independent of cosmic_tl's engine: three full forward passes per candidate over
every layer with full logits, hooks written inline from the formulas, plain
batches in the given order. Tests and benchmarks compare the engine against it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from cosmic_tl.scoring import Scores
from cosmic_tl.templates import format_prompt, left_pad, pad_id


def _batches(model: Any, prompts: Sequence[str], batch_size: int):
    tok = model.tokenizer
    ids = [tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    for s in range(0, len(ids), batch_size):
        yield left_pad(ids[s : s + batch_size], pad_id(tok), range(s, min(s + batch_size, len(ids))))


def _hidden_and_logits(model: Any, prompts: Sequence[str], hooks, batch_size: int):
    """Per prompt: every layer's last-token hidden state (HF hidden_states[1:]) and logits."""
    n = model.cfg.n_layers
    names = [f"blocks.{j}.hook_resid_post" for j in range(n - 1)] + ["ln_final.hook_out"]
    hs, lg = [], []
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        for b in _batches(model, prompts, batch_size):
            logits, cache = model.run_with_cache(
                b.tokens, attention_mask=b.attention_mask, names_filter=lambda x: x in names
            )
            hs.append(torch.stack([cache[x][:, -1] for x in names], 1).double())
            lg.append(logits[:, -1].double())
    return torch.cat(hs), torch.cat(lg)


def _unit(r):
    return r / (r.norm() + 1e-8)


def _hooks(kind: str, mode: str, r, ref, layer: int, n: int, alpha: float):
    r = r.float()
    rh = _unit(r)
    if mode == "lce" and kind == "ablate":

        def f(a, hook):
            return a - (a @ rh).unsqueeze(-1) * rh

        return [
            (f"blocks.{i}.{p}", f)
            for i in range(n)
            for p in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")
        ]
    ref = ref.float()
    if mode == "lce":

        def g(a, hook):
            return a + alpha * r
    elif kind == "ablate":

        def g(a, hook):
            return a - (a @ rh).unsqueeze(-1) * rh + (ref @ rh) * rh
    else:

        def g(a, hook):
            return a - (a @ rh).unsqueeze(-1) * rh + (ref @ rh) * rh + alpha * r

    return [(f"blocks.{layer}.hook_resid_pre", g)]


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def reference_scores(
    model: Any,
    directions: torch.Tensor,  # [pos, layer, d]
    harmless_mean: torch.Tensor,  # [pos, layer, d]
    harmful_train: Sequence[str],
    harmless_train: Sequence[str],
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    *,
    mode: str = "ace",
    alpha: float = 1.0,
    token_ids: Sequence[int] = (),
    batch_size: int = 32,
    eval_fraction: float = 0.1,
) -> dict[str, Any]:
    """Every candidate's S_abl, S_add, KL (and, with token_ids, the refusal-token grids):
    the slow way.

    ``bypass`` / ``induce`` / ``KL_linear`` use linear interventions whatever ``mode`` is
    (Arditi et al.); ``bypass_mode`` / ``induce_mode`` use ``mode``'s (the substring
    method). In LCE mode they coincide.
    """
    n = model.cfg.n_layers
    h_tr, _ = _hidden_and_logits(model, harmful_train, [], batch_size)
    l_tr, _ = _hidden_and_logits(model, harmless_train, [], batch_size)
    mh, ml = h_tr.mean(0), l_tr.mean(0)
    cos = torch.stack([_cos(mh[j], ml[j]) * torch.ones(()) for j in range(n)]).double()
    count = max(1, math.floor(eval_fraction * n))
    low = sorted(range(n), key=lambda j: (float(cos[j]), j))[:count]
    h_val, h_logits = _hidden_and_logits(model, harmful_val, [], batch_size)
    l_val, l_logits = _hidden_and_logits(model, harmless_val, [], batch_size)

    def pool(h):
        v = h[:, low].mean((0, 1))
        return v / v.norm()

    def refusal(lg):
        p = torch.softmax(lg, -1)[:, list(token_ids)].sum(-1)
        return float((torch.log(p + 1e-8) - torch.log(1 - p + 1e-8)).mean())

    b_harmless, b_harmful = pool(l_val), pool(h_val)
    p_clean = torch.softmax(l_logits, -1)
    k = directions.shape[0]
    grids = {
        x: torch.full((k, n), math.nan, dtype=torch.float64)
        for x in ("S_abl", "S_add", "KL", "bypass", "induce", "KL_linear", "bypass_mode", "induce_mode")
    }

    def kl(lg):
        q = torch.softmax(lg, -1)
        return float((p_clean * (torch.log(p_clean + 1e-6) - torch.log(q + 1e-6))).sum(-1).mean())

    for i in range(k):
        for layer in range(n):
            r, ref = directions[i, layer], harmless_mean[i, layer]
            abl = _hooks("ablate", mode, r, ref, layer, n, alpha)
            add = _hooks("add", mode, r, ref, layer, n, alpha)
            h1, lg1 = _hidden_and_logits(model, harmful_val, abl, batch_size)
            h2, lg2 = _hidden_and_logits(model, harmless_val, add, batch_size)
            _, lg3 = _hidden_and_logits(model, harmless_val, abl, batch_size)
            grids["S_abl"][i, layer] = _cos(pool(h1), b_harmless)
            grids["S_add"][i, layer] = _cos(pool(h2), b_harmful)
            grids["KL"][i, layer] = kl(lg3)
            if token_ids:
                grids["bypass_mode"][i, layer] = refusal(lg1)
                grids["induce_mode"][i, layer] = refusal(lg2)
                if mode != "lce":
                    lin_abl = _hooks("ablate", "lce", r, ref, layer, n, alpha)
                    lin_add = _hooks("add", "lce", r, ref, layer, n, alpha)
                    _, lg1 = _hidden_and_logits(model, harmful_val, lin_abl, batch_size)
                    _, lg2 = _hidden_and_logits(model, harmless_val, lin_add, batch_size)
                    _, lg3 = _hidden_and_logits(model, harmless_val, lin_abl, batch_size)
                grids["bypass"][i, layer] = refusal(lg1)
                grids["induce"][i, layer] = refusal(lg2)
                grids["KL_linear"][i, layer] = kl(lg3)
    return {
        "grids": grids,
        "eval_layers": tuple(low),
        "layer_cosines": cos,
        "b_harmful": b_harmful,
        "b_harmless": b_harmless,
    }


def as_scores(
    ref: dict[str, Any], like: Scores, mode: str, directions: torch.Tensor | None = None
) -> Scores:
    """The reference loop's grids as a ``Scores`` (every cell computed), for selection;
    with ``directions`` also each candidate's norm (selection discards zero directions)."""
    grids = dict(ref["grids"])
    if directions is not None:
        grids["norm"] = directions.double().norm(dim=-1)
    done = {k: torch.ones_like(v, dtype=torch.bool) for k, v in grids.items()}
    return Scores(
        grids,
        done,
        like.positions,
        like.position_labels,
        ref["eval_layers"],
        ref["layer_cosines"],
        ref["b_harmful"],
        ref["b_harmless"],
        mode,
        1.0,
        like.model_id,
    )
