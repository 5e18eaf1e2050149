"""The engine: runs a prompt set under an intervention fast, without changing its results.

:class:`Runner` is what every scoring pass goes through; :func:`clean_logits` is the
plain forward (last-position logits) that the prompt filter and the refusal-token
suggestion use. Why the runner is fast (results equal a full forward up to float
rounding):

- **Prefix reuse.** A one-layer intervention at block ``l`` leaves blocks ``< l``
  untouched, so the runner caches each block's clean input once and replays only
  blocks ``l..`` (TransformerLens's ``start_at_layer`` still runs the prefix). The
  replay calls the bridge's own block modules with the arguments the model passed
  them in the clean pass, so every hook point fires as in a full forward.
- **Shared prompt tokens.** Every prompt starts with the same template tokens
  (SmolLM2's default system turn is 24 of about 45). Interventions act on each
  position alone and attention is causal, so those tokens' activations are the
  same in every prompt: each pass computes them once, at batch size 1, and the
  rest of every prompt attends to their keys and values (checked against a full
  forward when the runner is built). The rest of the prompts is right-padded, so
  that every prompt's tokens are contiguous with the shared ones: with left padding
  the padding would sit inside the sequence (``[shared][padding][rest]``), which
  a sliding-window layer (Gemma 2 and 3, Mistral) counts as window slots.
- **Zero directions.** A candidate whose direction is exactly zero (block 0's input
  at template tokens, which are the same token in every prompt) changes nothing;
  its results are the clean ones, without a pass.
- **Early stop.** Passes that need evaluation activations only stop after the last
  requested layer.
- **Last-position unembedding.** Logits are computed at the last position only,
  in the replay and in the clean passes (``logits_to_keep=1``): with a large
  vocabulary (Gemma's 262k) the unembedding of every position costs more than the
  blocks. :meth:`Runner.run_many` stacks the last-position rows of many passes into
  one unembedding product: a few rows at a time, the product is bound by reading the
  ``[d_model, d_vocab]`` matrix (on Gemma 3, 8 rows run at about a quarter of the
  machine's matmul rate, 128 rows at more than twice that; ``benchmarks/bench_unembed.py``).
- **Length bucketing.** Batches are sorted by length, so little padding is computed.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import DynamicCache

from cosmic_tl.activations import (
    eval_hook_names,
    last_logits_only,
    require_hook_points,
    resid_pre_names,
)
from cosmic_tl.interventions import Intervention, intervention_hooks
from cosmic_tl.templates import Batch, Prompts, drop_prefix, prompts_for, shared_prefix_length


@dataclass
class _PreparedBatch:
    batch: Batch  # the tokens replayed (without the shared prefix when there is one)
    last: Tensor  # [batch] each prompt's last column, on the model's device
    block_inputs: list[Tensor | None]  # clean input of each block (None if not kept)
    block_kwargs: list[dict[str, Any]]  # what the model passed each block
    clean_eval_rows: Tensor  # [batch, layer, d_model] float64, each prompt's own
    clean_eval: Tensor  # [layer, d_model] float64 sums over the batch's prompts
    clean_logits: Tensor  # [batch, d_vocab] at the last position


@dataclass
class _SharedPrefix:
    """The tokens every prompt starts with, replayed once per pass at batch size 1."""

    n_tokens: int
    block_inputs: list[Tensor]  # clean input of every block
    block_kwargs: list[dict[str, Any]]
    clean_kv: list[tuple[Tensor, Tensor]]  # every block's clean keys and values
    cache_key: str  # the keyword under which blocks receive their KV cache


class _PrefixKV:
    """What the attention layers see as their KV cache during a replay.

    Without ``past`` it records each layer's keys and values (a replay of the shared
    prefix); with ``past`` it puts the prefix's keys and values, broadcast over the
    batch, in front of each layer's own (a replay of the rest of the prompts). It
    implements only the ``update`` call that TransformerLens's attention makes.
    """

    def __init__(self, past: Sequence[tuple[Tensor, Tensor]] | None = None) -> None:
        self.past = past
        self.kv: dict[int, tuple[Tensor, Tensor]] = {}

    def update(self, k: Tensor, v: Tensor, layer_idx: int, *_: Any, **__: Any) -> tuple[Tensor, Tensor]:
        if self.past is None:
            self.kv[layer_idx] = (k, v)
            return k, v
        pk, pv = self.past[layer_idx]
        b = k.shape[0]
        return (
            torch.cat([pk.expand(b, *pk.shape[1:]), k], dim=-2),
            torch.cat([pv.expand(b, *pv.shape[1:]), v], dim=-2),
        )


@dataclass(frozen=True)
class RunOutput:
    """What one pass over a prompt set produced."""

    eval_sums: Float[Tensor, "layer d_model"] | None  # sum over prompts, eval layers filled
    logits: Float[Tensor, "prompt d_vocab"] | None  # last position, in prompt order


class Runner:
    """Runs a prompt set under an intervention, replaying blocks from clean caches.

    One clean forward per batch records each block's input and keyword arguments
    (attention mask, position embeddings, ...); :meth:`run` then replays blocks
    ``start..stop`` through the bridge's block modules with the intervention's hooks.

    With ``share_prefix`` the tokens that every prompt starts with (a chat
    template's system turn, for example) are replayed once per pass at batch size
    1, and the rest of each prompt attends to their keys and values. Causal
    attention makes this exact up to float rounding; the runner checks it against
    a full forward of the clean prompts when it is built and, if the two disagree
    (a model whose attention does not take a cache this way), warns and replays
    whole prompts instead. It shares only when that removes at least a quarter of
    the tokens a pass computes (padding included), so a template that puts a few
    tokens before the instruction does not pay the extra batch-1 replay for little.
    """

    def __init__(
        self,
        model: Any,
        prompts: Sequence[str] | Prompts,
        *,
        batch_size: int = 32,
        reuse_prefix: bool = True,
        share_prefix: bool = True,
    ) -> None:
        if not prompts:
            raise ValueError("need at least one prompt")
        self.model = model
        self.n_layers: int = model.cfg.n_layers
        require_hook_points(
            model,
            [*resid_pre_names(self.n_layers), *eval_hook_names(self.n_layers)],
            "the engine's block replay",
        )
        self.reuse_prefix = reuse_prefix
        self.flops = 0.0  # weight-matmul FLOPs executed (padding included)
        self.passes = 0  # calls of run()
        self._params_per_block = _block_params(model)
        self._unembed_params = int(model.cfg.d_model) * int(model.cfg.d_vocab)
        # Gemma 2 soft-caps its final logits; the model's own forward does, so must the replay.
        self._soft_cap = float(getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0)
        self._prefix: _SharedPrefix | None = None
        # A resample (see resampled()): each prompt's count and the drawn prompts' order.
        self._weights: Tensor | None = None
        self._index: Tensor | None = None
        prompts = prompts_for(model, prompts)
        self.n_prompts = len(prompts)
        self._pad = prompts.pad_id
        todo = prompts.batches(batch_size)
        self._batches = [self._prepare(b) for b in todo]
        self.clean = RunOutput(
            torch.stack([b.clean_eval for b in self._batches]).sum(0),
            self._in_prompt_order([b.clean_logits for b in self._batches]),
        )
        if share_prefix:
            self._share_prefix(todo)

    def resampled(self, index: Sequence[int]) -> Runner:
        """This runner's prompts drawn as ``index`` (repeats allowed), e.g. a bootstrap resample.

        What :meth:`run` returns equals a runner built on ``[prompts[i] for i in index]``
        (up to float rounding): evaluation sums count prompt ``i`` as often as it is drawn
        and logits come in the drawn order. The clean caches and the shared prompt tokens
        are this runner's, so no clean pass is repeated; each intervened pass still runs
        over the distinct prompts once. Pass and FLOP counters start from zero.
        """
        if self._index is not None:
            raise ValueError("this runner is already a resample; resample the runner it came from")
        idx = torch.as_tensor(list(index), dtype=torch.long)
        if idx.numel() == 0:
            raise ValueError("need at least one prompt")
        if int(idx.min()) < 0 or int(idx.max()) >= self.n_prompts:
            raise ValueError(f"prompt indices must be in [0, {self.n_prompts}), got {idx.tolist()}")
        out = copy.copy(self)
        out._index = idx
        out._weights = torch.bincount(idx, minlength=self.n_prompts).double()
        out.passes, out.flops = 0, 0.0
        assert self.clean.logits is not None
        sums = torch.stack([out._clean_sums(b) for b in self._batches]).sum(0)
        out.clean = RunOutput(sums, self.clean.logits[idx])
        return out

    def _batch_weights(self, prep: _PreparedBatch) -> Tensor | None:
        """The counts of a batch's prompts in a resample (None: each counts once)."""
        return None if self._weights is None else self._weights[list(prep.batch.index)]

    def _clean_sums(self, prep: _PreparedBatch) -> Tensor:
        """A batch's clean evaluation sums ``[layer, d_model]``, weighted in a resample."""
        w = self._batch_weights(prep)
        return prep.clean_eval if w is None else (prep.clean_eval_rows * w[:, None, None]).sum(0)

    @property
    def shared_tokens(self) -> int:
        """How many leading tokens are computed once per pass (0: none)."""
        return self._prefix.n_tokens if self._prefix is not None else 0

    def _share_prefix(self, todo: list[Batch]) -> None:
        n = shared_prefix_length(todo)
        if n == 0:
            return
        # Right-padded: [shared prefix][prompt][padding], never padding in between.
        rest = [drop_prefix(b, n, self._pad, side="right") for b in todo]
        before = sum(b.tokens.numel() for b in todo)
        if n + sum(b.tokens.numel() for b in rest) > (1 - _MIN_SHARED_SAVING) * before:
            return  # too little to gain for an extra batch-1 replay per pass
        whole, clean = self._batches, self.clean
        try:
            self._prefix = self._prepare_prefix(todo[0], n)
            self._batches = [self._prepare(b) for b in rest]
            replay = self.run(None, eval_layers=range(self.n_layers), logits=True)
            self.passes -= 1  # the check is not a scoring pass
            problem = _disagreement(replay, clean)
        except Exception as err:  # noqa: BLE001 - any failure means: do not share
            problem = f"{type(err).__name__}: {err}"
        if problem:
            warnings.warn(
                f"computing the {n} shared prompt tokens once does not reproduce the full "
                f"forward pass on this model ({problem}); replaying whole prompts instead",
                stacklevel=3,
            )
            self._prefix, self._batches = None, whole
            return
        self.clean = replay

    @torch.no_grad()
    def _prepare_prefix(self, batch: Batch, n: int) -> _SharedPrefix:
        tokens = batch.rows()[0][None, :n]
        kwargs: list[dict[str, Any]] = [{} for _ in range(self.n_layers)]
        keys: set[str] = set()

        def record(i: int, kw: dict[str, Any]) -> None:
            keys.update(k for k in kw if k in _CACHE_KEYS)
            kwargs[i] = {k: v for k, v in kw.items() if k not in _CACHE_KEYS}

        names = resid_pre_names(self.n_layers)
        with _recording(self.model, record):
            _, cache = self.model.run_with_cache(
                tokens.to(self.device),
                past_key_values=DynamicCache(),
                names_filter=lambda name: name in names,
                **last_logits_only(self.model),
            )
        if len(keys) != 1:
            raise RuntimeError(f"blocks receive their KV cache as {sorted(keys) or 'nothing'}")
        key = keys.pop()
        inputs = [cache[name] for name in names]
        rec = _PrefixKV()
        x = inputs[0]
        for i in range(self.n_layers):
            x = _hidden(self.model.blocks[i](x, **{**kwargs[i], key: rec}))
        self.flops += 2.0 * (2 * n * self._params_per_block * self.n_layers + self._unembed_params)
        return _SharedPrefix(n, inputs, kwargs, [rec.kv[i] for i in range(self.n_layers)], key)

    @torch.no_grad()
    def _prepare(self, batch: Batch) -> _PreparedBatch:
        kwargs: list[dict[str, Any]] = [{} for _ in range(self.n_layers)]

        def record(i: int, kw: dict[str, Any]) -> None:
            # Cache-free replay: drop the KV cache the model threads through blocks.
            kwargs[i] = {k: v for k, v in kw.items() if k not in _CACHE_KEYS}
            kwargs[i]["use_cache"] = False

        pre = resid_pre_names(self.n_layers) if self.reuse_prefix else ["blocks.0.hook_resid_pre"]
        evals = eval_hook_names(self.n_layers)
        names = set(pre) | set(evals)
        mask = batch.attention_mask
        extra: dict[str, Any] = {}
        if self._prefix is not None:
            # The rest of each prompt, attending to the shared prefix's clean keys/values.
            rows = mask.shape[0]
            past = DynamicCache()
            for i, (k, v) in enumerate(self._prefix.clean_kv):
                past.update(
                    k.expand(rows, *k.shape[1:]).contiguous(),
                    v.expand(rows, *v.shape[1:]).contiguous(),
                    i,
                )
            extra["past_key_values"] = past
            mask = torch.cat([torch.ones(rows, self._prefix.n_tokens, dtype=mask.dtype), mask], dim=1)
        with _recording(self.model, record):
            logits, cache = self.model.run_with_cache(
                batch.tokens.to(self.device),
                attention_mask=mask.to(self.device),
                names_filter=lambda n: n in names,
                **extra,
                **last_logits_only(self.model),
            )
        rows = batch.tokens.shape[0]
        tokens = batch.tokens.numel()
        self.flops += 2.0 * (
            tokens * self._params_per_block * self.n_layers + rows * self._unembed_params
        )
        kept = {n: cache[n] for n in pre}
        inputs: list[Tensor | None] = [
            kept.get(f"blocks.{i}.hook_resid_pre") for i in range(self.n_layers)
        ]
        last = batch.last.to(self.device)
        clean_rows = torch.stack([_at(cache[n], last).double().cpu() for n in evals], dim=1)
        if batch.right_padded:
            # The model's last column is padding for the shorter prompts: unembed
            # each prompt's own last token (the final norm's output, already cached).
            # The forward's own last-column logits are then wasted, but counted.
            final = self._unembed(_at(cache["ln_final.hook_out"], last))
            self.flops += 2.0 * rows * self._unembed_params
        else:
            final = logits[:, -1]
        return _PreparedBatch(
            batch, last, inputs, kwargs, clean_rows, clean_rows.sum(0), final.float().cpu()
        )

    def _unembed(self, normed: Tensor) -> Tensor:
        """Logits from the final norm's output ``[batch, d_model]``, soft-capped as the
        model's own forward does (Gemma 2)."""
        return _soft_cap(self.model.unembed(normed[:, None])[:, 0], self._soft_cap)

    def _final_norm(self, act: Tensor) -> Tensor:
        """The final norm of ``[batch, d_model]`` last-token activations."""
        return self.model.ln_final(act[:, None])[:, 0]

    def _in_prompt_order(self, rows: list[Tensor]) -> Tensor:
        """Concatenate per-batch rows and put them back in the caller's prompt order."""
        order = torch.tensor([i for b in self._batches for i in b.batch.index])
        stacked = torch.cat(rows)
        out = torch.empty_like(stacked)
        out[order] = stacked
        return out

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _replay_prefix(self, start: int, stop: int) -> list[tuple[Tensor, Tensor]]:
        """The shared prefix's keys and values per block under the active hooks."""
        p = self._prefix
        assert p is not None
        rec = _PrefixKV()
        x = p.block_inputs[start]
        for i in range(start, stop):
            x = _hidden(self.model.blocks[i](x, **{**p.block_kwargs[i], p.cache_key: rec}))
        self.flops += 2.0 * p.n_tokens * self._params_per_block * (stop - start)
        return [p.clean_kv[i] if i < start else rec.kv[i] for i in range(stop)]

    @torch.no_grad()
    def run(
        self, intervention: Intervention | None, *, eval_layers: Iterable[int], logits: bool
    ) -> RunOutput:
        """Evaluation-activation sums at ``eval_layers`` and/or last-position logits."""
        return self.run_many([intervention], eval_layers=eval_layers, logits=logits)[0]

    @torch.no_grad()
    def run_many(
        self,
        interventions: Sequence[Intervention | None],
        *,
        eval_layers: Iterable[int],
        logits: bool,
    ) -> list[RunOutput]:
        """:meth:`run` for each intervention, with one unembedding for all their logits.

        Each intervention gets its own pass; only the last-position unembedding is
        shared. With few prompts it is a product of a few rows with the whole
        ``[d_model, d_vocab]`` matrix, which reads the matrix once per call: on a large
        vocabulary (Gemma's 262k) it is bound by memory, not arithmetic, and stacking
        the rows of many passes into one product (up to ``UNEMBED_ROWS`` rows) computes
        them at several times the rate. The values are the same up to float rounding.
        """
        layers = sorted(set(eval_layers))
        outs: list[RunOutput] = []
        pending: list[tuple[int, list[Tensor]]] = []  # (output index, final norms per batch)
        for intervention in interventions:
            out, normed = self._pass(intervention, layers, logits)
            if normed is not None:
                pending.append((len(outs), normed))
            outs.append(out)
        if pending:
            flat = [rows for _, normed in pending for rows in normed]
            unembedded = iter(self._unembed_rows(flat))
            for k, normed in pending:
                rows = [next(unembedded) for _ in normed]
                out_logits = self._in_prompt_order(rows)
                if self._index is not None:
                    out_logits = out_logits[self._index]
                outs[k] = RunOutput(outs[k].eval_sums, out_logits)
        return outs

    def _unembed_rows(self, normed: list[Tensor]) -> list[Tensor]:
        """Float32 CPU logits of each ``[rows, d_model]`` final-norm tensor, unembedded
        ``UNEMBED_ROWS`` rows at a time."""
        sizes = [int(t.shape[0]) for t in normed]
        stacked = torch.cat(normed)
        parts = [
            self._unembed(stacked[i : i + UNEMBED_ROWS]).float().cpu()
            for i in range(0, stacked.shape[0], UNEMBED_ROWS)
        ]
        self.flops += 2.0 * stacked.shape[0] * self._unembed_params
        return list(torch.cat(parts).split(sizes))

    def _pass(
        self, intervention: Intervention | None, layers: list[int], logits: bool
    ) -> tuple[RunOutput, list[Tensor] | None]:
        """One pass: its evaluation sums, and each batch's final-norm output at the last
        position (``[batch, d_model]``, to be unembedded) if ``logits`` needs computing."""
        touched = intervention.start_layer if intervention is not None else self.n_layers
        if intervention is not None and intervention.is_identity:
            # A zero direction (e.g. block 0's input at template tokens) changes nothing.
            clean = RunOutput(
                self.clean.eval_sums if layers else None, self.clean.logits if logits else None
            )
            return clean, None
        if not logits and layers and touched > layers[-1]:
            # The intervention starts after every requested layer: nothing to compute.
            return RunOutput(self.clean.eval_sums, None), None
        self.passes += 1
        start = touched if self.reuse_prefix and intervention is not None else 0
        stop = self.n_layers if logits or not layers else layers[-1] + 1
        hooks = intervention_hooks(intervention, self.model) if intervention is not None else []
        d_model = self.model.cfg.d_model
        sums = torch.zeros(self.n_layers, d_model, dtype=torch.float64) if layers else None
        normed: list[Tensor] = []
        with self.model.hooks(fwd_hooks=hooks):
            shared: dict[str, Any] = {}
            if self._prefix is not None:
                shared[self._prefix.cache_key] = _PrefixKV(self._replay_prefix(start, stop))
            for prep in self._batches:
                weights = self._batch_weights(prep)
                early = [j for j in layers if j < start]
                if early and sums is not None:
                    # Blocks before the intervention are clean: reuse the clean sums.
                    sums[early] += self._clean_sums(prep)[early]
                x = prep.block_inputs[start]
                assert x is not None
                last_norm: Tensor | None = None
                for i in range(start, stop):
                    x = _hidden(self.model.blocks[i](x, **prep.block_kwargs[i], **shared))
                    if sums is not None and i in layers:
                        act = _at(x, prep.last)
                        if i == self.n_layers - 1:
                            last_norm = self._final_norm(act)
                            act = last_norm
                        sums[i] += _summed(act, weights)
                n_tok = prep.batch.tokens.numel()  # padding is computed too
                self.flops += 2.0 * n_tok * self._params_per_block * (stop - start)
                if logits:
                    if last_norm is None:
                        last_norm = self._final_norm(_at(x, prep.last))
                    normed.append(last_norm)
        return RunOutput(sums, None), (normed if logits else None)


_CACHE_KEYS = ("past_key_values", "past_key_value")
# Share the prompts' common tokens only if that removes at least this fraction of the
# tokens a pass computes: the batch-1 replay of the shared tokens has its own overhead.
_MIN_SHARED_SAVING = 0.25
# At most this many last-position rows go through one unembedding product (see
# Runner.run_many): enough for the product to be bound by arithmetic, not by reading
# the unembedding matrix, and ``UNEMBED_ROWS × d_vocab`` float32 logits stay small.
UNEMBED_ROWS = 128


def _soft_cap(logits: Tensor, cap: float) -> Tensor:
    """``cap · tanh(logits / cap)`` (final-logit soft-capping); unchanged for ``cap <= 0``."""
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def _summed(act: Tensor, weights: Tensor | None) -> Tensor:
    """Float64 sum over the batch of ``[batch, d_model]`` rows (weighted), on the CPU."""
    if weights is None:
        return act.double().sum(0).cpu()
    return (act.double() * weights.to(act.device)[:, None]).sum(0).cpu()


def _at(x: Tensor, cols: Tensor) -> Tensor:
    """``x[b, cols[b]]`` for every row ``b`` of a ``[batch, pos, ...]`` tensor."""
    return x[torch.arange(x.shape[0], device=x.device), cols.to(x.device)]


def _hidden(out: Any) -> Tensor:
    """A block's output hidden states (blocks may return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def _recording(model: Any, record: Callable[[int, dict[str, Any]], None]) -> Iterator[None]:
    """Call ``record(i, kwargs)`` with what the model passes block ``i`` while active."""
    handles = [
        block.register_forward_pre_hook(lambda _m, _a, kw, i=i: record(i, kw), with_kwargs=True)
        for i, block in enumerate(model.blocks)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _disagreement(a: RunOutput, b: RunOutput, rtol: float = 1e-3) -> str:
    """Empty if ``a`` and ``b`` agree row by row to ``rtol`` of each row's largest value."""
    for name, x, y in (("activations", a.eval_sums, b.eval_sums), ("logits", a.logits, b.logits)):
        assert x is not None and y is not None
        gap = (x.double() - y.double()).abs().amax(-1)
        scale = y.double().abs().amax(-1)
        if not bool((gap <= rtol * scale + 1e-6).all()):
            worst = float((gap / (scale + 1e-12)).max())
            return f"{name} differ by up to {worst:.1e} of their size"
    return ""


def _block_params(model: Any) -> int:
    """Weights of one block (for the FLOP count: 2 FLOPs per weight per token)."""
    return sum(p.numel() for p in model.blocks[0].parameters())


@torch.no_grad()
def clean_logits(
    model: Any, prompts: Sequence[str] | Prompts, *, batch_size: int = 32
) -> Float[Tensor, "prompt d_vocab"]:
    """Next-token logits at the last position of every prompt, no intervention, in prompt order."""
    prompts = prompts_for(model, prompts)
    device = next(model.parameters()).device
    out: Tensor | None = None
    keep = last_logits_only(model)
    for batch in prompts.batches(batch_size):
        logits = model(batch.tokens.to(device), attention_mask=batch.attention_mask.to(device), **keep)
        last = logits[:, -1].float().cpu()
        if out is None:
            out = torch.empty(len(prompts), last.shape[-1], dtype=torch.float32)
        out[list(batch.index)] = last
    assert out is not None
    return out
