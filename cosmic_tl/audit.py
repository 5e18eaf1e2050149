"""The behavioural audit: many candidates evaluated by generation, beside each method's proxy.

COSMIC and the refusal-token baselines rank every candidate by a proxy (cosine scores,
refusal-token log-odds) and evaluation measures only the pick. :func:`audit` evaluates a
set of candidates the way evaluation measures a pick, on the test prompts:

- each method's top ``k`` by its own ranking score over every scored candidate, whether
  a filter removed it or not (each labelled with that filter), the methods' picks, and
  ``stratified`` more drawn across positions and layers;
- per candidate: the attack success rate with the direction ablated (harmful prompts),
  the induced refusal rate with it added (harmless prompts), both with Wilson
  intervals; the KL of the next-token distribution at the end of the harmless prompts
  under ablation; and the capability damage: the cross-entropy of the model's own
  clean greedy answers to the harmless prompts under ablation minus clean, per token.
  KL and cross-entropy are means over prompts with seeded bootstrap intervals.

The *behaviour* a candidate is ranked by is the mean of its attack success rate and its
induced refusal rate (1 = removing it always unlocks, adding it always refuses). Per
method (:class:`MethodAudit`): the pick's behaviour, the best audited candidate's
(overall and among those passing the method's filters), the regret ``best − pick``,
which filter removed the best one, and the Spearman correlation of the proxy (oriented
so that higher means better) with behaviour over the audited candidates. ::

    result = audit(model, selections, scores, candidates, harmful_test, harmless_test,
                   judge=SubstringJudge())
    result.methods["cosmic"].regret

Generation is batched across candidates: candidates are stacked along the batch, each
block of rows under its own intervention (:func:`~cosmic_tl.interventions.row_hooks`).
With ``checkpoint`` (a directory), every finished group of candidates is written there
atomically, so a killed audit resumes without redoing it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from cosmic_tl.activations import last_logits_only
from cosmic_tl.candidates import Candidates
from cosmic_tl.config import Placement, SelectionSettings
from cosmic_tl.evaluation import (
    Judge,
    Rate,
    attack_success_rate,
    greedy_tokens,
    refusal_rate,
    stop_token_ids,
)
from cosmic_tl.interventions import Intervention, Kind, Rows, intervene_rows
from cosmic_tl.models.boot import model_id
from cosmic_tl.scoring import Scores, kl_divergence
from cosmic_tl.selection import KEPT, METHODS, Cell, Selection, filter_reasons, ranking_grid
from cosmic_tl.store import load_record, read_json, save_record, write_json
from cosmic_tl.templates import Prompts, prompts_for

KIND = "cosmic_tl.Audit"
FORMAT = 1  # bump when the checkpoint files change meaning
BEHAVIOUR = "(attack success rate under ablation + induced refusal rate under addition) / 2"
COLUMNS = ("behaviour", "asr", "induced", "kl", "ce")  # the record's tensor columns
STRATIFIED = "stratified"
BOOTSTRAP = 1000

Position = tuple[int, int]  # (position, layer) as the user sees it


# ---------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` prompts with a 95% interval (seeded bootstrap percentiles)."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"mean": _num(self.mean), "low": _num(self.low), "high": _num(self.high), "n": self.n}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Estimate:
        return cls(_float(d["mean"]), _float(d["low"]), _float(d["high"]), int(d["n"]))

    def __str__(self) -> str:
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]"


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def _float(x: float | None) -> float:
    return math.nan if x is None else float(x)


def bootstrap_mean(
    values: Float[Tensor, " n"], *, seed: int = 0, resamples: int = BOOTSTRAP
) -> Estimate:
    """The mean of ``values`` with a 95% percentile-bootstrap interval (seeded).

    NaN for an empty input; a single value has a zero-width interval.
    """
    x = values.double().flatten()
    n = int(x.numel())
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=gen)
    means = x[idx].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return Estimate(float(x.mean()), float(low), float(high), n)


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties given the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties → average ranks); None for fewer than 3 pairs or
    when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} x values but {len(y)} y values")
    if len(x) < 3:
        return None
    rx, ry = np.array(average_ranks(x)), np.array(average_ranks(y))
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return None if denom == 0 else float((dx * dy).sum() / denom)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Behaviour:
    """What one candidate (or no intervention) does on the test prompts."""

    asr: Rate  # harmful prompts, ablated: share not refused
    induced: Rate  # harmless prompts, added: share refused
    kl: Estimate  # KL(clean ‖ ablated) at the end of the harmless prompts
    ce: Estimate  # cross-entropy of the clean harmless answers, ablated − clean (nats/token)

    @property
    def score(self) -> float:
        """The behaviour candidates are ranked by: mean of ASR and induced refusal."""
        return (self.asr.rate + self.induced.rate) / 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": _num(self.score),
            "asr": self.asr.to_dict(),
            "induced": self.induced.to_dict(),
            "kl": self.kl.to_dict(),
            "ce": self.ce.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Behaviour:
        return cls(
            Rate.from_dict(d["asr"]),
            Rate.from_dict(d["induced"]),
            Estimate.from_dict(d["kl"]),
            Estimate.from_dict(d["ce"]),
        )


@dataclass(frozen=True)
class AuditRow:
    """One audited candidate: why it was chosen, each method's proxy and filter, its behaviour.

    ``source`` names the method whose candidate set the direction comes from (methods
    that share a set share its rows; Arditi's baseline on filtered prompts has its own).
    """

    source: str
    position: int
    layer: int
    labels: tuple[str, ...]  # "cosmic#1" (its rank under that method), "pick:cosmic", "stratified"
    proxy: dict[str, float | None]  # method → its ranking value (None: not scored)
    reasons: dict[str, str]  # method → the filter that removes it ("" = kept)
    behaviour: Behaviour

    @property
    def cell(self) -> Position:
        return (self.position, self.layer)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "position": self.position,
            "layer": self.layer,
            "labels": list(self.labels),
            "proxy": self.proxy,
            "reasons": self.reasons,
            "behaviour": self.behaviour.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditRow:
        return cls(
            d["source"],
            int(d["position"]),
            int(d["layer"]),
            tuple(d["labels"]),
            dict(d["proxy"]),
            dict(d["reasons"]),
            Behaviour.from_dict(d["behaviour"]),
        )


@dataclass(frozen=True)
class MethodAudit:
    """One method's pick against the best audited candidates of its candidate set.

    Scores are behaviours (:attr:`Behaviour.score`); ``regret = best − pick`` and
    ``regret_kept = best_kept − pick``. ``best_removed_by`` is the filter that removed the
    best candidate (``""``: none did). None where there is no pick or nothing audited.
    """

    method: str
    pick: Position | None
    message: str
    pick_score: float | None
    best: Position | None
    best_score: float | None
    best_kept: Position | None
    best_kept_score: float | None
    regret: float | None
    regret_kept: float | None
    best_removed_by: str | None
    spearman: float | None
    n_audited: int
    n_spearman: int
    # candidates with a ranking score (top-K ranks among these; lazy scoring skips some)
    n_ranked: int = -1
    n_candidates: int = -1

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for name in ("pick", "best", "best_kept"):
            out[name] = list(out[name]) if out[name] is not None else None
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MethodAudit:
        d = dict(d)
        for name in ("pick", "best", "best_kept"):
            d[name] = (int(d[name][0]), int(d[name][1])) if d[name] is not None else None
        return cls(**{k: v for k, v in d.items() if k in _METHOD_FIELDS})


_METHOD_FIELDS = set(MethodAudit.__dataclass_fields__)


@dataclass(frozen=True)
class Audit:
    """The audit of a run: every audited candidate and each method's summary.

    ``clean`` is the behaviour of doing nothing (ASR and refusal without intervention;
    KL and cross-entropy differences are zero by definition).
    """

    rows: tuple[AuditRow, ...]
    methods: dict[str, MethodAudit]
    clean: Behaviour
    positions: tuple[int, ...]
    position_labels: tuple[str, ...]
    n_layers: int
    model_id: str
    mode: str
    settings: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    def rows_of(self, method: str) -> list[AuditRow]:
        """The rows of ``method``'s candidate set."""
        return [r for r in self.rows if method in r.reasons]

    def row(self, cell: Position, source: str | None = None) -> AuditRow:
        """The row of ``cell`` (in ``source``'s candidate set, default the first that has it)."""
        for r in self.rows:
            if r.cell == tuple(cell) and (source is None or r.source == source):
                return r
        raise KeyError(f"candidate {cell} was not audited")

    def save(self, path: str | os.PathLike[str]) -> Path:
        table = torch.tensor(
            [
                [r.behaviour.score, r.behaviour.asr.rate, r.behaviour.induced.rate]
                + [r.behaviour.kl.mean, r.behaviour.ce.mean]
                for r in self.rows
            ],
            dtype=torch.float64,
        ).reshape(len(self.rows), len(COLUMNS))
        meta = {
            "columns": list(COLUMNS),
            "behaviour": BEHAVIOUR,
            "rows": [r.to_dict() for r in self.rows],
            "methods": {m: s.to_dict() for m, s in self.methods.items()},
            "clean": self.clean.to_dict(),
            "positions": list(self.positions),
            "position_labels": list(self.position_labels),
            "n_layers": self.n_layers,
            "model_id": self.model_id,
            "mode": self.mode,
            "settings": self.settings,
            "stats": self.stats,
        }
        return save_record(path, KIND, {"table": table}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Audit:
        _, meta = load_record(path, KIND)
        return cls(
            tuple(AuditRow.from_dict(r) for r in meta["rows"]),
            {m: MethodAudit.from_dict(s) for m, s in meta["methods"].items()},
            Behaviour.from_dict(meta["clean"]),
            tuple(meta["positions"]),
            tuple(meta["position_labels"]),
            int(meta["n_layers"]),
            meta["model_id"],
            meta["mode"],
            dict(meta.get("settings", {})),
            dict(meta.get("stats", {})),
        )


# ---------------------------------------------------------------- which candidates


@dataclass(frozen=True)
class Planned:
    """A candidate to audit: its set, its grid cell ``(pos index, layer)`` and its labels."""

    source: str
    index: Cell
    labels: tuple[str, ...]


def _value(grid: Tensor, cell: Cell) -> float | None:
    v = float(grid[cell])
    return None if math.isnan(v) else v


def top_cells(scores: Scores, method: str, k: int) -> list[Cell]:
    """``method``'s best ``k`` cells by its own ranking score over every scored cell,
    filtered or not (ties broken by position, then layer)."""
    grid = ranking_grid(scores, method)
    sign = -1.0 if method == "cosmic" else 1.0
    cells = [
        (i, j)
        for i in range(grid.shape[0])
        for j in range(grid.shape[1])
        if _value(grid, (i, j)) is not None
    ]
    return sorted(cells, key=lambda c: (sign * float(grid[c]), c))[:k]


def stratified_cells(shape: tuple[int, int], n: int, exclude: set[Cell], seed: int) -> list[Cell]:
    """``n`` cells spread over layers (equal bins, cycled) and positions (a shuffled
    cycle), drawn with ``seed`` among the cells not in ``exclude``."""
    n_pos, n_layers = shape
    rng = random.Random(seed)
    left = {(i, j) for i in range(n_pos) for j in range(n_layers)} - set(exclude)
    bins = [list(b) for b in np.array_split(np.arange(n_layers), min(max(n, 1), n_layers))]
    order = rng.sample(range(n_pos), n_pos)
    out: list[Cell] = []
    for t in range(n):
        if not left:
            break
        layers = {int(j) for j in bins[t % len(bins)]}
        pos = order[t % n_pos]
        for pool in (
            [c for c in left if c[1] in layers and c[0] == pos],
            [c for c in left if c[1] in layers],
            list(left),
        ):
            if pool:
                cell = rng.choice(sorted(pool))
                out.append(cell)
                left.discard(cell)
                break
    return out


def _same(a: Candidates, b: Candidates) -> bool:
    return a is b or (
        a.directions.shape == b.directions.shape and torch.equal(a.directions, b.directions)
    )


def candidate_sources(candidates: Mapping[str, Candidates]) -> dict[str, str]:
    """Each method's candidate set, named by the first method (in ``METHODS`` order) that
    uses the same set."""
    names = [m for m in METHODS if m in candidates]
    return {m: next(s for s in names if _same(candidates[s], candidates[m])) for m in names}


def plan(
    selections: Mapping[str, Selection],
    scores: Mapping[str, Scores],
    sources: Mapping[str, str],
    *,
    k: int,
    stratified: int,
    seed: int,
) -> list[Planned]:
    """The candidates to audit, in a fixed order: each method's top ``k``, the picks, then
    the stratified sample (from COSMIC's candidate set, or the first method's)."""
    labels: dict[tuple[str, Cell], list[str]] = {}
    for method in selections:
        for rank, cell in enumerate(top_cells(scores[method], method, k), 1):
            labels.setdefault((sources[method], cell), []).append(f"{method}#{rank}")
    for method, sel in selections.items():
        if sel.pick is not None:
            cell = (sel.positions.index(sel.pick[0]), sel.pick[1])
            labels.setdefault((sources[method], cell), []).append(f"pick:{method}")
    first = "cosmic" if "cosmic" in selections else next(iter(selections))
    shape = tuple(scores[first].grids[next(iter(scores[first].grids))].shape)
    taken = {c for s, c in labels if s == sources[first]}
    for cell in stratified_cells((shape[0], shape[1]), stratified, taken, seed):
        labels[(sources[first], cell)] = [STRATIFIED]
    return [Planned(s, c, tuple(v)) for (s, c), v in labels.items()]


# ---------------------------------------------------------------- summary


def _best(rows: Sequence[AuditRow], method: str) -> AuditRow | None:
    """The row of highest behaviour; ties: a kept candidate first (so that "removed by"
    does not blame a filter for a tie), then grid order."""
    scored = [r for r in rows if not math.isnan(r.behaviour.score)]
    return min(
        scored,
        key=lambda r: (-r.behaviour.score, r.reasons[method] != KEPT, r.cell),
        default=None,
    )


def summarise(rows: Sequence[AuditRow], selections: Mapping[str, Selection]) -> dict[str, MethodAudit]:
    """Per method: its pick's behaviour against the best audited candidates of its set."""
    return {m: summarise_method(rows, m, sel) for m, sel in selections.items()}


def summarise_method(rows: Sequence[AuditRow], method: str, selection: Selection) -> MethodAudit:
    """One method's :class:`MethodAudit` over the rows of its candidate set."""
    mine = [r for r in rows if method in r.reasons]
    pick = selection.pick
    pick_row = next((r for r in mine if r.cell == pick), None) if pick is not None else None
    pick_score = pick_row.behaviour.score if pick_row is not None else None
    top = _best(mine, method)
    kept = _best([r for r in mine if r.reasons[method] == KEPT], method)
    pairs = [
        (_oriented(method, r.proxy[method]), r.behaviour.score)
        for r in mine
        if r.proxy.get(method) is not None and not math.isnan(r.behaviour.score)
    ]
    regret = regret_kept = None
    if pick_score is not None:
        regret = top.behaviour.score - pick_score if top else None
        regret_kept = kept.behaviour.score - pick_score if kept else None
    return MethodAudit(
        method,
        pick,
        selection.message,
        pick_score,
        top.cell if top else None,
        top.behaviour.score if top else None,
        kept.cell if kept else None,
        kept.behaviour.score if kept else None,
        regret,
        regret_kept,
        top.reasons[method] if top else None,
        spearman([p for p, _ in pairs], [b for _, b in pairs]),
        len(mine),
        len(pairs),
    )


def _oriented(method: str, value: float | None) -> float:
    """A method's proxy with higher meaning better (the baselines minimise ``bypass``)."""
    assert value is not None
    return value if method == "cosmic" else -value


# ---------------------------------------------------------------- generation


LOGIT_BYTES = 2**31  # at most this much float32 logits in one teacher-forced batch


def _stacked_batches(prompts: Prompts, n_groups: int, max_rows: int) -> list[tuple[Any, int]]:
    """Length-sorted prompt batches small enough that ``n_groups`` copies fit in ``max_rows``."""
    per = max(1, max_rows // max(n_groups, 1))
    return [(b, len(b.index)) for b in prompts.batches(per)]


def generate_rows(
    model: Any,
    prompts: Prompts,
    interventions: Sequence[Intervention | None],
    *,
    max_new_tokens: int,
    max_rows: int,
) -> list[list[list[int]]]:
    """Greedy answers ``[intervention][prompt] → tokens`` (up to the first stop token, which
    is kept if one was generated), every intervention's rows in one batch where they fit."""
    stops = stop_token_ids(model)
    out: list[list[list[int]]] = [[[] for _ in prompts.ids] for _ in interventions]
    device = next(model.parameters()).device
    for batch, n in _stacked_batches(prompts, len(interventions), max_rows):
        g = len(interventions)
        groups: list[Rows] = [(iv, n) for iv in interventions]
        with intervene_rows(model, groups):
            new = greedy_tokens(
                model,
                batch.tokens.repeat(g, 1).to(device),
                batch.attention_mask.repeat(g, 1).to(device),
                max_new_tokens=max_new_tokens,
                stop_ids=stops,
            )
        for c in range(g):
            for row, i in zip(new[c * n : (c + 1) * n], batch.index, strict=True):
                ids = row.tolist()
                end = next((t for t, x in enumerate(ids) if x in stops), None)
                out[c][i] = ids if end is None else ids[: end + 1]
    return out


@torch.no_grad()
def answer_scores(
    model: Any,
    prompts: Prompts,
    answers: Sequence[Sequence[int]],
    interventions: Sequence[Intervention | None],
    *,
    max_rows: int,
) -> tuple[Float[Tensor, "iv prompt"], Float[Tensor, "iv prompt d_vocab"]]:
    """Teacher-forced ``answers`` after ``prompts`` under each intervention: the mean
    cross-entropy per answer token ``[iv, prompt]`` and the logits that predict the first
    answer token ``[iv, prompt, d_vocab]``. Only the answer positions are unembedded
    where the model allows it."""
    if len(answers) != len(prompts) or any(len(a) == 0 for a in answers):
        raise ValueError("one non-empty answer per prompt")
    g = len(interventions)
    ce = torch.zeros(g, len(prompts), dtype=torch.float64)
    first: Tensor | None = None
    device = next(model.parameters()).device
    joined = Prompts(
        prompts.instructions,
        tuple(tuple(p) + tuple(a) for p, a in zip(prompts.ids, answers, strict=True)),
        prompts.system,
        prompts.pad_id,
    )
    keep = last_logits_only(model)
    # The logits of one stacked batch hold (longest answer + 1) rows of d_vocab per row:
    # with Gemma's 262k vocabulary, 64 rows of 48-token answers would be 3.3 GB.
    longest = (
        max(len(a) for a in answers) + 1
        if keep
        else max(len(p) + len(a) for p, a in zip(prompts.ids, answers, strict=True))
    )
    fit = max(g, LOGIT_BYTES // (4 * longest * model.cfg.d_vocab))
    for batch, n in _stacked_batches(joined, g, min(max_rows, fit)):
        m = max(len(answers[i]) for i in batch.index)
        kw = {"logits_to_keep": m + 1} if keep else {}
        with intervene_rows(model, [(iv, n) for iv in interventions]):
            logits = model(
                batch.tokens.repeat(g, 1).to(device),
                attention_mask=batch.attention_mask.repeat(g, 1).to(device),
                **kw,
            )
        logits = logits[:, -(m + 1) :].float().cpu()
        if first is None:
            first = torch.empty(g, len(prompts), logits.shape[-1])
        for c in range(g):
            for r, i in enumerate(batch.index):
                a = torch.tensor(answers[i])
                rows = logits[c * n + r, m - len(a) : m]
                logp = torch.log_softmax(rows.double(), -1)
                ce[c, i] = -logp[torch.arange(len(a)), a].mean()
                first[c, i] = rows[0]
    assert first is not None
    return ce, first


# ---------------------------------------------------------------- the audit


def _intervention(
    cands: Candidates, scores: Scores, cell: Cell, kind: Kind, placement: Placement
) -> Intervention:
    position = cands.positions[cell[0]]
    ref = cands.reference(position, cell[1]).float() if scores.mode == "ace" else None
    return Intervention(
        kind,
        scores.mode,
        cands.direction(position, cell[1]).float(),
        layer=cell[1],
        reference=ref,
        alpha=scores.alpha,
        placement=placement,
    )


class _Checkpoint:
    """Finished pieces of an audit, one JSON file each, valid only under one key."""

    def __init__(self, root: Path | None, key: str) -> None:
        self.root, self.key = root, key

    def get(self, name: str, what: Any) -> Any | None:
        if self.root is None or not (self.root / f"{name}.json").is_file():
            return None
        try:
            data = read_json(self.root / f"{name}.json")
        except ValueError:
            return None
        if data.get("key") != self.key or data.get("what") != what:
            return None
        return data["data"]

    def put(self, name: str, what: Any, data: Any) -> None:
        if self.root is not None:
            write_json(self.root / f"{name}.json", {"key": self.key, "what": what, "data": data})


def audit(
    model: Any,
    selections: Mapping[str, Selection],
    scores: Mapping[str, Scores],
    candidates: Mapping[str, Candidates],
    harmful: Sequence[str] | Prompts,
    harmless: Sequence[str] | Prompts,
    *,
    judge: Judge,
    settings: SelectionSettings | None = None,
    k: int = 8,
    stratified: int = 8,
    seed: int = 0,
    max_new_tokens: int = 48,
    max_rows: int = 32,
    placement: Placement = "residual",
    checkpoint: str | os.PathLike[str] | None = None,
    key: str = "",
    progress: bool = True,
    on_group: Callable[[int, int], None] | None = None,
) -> Audit:
    """Evaluate by generation the candidates :func:`plan` chooses; summarise per method.

    ``selections``, ``scores`` and ``candidates`` are keyed by method (a method's pick,
    the scores it ranked and the candidates its directions come from; a method's top K
    is taken among the cells that have its ranking score, so pass full grids, or
    :func:`cosmic_tl.planner.rank_all`'s, to rank every cell). ``harmful`` and
    ``harmless`` are the test prompts; ``judge`` decides refusals. Interventions use the
    scores' mode and alpha, as evaluation does. ``max_rows`` bounds the rows of one
    stacked batch (candidates × prompts). With ``checkpoint``, finished groups of
    candidates are kept in that directory under ``key`` and reused by a later call with
    the same key. ``on_group(done, total)`` is called after each group.
    """
    if not selections:
        raise ValueError("no selections to audit")
    missing = [m for m in selections if m not in scores or m not in candidates]
    if missing:
        raise ValueError(f"no scores or candidates for {missing}")
    if k < 0 or stratified < 0:
        raise ValueError(f"k and stratified must be at least 0, not {k} and {stratified}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, not {max_rows}")
    started = time.perf_counter()
    settings = settings or SelectionSettings()
    harmful, harmless = prompts_for(model, harmful), prompts_for(model, harmless)
    for m in selections:
        candidates[m].check_compatible(model)
    sources = candidate_sources({m: candidates[m] for m in selections})
    planned = plan(selections, scores, sources, k=k, stratified=stratified, seed=seed)
    store = _Checkpoint(Path(checkpoint) if checkpoint is not None else None, f"{FORMAT}:{key}")
    gen_kw = {"max_new_tokens": max_new_tokens, "max_rows": max_rows}

    # No intervention: the clean rates and the reference answers.
    clean = store.get("clean", len(harmful) + len(harmless))
    if clean is None:
        [h_ans] = generate_rows(model, harmful, [None], **gen_kw)
        [l_ans] = generate_rows(model, harmless, [None], **gen_kw)
        clean = {"harmful": h_ans, "harmless": l_ans}
        store.put("clean", len(harmful) + len(harmless), clean)
    answers = [a if a else [stop_token_ids(model)[0]] for a in clean["harmless"]]
    clean_ce, clean_first = answer_scores(model, harmless, answers, [None], max_rows=max_rows)
    decode = model.tokenizer.decode
    stops = set(stop_token_ids(model))

    def verdicts(prompts: Prompts, tokens: list[list[int]]) -> list[bool | None]:
        texts = [decode([t for t in row if t not in stops], skip_special_tokens=True) for row in tokens]
        return judge(list(prompts.instructions), texts)

    nothing = Estimate(0.0, 0.0, 0.0, len(harmless))
    clean_b = Behaviour(
        attack_success_rate(verdicts(harmful, clean["harmful"])),
        refusal_rate(verdicts(harmless, clean["harmless"])),
        nothing,
        nothing,
    )

    # A zero direction changes nothing: it behaves as no intervention, without generating.
    def zero(p: Planned) -> bool:
        return not bool(candidates[p.source].directions[p.index].any())

    live = [p for p in planned if not zero(p)]
    # The other candidates, in groups that share stacked batches.
    per_group = max(1, max_rows // max(len(harmful), len(harmless)))
    groups = [live[s : s + per_group] for s in range(0, len(live), per_group)]
    measured: dict[tuple[str, Cell], Behaviour] = {}
    evaluated = 0
    for g, group in enumerate(tqdm(groups, desc="audit", unit="group", disable=not progress)):
        what = [[p.source, list(p.index)] for p in group]
        done = store.get(f"group_{g:03d}", what)
        if done is None:
            done = _evaluate_group(
                model,
                group,
                scores,
                candidates,
                harmful,
                harmless,
                answers,
                clean_ce[0],
                clean_first[0],
                verdicts,
                placement=placement,
                seed=seed,
                **gen_kw,
            )
            store.put(f"group_{g:03d}", what, done)
            evaluated += len(group)
        for p, b in zip(group, done, strict=True):
            measured[(p.source, p.index)] = Behaviour.from_dict(b)
        if on_group is not None:
            on_group(g + 1, len(groups))
    behaviours = [measured.get((p.source, p.index), clean_b) for p in planned]

    grids = {m: ranking_grid(scores[m], m) for m in selections}
    fates = {m: filter_reasons(scores[m], m, settings) for m in selections}
    rows = []
    for p, b in zip(planned, behaviours, strict=True):
        users = [m for m in selections if sources[m] == p.source]
        proxy = {m: _value(grids[m], p.index) for m in users}
        reasons = {m: fates[m][p.index[0]][p.index[1]] for m in users}
        position = candidates[p.source].positions[p.index[0]]
        rows.append(AuditRow(p.source, position, p.index[1], p.labels, proxy, reasons, b))
    first = candidates[next(iter(sources.values()))]
    summary = {
        m: dataclasses.replace(
            s,
            n_ranked=int((~torch.isnan(grids[m])).sum()),
            n_candidates=int(grids[m].numel()),
        )
        for m, s in summarise(rows, selections).items()
    }
    return Audit(
        tuple(rows),
        summary,
        clean_b,
        first.positions,
        first.position_labels,
        first.n_layers,
        model_id(model),
        next(iter(scores.values())).mode,
        {
            "k": k,
            "stratified": stratified,
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "n_harmful": len(harmful),
            "n_harmless": len(harmless),
            "behaviour": BEHAVIOUR,
        },
        {
            "seconds": time.perf_counter() - started,
            "candidates": float(len(planned)),
            "evaluated": float(evaluated),
            "zero_directions": float(len(planned) - len(live)),
        },
    )


def _evaluate_group(
    model: Any,
    group: Sequence[Planned],
    scores: Mapping[str, Scores],
    candidates: Mapping[str, Candidates],
    harmful: Prompts,
    harmless: Prompts,
    answers: Sequence[Sequence[int]],
    clean_ce: Tensor,
    clean_first: Tensor,
    verdicts: Callable[[Prompts, list[list[int]]], list[bool | None]],
    *,
    placement: Placement,
    seed: int,
    max_new_tokens: int,
    max_rows: int,
) -> list[dict[str, Any]]:
    """Behaviour of each candidate of ``group``, as JSON-ready dicts."""
    ablate = [
        _intervention(candidates[p.source], scores[p.source], p.index, "ablate", placement)
        for p in group
    ]
    add = [
        _intervention(candidates[p.source], scores[p.source], p.index, "add", placement) for p in group
    ]
    kw = {"max_new_tokens": max_new_tokens, "max_rows": max_rows}
    h_ans = generate_rows(model, harmful, ablate, **kw)
    l_ans = generate_rows(model, harmless, add, **kw)
    ce, first = answer_scores(model, harmless, answers, ablate, max_rows=max_rows)
    out = []
    for c in range(len(group)):
        kl = kl_divergence(clean_first, first[c])
        out.append(
            Behaviour(
                attack_success_rate(verdicts(harmful, h_ans[c])),
                refusal_rate(verdicts(harmless, l_ans[c])),
                bootstrap_mean(kl, seed=seed),
                bootstrap_mean(ce[c] - clean_ce, seed=seed),
            ).to_dict()
        )
    return out
