"""How stable the picks are: selection repeated over bootstrap resamples of the prompts.

Each resample draws the four train and val sets again with replacement (same sizes),
from a generator seeded by ``(seed, resample)`` alone, so resample ``b`` is the same
whatever the number of resamples; candidates, scores and every method's pick are then
computed as on the drawn lists. Per method, :class:`Stability` gives how often each
(position, layer) cell is picked, the share of resamples that pick the modal cell with
a Wilson interval, and the mean pairwise cosine of the picked directions.

**What is reused.** A resample is a multiset of the original prompts, i.e. a count per
prompt, and everything selection reads is a mean over prompts or a function of means:

- *train*: every prompt's ``resid_pre`` at the end-of-instruction positions and its
  evaluation activations are kept once (:func:`~cosmic_tl.candidates.train_activations`),
  so a resample's candidates (and its evaluation layers) are weighted means, no pass;
- *val*: refusal scores and KL are means over prompts, ``S_abl``/``S_add`` cosines of
  pooled sums, so a resample is its distinct drawn prompts with their counts: a
  :class:`~cosmic_tl.engine.Runner` on the distinct drawn prompts, seen through
  :meth:`~cosmic_tl.engine.Runner.resampled` (evaluation sums weighted by the counts,
  per-prompt logits repeated). That costs one clean pass per val set and resample, and
  each intervened pass runs over the distinct drawn prompts only (on average
  ``1 − (1 − 1/n)^n`` ≈ 63% of them). ``share_val_caches=True`` builds each val set's
  runner once instead (no clean pass per resample, but every intervened pass runs all
  ``n`` prompts, those drawn zero times included); the intervened passes for the
  resample's new directions, hundreds per resample, are redone either way.

The result equals the straightforward computation on the explicitly resampled lists up
to float rounding (tested). With ``--refusal-tokens auto`` the tokens are chosen once on
the full validation sets, and Arditi's prompt filter is its outcome on the full sets (a
prompt's refusal score does not depend on the others): a resample keeps the drawn
prompts the filter kept. A method that finds nothing on a resample is a "no pick".
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from cosmic_tl.candidates import Candidates, TrainActivations, train_activations
from cosmic_tl.config import Mode, Placement, SelectionSettings
from cosmic_tl.engine import Runner
from cosmic_tl.evaluation import Rate
from cosmic_tl.planner import resolve_refusal_tokens, score_runners
from cosmic_tl.selection import SELECT, NoCandidateError, Selection
from cosmic_tl.store import load_record, save_record
from cosmic_tl.templates import Prompts, prompts_for

SETS = ("harmful_train", "harmless_train", "harmful_val", "harmless_val")
Pick = tuple[int, int]  # (position, layer)


def resample_indices(sizes: Mapping[str, int], seed: int, resample: int) -> dict[str, tuple[int, ...]]:
    """Resample ``resample``'s draw: per set of ``sizes`` (the four of :data:`SETS`), ``n``
    indices into the set, with replacement.

    The generator is seeded with ``(seed, resample)`` only, so the draw does not depend on
    how many resamples are made or in which order.

    >>> resample_indices({"harmful_train": 3, "harmless_train": 2, "harmful_val": 2,
    ...                   "harmless_val": 1}, seed=0, resample=0)["harmless_val"]
    (0,)
    """
    if set(sizes) != set(SETS) or any(int(n) < 1 for n in sizes.values()):
        raise ValueError(f"need a positive size for each of {SETS}, got {dict(sizes)}")
    rng = random.Random(f"cosmic_tl.bootstrap:{seed}:{resample}")
    return {name: tuple(rng.randrange(sizes[name]) for _ in range(sizes[name])) for name in SETS}


@dataclass(frozen=True)
class PromptFilter:
    """Arditi's prompt filter as its outcome on the full sets: the indices it kept per
    set (of :data:`SETS`) and the refusal tokens the filtered baseline scores with."""

    kept: Mapping[str, frozenset[int]]
    refusal_tokens: tuple[str, ...]

    def __post_init__(self) -> None:
        if set(self.kept) != set(SETS):
            raise ValueError(f"the prompt filter needs the kept indices of each of {SETS}")


@dataclass(frozen=True)
class Resample:
    """One resample's draw and every method's pick (``None``: nothing survived)."""

    resample: int
    indices: dict[str, tuple[int, ...]]
    picks: dict[str, Pick | None]
    directions: dict[str, Float[Tensor, " d_model"]]  # the picked directions
    messages: dict[str, str]
    seconds: float
    stats: dict[str, float]  # passes and GFLOP of this resample's scoring
    key: str = ""  # what it was computed from (a run's stage key), for resuming

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the record (``<path>.safetensors`` + ``<path>.json``); returns the JSON path."""
        tensors = {f"direction.{m}": d for m, d in self.directions.items()}
        meta = {
            "resample": self.resample,
            "indices": {k: list(v) for k, v in self.indices.items()},
            "picks": {m: None if p is None else list(p) for m, p in self.picks.items()},
            "messages": self.messages,
            "seconds": self.seconds,
            "stats": self.stats,
            "key": self.key,
        }
        return save_record(path, RESAMPLE_KIND, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Resample:
        t, meta = load_record(path, RESAMPLE_KIND)
        picks = {m: None if p is None else (int(p[0]), int(p[1])) for m, p in meta["picks"].items()}
        return cls(
            int(meta["resample"]),
            {k: tuple(int(i) for i in v) for k, v in meta["indices"].items()},
            picks,
            {k.removeprefix("direction."): v for k, v in t.items()},
            dict(meta["messages"]),
            float(meta["seconds"]),
            dict(meta["stats"]),
            str(meta.get("key", "")),
        )


RESAMPLE_KIND = "cosmic_tl.Resample"


@dataclass(frozen=True)
class MethodStability:
    """One method's picks over the resamples and what they say about its stability."""

    method: str
    picks: tuple[Pick | None, ...]  # per resample
    frequency: Float[Tensor, "pos layer"]  # how many resamples picked each cell
    directions: Float[Tensor, "resample d_model"]  # picked directions (NaN rows: no pick)
    modal: Pick | None  # the most picked cell (ties: first by position, then layer)
    modal_share: Rate  # resamples that picked it, of all resamples (Wilson 95%)
    mean_cosine: float  # mean pairwise cosine of the picked directions (NaN: < 2 picks)

    @property
    def n_none(self) -> int:
        """Resamples on which the method found nothing."""
        return sum(p is None for p in self.picks)


@dataclass(frozen=True)
class Stability:
    """Every method's stability over ``resamples`` bootstrap resamples drawn with ``seed``."""

    methods: dict[str, MethodStability]
    seed: int
    resamples: int
    sizes: dict[str, int]
    positions: tuple[int, ...]
    position_labels: tuple[str, ...]
    mode: Mode
    model_id: str
    seconds: dict[str, float]  # setup (shared work), resamples (their sum), per_resample (mean)

    @property
    def n_layers(self) -> int:
        return int(next(iter(self.methods.values())).frequency.shape[1])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the record (``<path>.safetensors`` + ``<path>.json``); returns the JSON path."""
        tensors: dict[str, Tensor] = {}
        methods: dict[str, Any] = {}
        for name, m in self.methods.items():
            tensors[f"{name}.frequency"] = m.frequency
            tensors[f"{name}.directions"] = m.directions
            methods[name] = {
                "picks": [None if p is None else list(p) for p in m.picks],
                "modal": None if m.modal is None else list(m.modal),
                "modal_share": m.modal_share.to_dict(),
                "mean_cosine": None if math.isnan(m.mean_cosine) else m.mean_cosine,
            }
        meta = {
            "methods": methods,
            "seed": self.seed,
            "resamples": self.resamples,
            "sizes": self.sizes,
            "positions": list(self.positions),
            "position_labels": list(self.position_labels),
            "mode": self.mode,
            "model_id": self.model_id,
            "seconds": self.seconds,
        }
        return save_record(path, KIND, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Stability:
        t, meta = load_record(path, KIND)
        methods = {}
        for name, m in meta["methods"].items():
            cosine = m["mean_cosine"]
            methods[name] = MethodStability(
                name,
                tuple(None if p is None else (int(p[0]), int(p[1])) for p in m["picks"]),
                t[f"{name}.frequency"],
                t[f"{name}.directions"],
                None if m["modal"] is None else (int(m["modal"][0]), int(m["modal"][1])),
                Rate.from_dict(m["modal_share"]),
                math.nan if cosine is None else float(cosine),
            )
        return cls(
            methods,
            int(meta["seed"]),
            int(meta["resamples"]),
            {k: int(v) for k, v in meta["sizes"].items()},
            tuple(meta["positions"]),
            tuple(meta["position_labels"]),
            meta["mode"],
            str(meta["model_id"]),
            {k: float(v) for k, v in meta["seconds"].items()},
        )


KIND = "cosmic_tl.Stability"


def mean_pairwise_cosine(directions: Float[Tensor, "n d_model"]) -> float:
    """Mean cosine over all pairs of rows (float64); NaN for fewer than two rows."""
    if directions.shape[0] < 2:
        return math.nan
    unit = directions.double() / directions.double().norm(dim=-1, keepdim=True)
    gram = unit @ unit.T
    n = gram.shape[0]
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def method_stability(
    method: str,
    picks: Sequence[Pick | None],
    directions: Sequence[Tensor | None],
    positions: tuple[int, ...],
    n_layers: int,
    d_model: int,
) -> MethodStability:
    """Frequency grid, modal cell with its share and the directions' spread of ``picks``."""
    if len(picks) != len(directions) or not picks:
        raise ValueError("need one direction (or None) per pick, and at least one resample")
    freq = torch.zeros(len(positions), n_layers, dtype=torch.float64)
    rows = torch.full((len(picks), d_model), math.nan, dtype=torch.float64)
    for b, (pick, direction) in enumerate(zip(picks, directions, strict=True)):
        if pick is None or direction is None:
            continue
        freq[positions.index(pick[0]), pick[1]] += 1
        rows[b] = direction.double()
    modal: Pick | None = None
    k = 0
    if float(freq.max()) > 0:
        flat = int(torch.argmax(freq.flatten()))  # the first maximum: lowest position, layer
        i, layer = divmod(flat, n_layers)
        modal, k = (positions[i], layer), int(freq[i, layer])
    found = rows[~torch.isnan(rows).any(-1)]
    return MethodStability(
        method,
        tuple(picks),
        freq,
        rows,
        modal,
        Rate.of(k, len(picks)),
        mean_pairwise_cosine(found),
    )


def _selected(method: str, scores: Any, settings: SelectionSettings, cands: Candidates) -> Selection:
    try:
        return SELECT[method](scores, settings, cands)
    except NoCandidateError as err:
        return err.selection


def _counts(indices: Sequence[int], n: int) -> Tensor:
    return torch.bincount(torch.as_tensor(list(indices), dtype=torch.long), minlength=n).double()


class Bootstrap:
    """The work every resample shares, done once; then one resample at a time.

    Built from the run's four prompt sets (``Prompts`` formatted with the run's system
    prompt, or plain strings) and the scoring settings of
    :func:`~cosmic_tl.planner.score_candidates`. ``baselines`` are the methods beside
    COSMIC; with ``prompt_filter`` Arditi's baseline works on the filter's kept prompts,
    as in a run with ``--filter-prompts``. ``share_val_caches``: see :meth:`_val_runner`.
    """

    def __init__(
        self,
        model: Any,
        harmful_train: Sequence[str] | Prompts,
        harmless_train: Sequence[str] | Prompts,
        harmful_val: Sequence[str] | Prompts,
        harmless_val: Sequence[str] | Prompts,
        *,
        seed: int = 0,
        mode: Mode = "ace",
        alpha: float = 1.0,
        settings: SelectionSettings | None = None,
        baselines: Sequence[str] = ("refusal_tokens",),
        refusal_tokens: Sequence[str] | None = None,
        prompt_filter: PromptFilter | None = None,
        full: bool = False,
        batch_size: int = 32,
        reuse_prefix: bool = True,
        share_prefix: bool = True,
        inplace_addition: bool = False,
        placement: Placement = "residual",
        progress: bool = True,
        share_val_caches: bool = False,
    ) -> None:
        start = time.perf_counter()
        self.seed, self.settings = seed, settings or SelectionSettings()
        self.methods: tuple[str, ...] = ("cosmic", *dict.fromkeys(baselines))
        self.filter = prompt_filter if "refusal_tokens" in self.methods else None
        self.score_kw: dict[str, Any] = {
            "mode": mode,
            "alpha": alpha,
            "settings": self.settings,
            "full": full,
            "inplace_addition": inplace_addition,
            "placement": placement,
            "progress": progress,
        }
        self.train: TrainActivations = train_activations(
            model, harmful_train, harmless_train, batch_size=batch_size, progress=progress
        )
        hv, lv = prompts_for(model, harmful_val), prompts_for(model, harmless_val)
        self.model, self.val = model, {"harmful_val": hv, "harmless_val": lv}
        self.runner_kw: dict[str, Any] = {
            "batch_size": batch_size,
            "reuse_prefix": reuse_prefix,
            "share_prefix": share_prefix,
        }
        self.shared: dict[str, Runner] = {}
        if share_val_caches:
            self.shared = {name: Runner(model, p, **self.runner_kw) for name, p in self.val.items()}
        self.refusal_tokens = resolve_refusal_tokens(model, refusal_tokens, hv, lv, batch_size)
        self.sizes = {
            "harmful_train": len(self.train.harmful),
            "harmless_train": len(self.train.harmless),
            "harmful_val": len(hv),
            "harmless_val": len(lv),
        }
        if self.filter is not None:
            bad = [n for n in SETS if any(not 0 <= i < self.sizes[n] for i in self.filter.kept[n])]
            if bad:
                raise ValueError(f"the prompt filter's kept indices of {bad[0]} are out of range")
        self.d_model = int(model.cfg.d_model)
        self.setup_seconds = time.perf_counter() - start

    def indices(self, resample: int) -> dict[str, tuple[int, ...]]:
        """Resample ``resample``'s draw (:func:`resample_indices` with this seed)."""
        return resample_indices(self.sizes, self.seed, resample)

    def _run(
        self, indices: Mapping[str, Sequence[int]], baselines: tuple[str, ...], tokens: Sequence[str]
    ) -> tuple[dict[str, Selection], dict[str, float]]:
        cands = self.train.candidates(
            _counts(indices["harmful_train"], self.sizes["harmful_train"]),
            _counts(indices["harmless_train"], self.sizes["harmless_train"]),
        )
        scores = score_runners(
            cands,
            self._val_runner("harmful_val", indices["harmful_val"]),
            self._val_runner("harmless_val", indices["harmless_val"]),
            refusal_tokens=tokens,
            baseline=baselines,
            **self.score_kw,
        )
        picked = ("cosmic", *baselines)
        return {m: _selected(m, scores, self.settings, cands) for m in picked}, scores.stats

    def _val_runner(self, name: str, index: Sequence[int]) -> Runner:
        """A runner on the val set ``name`` drawn as ``index``.

        With ``share_val_caches`` a view of the runner built once on the whole set (no
        clean pass, but every intervened pass also runs the prompts drawn zero times);
        otherwise a runner on the distinct drawn prompts, viewed with their counts (one
        clean pass per resample, each intervened pass over about 63% of the prompts).
        """
        if name in self.shared:
            return self.shared[name].resampled(index)
        distinct = sorted(set(index))
        where = {i: k for k, i in enumerate(distinct)}
        runner = Runner(self.model, self.val[name].subset(distinct), **self.runner_kw)
        return runner.resampled([where[i] for i in index])

    def selections(self, indices: Mapping[str, Sequence[int]]) -> dict[str, Selection]:
        """Every method's selection on the prompts drawn as ``indices`` (per set).

        A method is missing when the prompt filter keeps none of a set's drawn prompts.
        """
        return self._selections(indices)[0]

    def _selections(
        self, indices: Mapping[str, Sequence[int]]
    ) -> tuple[dict[str, Selection], dict[str, float]]:
        filtered = self.filter is not None
        main = tuple(m for m in self.methods[1:] if not (filtered and m == "refusal_tokens"))
        out, stats = self._run(indices, main, self.refusal_tokens)
        out = {m: s for m, s in out.items() if m in ("cosmic", *main)}
        if self.filter is not None:
            kept = {n: [i for i in indices[n] if i in self.filter.kept[n]] for n in SETS}
            if all(kept.values()):
                base, more = self._run(kept, ("refusal_tokens",), self.filter.refusal_tokens)
                out["refusal_tokens"] = base["refusal_tokens"]
                stats = {k: stats.get(k, 0.0) + v for k, v in more.items()}
        return out, stats

    def resample(self, resample: int, key: str = "") -> Resample:
        """Draw resample ``resample`` and make every method's pick on it."""
        start = time.perf_counter()
        indices = self.indices(resample)
        sel, stats = self._selections(indices)
        picks: dict[str, Pick | None] = {}
        directions: dict[str, Tensor] = {}
        messages: dict[str, str] = {}
        for method in self.methods:
            s = sel.get(method)
            if s is None:
                picks[method] = None
                messages[method] = f"{method}: the prompt filter kept none of a set's drawn prompts"
                continue
            picks[method], messages[method] = s.pick, s.message
            if s.direction is not None:
                directions[method] = s.direction
        seconds = time.perf_counter() - start
        return Resample(resample, indices, picks, directions, messages, seconds, stats, key)

    def summary(self, resamples: Sequence[Resample]) -> Stability:
        """The :class:`Stability` of these resamples (in the order given)."""
        if not resamples:
            raise ValueError("need at least one resample")
        positions = self.train.eoi.positions
        n_layers = int(self.train.harmful.eval.shape[1])
        methods = {
            m: method_stability(
                m,
                [r.picks.get(m) for r in resamples],
                [r.directions.get(m) for r in resamples],
                positions,
                n_layers,
                self.d_model,
            )
            for m in self.methods
        }
        total = sum(r.seconds for r in resamples)
        return Stability(
            methods,
            self.seed,
            len(resamples),
            dict(self.sizes),
            positions,
            self.train.eoi.labels,
            self.score_kw["mode"],
            self.train.model_id,
            {
                "setup": self.setup_seconds,
                "resamples": total,
                "per_resample": total / len(resamples),
            },
        )


def stability(
    model: Any,
    harmful_train: Sequence[str] | Prompts,
    harmless_train: Sequence[str] | Prompts,
    harmful_val: Sequence[str] | Prompts,
    harmless_val: Sequence[str] | Prompts,
    *,
    resamples: int = 10,
    seed: int = 0,
    on_resample: Callable[[Resample], None] | None = None,
    **settings: Any,
) -> Stability:
    """Selection repeated over ``resamples`` bootstrap resamples of the four prompt sets.

    ``settings`` are :class:`Bootstrap`'s (``mode``, ``alpha``, ``baselines``,
    ``refusal_tokens``, ``batch_size``, ...); ``on_resample`` is called with each finished
    resample.

    >>> st = stability(model, h_tr, l_tr, h_val, l_val, resamples=10, seed=0)  # doctest: +SKIP
    >>> st.methods["cosmic"].modal, st.methods["cosmic"].modal_share             # doctest: +SKIP
    """
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a whole number of at least 1, not {resamples!r}")
    boot = Bootstrap(
        model, harmful_train, harmless_train, harmful_val, harmless_val, seed=seed, **settings
    )
    done = []
    for b in range(resamples):
        done.append(boot.resample(b))
        if on_resample is not None:
            on_resample(done[-1])
    return boot.summary(done)
