"""The whole run as stages over a run directory: candidates → scores → select → evaluate → report.

This is the I/O edge of cosmic_tl: it loads prompts and models, calls the library, and
writes results into a :class:`~cosmic_tl.rundir.RunDir`. Each stage is reused when
its inputs are unchanged (see :mod:`cosmic_tl.rundir`). A pipeline holds the run
directory's lock from construction to :meth:`Pipeline.close`; use it as a context
manager::

    with Pipeline(cfg, "runs/demo") as pipe:
        pipe.run()
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cosmic_tl.audit import Audit, audit
from cosmic_tl.bootstrap import SETS as BOOTSTRAP_SETS
from cosmic_tl.bootstrap import Bootstrap, PromptFilter, Resample, Stability
from cosmic_tl.candidates import Candidates, compute_candidates
from cosmic_tl.comparison import compare
from cosmic_tl.config import Config, check_device, torch_dtype
from cosmic_tl.engine import Runner, clean_logits
from cosmic_tl.evaluation import (
    DEFAULT_REFUSAL_PHRASES,
    EvalResult,
    SubstringJudge,
    evaluate,
    save_completions,
)
from cosmic_tl.export import save_direction
from cosmic_tl.formats import TOKENIZER_TEMPLATE, published_format_for, use_prompt_format
from cosmic_tl.interventions import Kind
from cosmic_tl.models import (
    RECIPES,
    build_estimate,
    is_cached,
    load_model,
    model_id,
    organism_judge,
    resolve_spec,
)
from cosmic_tl.planner import rank_all, resolve_refusal_tokens, score_candidates, unranked
from cosmic_tl.prompts import (
    clean_prompts,
    load_prompts,
    prompts_sha256,
    reference_sample,
    sample_prompts,
)
from cosmic_tl.results import MethodMetrics, RunMetrics
from cosmic_tl.rundir import (
    RunDir,
    filtered_method,
    filtering,
    run_methods,
)
from cosmic_tl.scoring import Scores, encode_refusal_tokens, refusal_score
from cosmic_tl.selection import SELECT, NoCandidateError, Selection
from cosmic_tl.store import RecordError, read_json, write_json
from cosmic_tl.templates import Prompts, chat_prompts, context_length

log = logging.getLogger("cosmic_tl")

SETS = (
    "harmful_train",
    "harmless_train",
    "harmful_val",
    "harmless_val",
    "harmful_test",
    "harmless_test",
)
# Bump when a stage's files change format, so that older run directories redo it.
SCORES_FORMAT = 2  # 2: Arditi's grids with linear interventions in every mode, norm grid
SELECT_FORMAT = 3  # 3: one selection per method, comparison.json keyed by baseline
STABILITY_FORMAT = 1
AUDIT_FORMAT = 2  # 2: every method ranks all candidates (missing ranking scores computed)
AUDIT_ROWS = 128  # rows of one stacked audit batch (four candidates at the CPU preset's 32 prompts)


@dataclass(frozen=True)
class RunPrompts:
    """The six prompt lists of a run, sampled with the config's seed."""

    sets: dict[str, list[str]]

    def hash(self, *names: str) -> dict[str, str]:
        return {n: prompts_sha256(self.sets[n]) for n in names}

    def __getitem__(self, name: str) -> list[str]:
        return self.sets[name]


def load_run_prompts(cfg: Config) -> RunPrompts:
    """Load, clean and sample every prompt set named in ``cfg``.

    With ``sampling="reference"`` the four train and val sets are drawn as the published
    pipeline draws them (:func:`~cosmic_tl.prompts.reference_sample`: one seeded stream,
    from the sets as loaded, not cleaned); the test sets are sampled as usual.
    """
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    out = {}
    for name in SETS:
        split = name.split("_")[1]
        raw = load_prompts(getattr(cfg, name), split=split)
        if cfg.sampling == "reference" and split != "test":
            out[name] = list(raw)
        else:
            out[name] = sample_prompts(clean_prompts(raw), sizes[split], seed=cfg.seed)
    if cfg.sampling == "reference":
        names = ("harmful_train", "harmless_train", "harmful_val", "harmless_val")
        drawn = reference_sample(
            *(out[n] for n in names), n_train=cfg.n_train, n_val=cfg.n_val, seed=cfg.seed
        )
        out |= dict(zip(names, drawn, strict=True))
    return RunPrompts(out)


def run_judge(cfg: Config) -> SubstringJudge:
    """The substring judge of a run: an organism's own (:func:`organism_judge`), else the
    default phrases."""
    kind, name = resolve_spec(cfg.model)
    if kind == "alias" and name in RECIPES:
        return organism_judge(name)
    return SubstringJudge(DEFAULT_REFUSAL_PHRASES)


def filter_by_refusal_score(
    model: Any,
    harmful: Prompts,
    harmless: Prompts,
    token_ids: tuple[int, ...],
    batch_size: int,
    *,
    split: str = "val",
) -> tuple[Prompts, Prompts]:
    """Arditi's prompt filter: harmful prompts the model refuses (refusal log-odds > 0),
    harmless ones it answers (< 0), on the prompts as formatted (system prompt included)."""
    kept = []
    for prompts, sign in ((harmful, 1.0), (harmless, -1.0)):
        score = refusal_score(clean_logits(model, prompts, batch_size=batch_size), token_ids)
        kept.append(prompts.subset([i for i, s in enumerate(score.tolist()) if sign * s > 0]))
    if not len(kept[0]) or not len(kept[1]):
        raise ValueError(
            f"prompt filtering left {len(kept[0])} harmful and {len(kept[1])} harmless {split} "
            "prompts; the model does not refuse with these refusal tokens. Turn off --filter-prompts"
        )
    return kept[0], kept[1]


def _num(x: float | None) -> str:
    """A score for a progress line: three decimals, or "none"."""
    return "none" if x is None else f"{x:.3f}"


def _saved_resample(path: Path, key: str) -> Resample | None:
    """The resample saved at ``path`` if it was computed with ``key``, else None."""
    try:
        old = Resample.load(path)
    except (RecordError, OSError, ValueError, KeyError):
        return None
    return old if old.key == key else None


class Pipeline:
    """Runs (or resumes) the stages of one run directory, holding its lock."""

    def __init__(
        self,
        cfg: Config,
        out: str | Path,
        *,
        progress: bool = True,
        force: bool = False,
        say: Callable[[str], None] | None = None,
    ) -> None:
        check_device(cfg.device)
        self.cfg, self.progress = cfg, progress
        self.dir = RunDir(Path(out))
        self.say = say or log.info
        self.prompts = load_run_prompts(cfg)
        self.dir.acquire()
        try:
            self.dir.open(cfg, force=force)
        except BaseException:
            self.dir.release()
            raise
        self._model: Any = None
        self._chat: dict[str, Prompts] = {}
        self.keys: dict[str, str] = {}

    def close(self) -> None:
        """Release the run directory's lock."""
        self.dir.release()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def model(self) -> Any:
        if self._model is None:
            self._announce_build()
            self.say(f"loading model {self.cfg.model} ...")
            model = load_model(
                self.cfg.model,
                device=self.cfg.device,
                dtype=torch_dtype(self.cfg.dtype),
                progress=self.progress,
            )
            fmt: str = self.cfg.prompt_format
            if fmt == "auto":
                fmt = published_format_for(model_id(model))
            if fmt != TOKENIZER_TEMPLATE:
                self.say(f"prompt format: {fmt} (the published code's)")
                model.tokenizer = use_prompt_format(model.tokenizer, fmt)
            self._model = model
        return self._model

    def _announce_build(self) -> None:
        """Say so before a first use builds the run's model alias (which takes minutes)."""
        kind, name = resolve_spec(self.cfg.model)
        if kind == "alias" and not is_cached(name):
            estimate = build_estimate(name)
            self.say(
                f"model {name} is not built yet; building it first"
                + (f" ({estimate})" if estimate else "")
                + f"; see `cosmic-tl build {name}` ..."
            )

    def _format(self, instructions: list[str]) -> Prompts:
        """Instructions formatted with the run's system prompt, checked against the context."""
        return chat_prompts(
            self.model.tokenizer,
            instructions,
            system=self.cfg.system_prompt,
            max_len=context_length(self.model),
        )

    def chat(self, name: str) -> Prompts:
        """Prompt set ``name`` formatted (with the run's system prompt) and tokenised once."""
        if name not in self._chat:
            self._chat[name] = self._format(self.prompts[name])
        return self._chat[name]

    def _save_candidates(self, harmful: Prompts, harmless: Prompts, path: Path) -> None:
        compute_candidates(
            self.model, harmful, harmless, batch_size=self.cfg.batch_size, progress=self.progress
        ).save(path)

    def _stage(
        self, name: str, upstream: list[str], extra: Any, work: Callable[[], dict[str, Any] | None]
    ) -> bool:
        key = self.dir.stage_key(name, self.cfg, [self.keys[u] for u in upstream], extra)
        self.keys[name] = key
        outputs = self.dir.outputs(name, self.cfg)
        if self.dir.done(name, key, outputs):
            names = ", ".join(str(p.relative_to(self.dir.root)) for p in outputs)
            self.say(f"[{name}] up to date, reusing {names}")
            return False
        self.say(f"[{name}] running ...")
        start = time.perf_counter()
        info = work()
        self.dir.finish(name, key, time.perf_counter() - start, info)
        self.say(f"[{name}] done in {time.perf_counter() - start:.1f} s")
        return True

    # ------------------------------------------------------------------ stages
    def candidates(self) -> None:
        def work() -> None:
            train = self.chat("harmful_train"), self.chat("harmless_train")
            self._save_candidates(*train, self.dir.candidates())

        self._stage("candidates", [], self.prompts.hash("harmful_train", "harmless_train"), work)

    def filter(self) -> None:
        """Arditi's prompt filter on the train and val sets (only when it is enabled)."""
        cfg = self.cfg

        def work() -> dict[str, Any]:
            names = resolve_refusal_tokens(
                self.model,
                cfg.refusal_tokens,
                self.chat("harmful_val"),
                self.chat("harmless_val"),
                cfg.batch_size,
            )
            ids = encode_refusal_tokens(self.model.tokenizer, names)
            kept: dict[str, list[str]] = {}
            for split in ("train", "val"):
                h, l_ = self.chat(f"harmful_{split}"), self.chat(f"harmless_{split}")
                fh, fl = filter_by_refusal_score(self.model, h, l_, ids, cfg.batch_size, split=split)
                kept[f"harmful_{split}"], kept[f"harmless_{split}"] = (
                    list(fh.instructions),
                    list(fl.instructions),
                )
            write_json(self.dir.filtered_prompts, {"refusal_tokens": list(names), "sets": kept})
            return {"kept": {k: len(v) for k, v in kept.items()}}

        sets = ("harmful_train", "harmless_train", "harmful_val", "harmless_val")
        self._stage("filter", [], self.prompts.hash(*sets), work)

    def _filtered(self) -> tuple[tuple[str, ...], dict[str, Prompts]]:
        """The filter's refusal tokens and its kept prompts, formatted like the others."""
        data = read_json(self.dir.filtered_prompts)
        sets = {name: self._format(prompts) for name, prompts in data["sets"].items()}
        return tuple(data["refusal_tokens"]), sets

    def candidates_baseline(self) -> None:
        """Arditi's baseline's candidates, from the filtered training prompts."""
        self.filter()

        def work() -> None:
            _, sets = self._filtered()
            train = sets["harmful_train"], sets["harmless_train"]
            self._save_candidates(*train, self.dir.candidates(filtered=True))

        self._stage("candidates_baseline", ["filter"], None, work)

    def _scoring_settings(self) -> dict[str, Any]:
        """The run's scoring settings, as the planner and the bootstrap take them."""
        cfg = self.cfg
        return {
            "mode": cfg.mode,
            "alpha": cfg.alpha,
            "settings": cfg.selection,
            "full": cfg.full_grids,
            "batch_size": cfg.batch_size,
            "reuse_prefix": cfg.reuse_prefix,
            "share_prefix": cfg.share_prefix,
            "inplace_addition": cfg.inplace_addition,
            "placement": cfg.ablation_placement,
            "progress": self.progress,
        }

    def _score(
        self,
        cands: Candidates,
        harmful: Prompts,
        harmless: Prompts,
        baselines: tuple[str, ...],
        refusal_tokens: tuple[str, ...] | None,
    ) -> Scores:
        return score_candidates(
            self.model,
            cands,
            harmful,
            harmless,
            baseline=baselines,
            refusal_tokens=refusal_tokens,
            **self._scoring_settings(),
        )

    def scores(self) -> None:
        self.candidates()
        cfg = self.cfg
        upstream = ["candidates"]
        if filtering(cfg):
            self.candidates_baseline()
            upstream.append("candidates_baseline")

        def work() -> dict[str, Any]:
            cands = Candidates.load(self.dir.candidates(), self.model)
            hv, lv = self.chat("harmful_val"), self.chat("harmless_val")
            baselines = tuple(m for m in run_methods(cfg)[1:] if not filtered_method(m, cfg))
            s = self._score(cands, hv, lv, baselines, cfg.refusal_tokens)
            s.save(self.dir.scores())
            info: dict[str, Any] = {"gflop": s.stats.get("gflop")}
            if filtering(cfg):
                names, sets = self._filtered()
                fc = Candidates.load(self.dir.candidates(filtered=True), self.model)
                fh, fl = sets["harmful_val"], sets["harmless_val"]
                b = self._score(fc, fh, fl, ("refusal_tokens",), names)
                b.save(self.dir.scores(filtered=True))
                info["filtered_val"] = [len(fh), len(fl)]
            return info

        extra = {**self.prompts.hash("harmful_val", "harmless_val"), "format": SCORES_FORMAT}
        self._stage("scores", upstream, extra, work)

    def select(self) -> None:
        self.scores()

        def work() -> dict[str, Any]:
            cfg = self.cfg
            info: dict[str, Any] = {}
            picked: dict[str, Selection] = {}
            for method in run_methods(cfg):
                scores = Scores.load(self.dir.scores_for(method, cfg))
                cands = Candidates.load(self.dir.candidates_for(method, cfg))
                try:
                    sel = SELECT[method](scores, cfg.selection, cands)
                except NoCandidateError as err:
                    sel = err.selection
                sel.save(self.dir.selection(method))
                self.say(sel.message)
                for note in sel.notes:
                    self.say(f"note: {method}: {note}")
                for warning in sel.warnings:
                    self.say(f"warning: {method}: {warning}")
                picked[method] = sel
                info[method] = sel.pick
            cosmic = picked["cosmic"]
            comparison = {
                m: compare(cosmic, sel).to_dict() for m, sel in picked.items() if m != "cosmic"
            }
            write_json(self.dir.comparison, comparison)
            if cosmic.found:
                save_direction(self.dir.direction, cosmic, model=cfg.model, alpha=cfg.alpha)
            return info

        self._stage("select", ["scores"], {"format": SELECT_FORMAT}, work)

    def evaluate(self) -> None:
        self.select()

        judge = run_judge(self.cfg)

        def work() -> dict[str, Any]:
            metrics = self._evaluate(judge)
            metrics.save(self.dir.metrics)
            for warning in metrics.warnings:
                self.say(f"warning: {warning}")
            return {}

        self._stage(
            "evaluate",
            ["select"],
            {**self.prompts.hash("harmful_test", "harmless_test"), "judge": judge.phrases},
            work,
        )

    def _evaluate(self, judge: SubstringJudge) -> RunMetrics:
        cfg = self.cfg
        ht, lt = self.chat("harmful_test"), self.chat("harmless_test")

        def run(
            name: str, prompts: Prompts, sel: Selection | None = None, kind: Kind = "ablate"
        ) -> EvalResult:
            iv = (
                sel.intervention(kind, alpha=cfg.alpha, placement=cfg.ablation_placement)
                if sel is not None
                else None
            )
            res = evaluate(
                self.model,
                prompts,
                judge=judge,
                intervention=iv,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=min(cfg.batch_size, 16),
                progress=self.progress,
            )
            save_completions(self.dir.completions(name), res)
            return res

        harmful_clean = run("harmful_baseline", ht).rate
        harmless_clean = run("harmless_baseline", lt).rate
        methods: dict[str, MethodMetrics] = {}
        for method in run_methods(cfg):
            sel = Selection.load(self.dir.selection(method))
            if not sel.found:
                methods[method] = MethodMetrics(False, sel.message)
                continue
            abl = run(f"harmful_ablated_{method}", ht, sel, "ablate")
            add = run(f"harmless_added_{method}", lt, sel, "add")
            methods[method] = MethodMetrics(
                True,
                pick=sel.pick,
                harmful_ablated=abl.rate,
                attack_success=abl.asr,
                harmless_added=add.rate,
                kl=sel.scores.get("KL"),
            )
        return RunMetrics(tuple(judge.phrases), harmful_clean, harmless_clean, methods)

    def stability(self, resamples: int = 10, seed: int = 0) -> Stability:
        """Selection over ``resamples`` bootstrap resamples of the train and val sets.

        Each finished resample is saved (``stability_resamples/``), so a stopped stage
        resumes with the next one; a resample is reused whenever the run's scores and
        ``seed`` are unchanged, also by a later call with more resamples.
        """
        self.scores()
        cfg = self.cfg
        drawn = {"seed": seed, "format": STABILITY_FORMAT}
        key = self.dir.stage_key("stability", cfg, [self.keys["scores"]], drawn)

        def work() -> dict[str, Any]:
            boot = self.bootstrap(seed)
            done = []
            for b in range(resamples):
                path = self.dir.resample(b)
                old = _saved_resample(path, key)
                if old is None:
                    old = boot.resample(b, key=key)
                    old.save(path)
                    picks = ", ".join(f"{m} {p}" for m, p in old.picks.items())
                    self.say(f"[stability] resample {b + 1}/{resamples} in {old.seconds:.1f} s: {picks}")
                else:
                    self.say(f"[stability] resample {b + 1}/{resamples}: reusing {path.name}")
                done.append(old)
            result = boot.summary(done)
            result.save(self.dir.stability)
            return {
                "resamples": resamples,
                "seed": seed,
                "setup_seconds": round(result.seconds["setup"], 2),
                "per_resample_seconds": round(result.seconds["per_resample"], 2),
            }

        self._stage("stability", ["scores"], {**drawn, "resamples": resamples}, work)
        return Stability.load(self.dir.stability)

    def bootstrap(self, seed: int = 0) -> Bootstrap:
        """The shared work of the run's bootstrap resamples (its prompts and settings)."""
        cfg = self.cfg
        return Bootstrap(
            self.model,
            *(self.chat(name) for name in BOOTSTRAP_SETS),
            seed=seed,
            baselines=run_methods(cfg)[1:],
            refusal_tokens=cfg.refusal_tokens,
            prompt_filter=self._prompt_filter() if filtering(cfg) else None,
            **self._scoring_settings(),
        )

    def _prompt_filter(self) -> PromptFilter:
        """The filter stage's outcome as the indices it kept in each of the run's sets."""
        data = read_json(self.dir.filtered_prompts)
        kept = {}
        for name in BOOTSTRAP_SETS:
            keep = set(data["sets"][name])
            kept[name] = frozenset(i for i, x in enumerate(self.prompts[name]) if x in keep)
        return PromptFilter(kept, tuple(data["refusal_tokens"]))

    def audit(self, *, k: int = 8, stratified: int = 8, seed: int = 0) -> Audit:
        """The behavioural audit (:func:`cosmic_tl.audit.audit`) of every method's
        candidates on the test prompts; resumable group by group."""
        self.select()
        cfg, judge = self.cfg, run_judge(self.cfg)

        def work() -> dict[str, Any]:
            started = time.perf_counter()
            methods = run_methods(cfg)
            loaded: dict[Path, Candidates] = {}  # methods that share a set share one object
            cands = {}
            for m in methods:
                path = self.dir.candidates_for(m, cfg)
                cands[m] = loaded.setdefault(path, Candidates.load(path, self.model))
            result = audit(
                self.model,
                {m: Selection.load(self.dir.selection(m)) for m in methods},
                self._ranked_scores(methods),
                cands,
                self.chat("harmful_test"),
                self.chat("harmless_test"),
                judge=judge,
                settings=cfg.selection,
                k=k,
                stratified=stratified,
                seed=seed,
                max_new_tokens=cfg.max_new_tokens,
                max_rows=max(cfg.batch_size, AUDIT_ROWS),
                placement=cfg.ablation_placement,
                checkpoint=self.dir.audit_parts,
                key=self.keys["audit"],
                progress=self.progress,
            )
            result.save(self.dir.audit)
            shutil.rmtree(self.dir.audit_parts, ignore_errors=True)  # the record has it all
            seconds = time.perf_counter() - started
            self.say(
                f"[audit] {len(result.rows)} candidates in {seconds:.1f} s wall time "
                f"({result.stats['seconds']:.1f} s generating and scoring them)"
            )
            for m, s in result.methods.items():
                if s.n_ranked < s.n_candidates:
                    self.say(
                        f"[audit] {m}: its ranking score exists for {s.n_ranked} of "
                        f"{s.n_candidates} candidates (lazy scoring), so its top {k} is "
                        "taken among those; a run with --full-grids ranks them all"
                    )
                self.say(
                    f"[audit] {m}: pick {s.pick} behaviour {_num(s.pick_score)}, best {s.best} "
                    f"{_num(s.best_score)}, regret {_num(s.regret)}, Spearman {_num(s.spearman)}"
                )
            return {"candidates": len(result.rows), "wall_seconds": round(seconds, 2)}

        extra = {
            **self.prompts.hash("harmful_test", "harmless_test"),
            "judge": judge.phrases,
            "k": k,
            "stratified": stratified,
            "seed": seed,
            "format": AUDIT_FORMAT,
        }
        self._stage("audit", ["select"], extra, work)
        return Audit.load(self.dir.audit)

    def _ranked_scores(self, methods: tuple[str, ...]) -> dict[str, Scores]:
        """Each method's scores with its ranking score at every candidate, for the audit.

        Lazy scoring leaves some out (a baseline's ``bypass`` where ``induce`` fails);
        they are computed here on the run's validation sets and kept in ``audit_parts/``
        under the audit's key, so that a resumed audit does not compute them again.
        """
        cfg, out = self.cfg, dict[str, Scores]()
        by_path: dict[Path, list[str]] = {}
        for m in methods:
            by_path.setdefault(self.dir.scores_for(m, cfg), []).append(m)
        for path, group in by_path.items():
            scores = Scores.load(path)
            need = tuple(m for m in group if unranked(scores, m))
            if need:
                scores = self._rank_all(path, scores, need)
            out |= dict.fromkeys(group, scores)
        return out

    def _rank_all(self, path: Path, scores: Scores, methods: tuple[str, ...]) -> Scores:
        kept, marker = (
            self.dir.audit_parts / f"ranked_{path.name}",
            self.dir.audit_parts / f"ranked_{path.name}.key.json",
        )
        key = {"key": self.keys["audit"], "methods": list(methods)}
        if marker.is_file() and read_json(marker) == key:
            try:
                return Scores.load(kept)
            except RecordError:
                pass  # a torn checkpoint: compute again
        missing = {m: unranked(scores, m) for m in methods}
        self.say(f"[audit] ranking every candidate: computing {missing} missing ranking scores")
        filtered = path == self.dir.scores(filtered=True)
        if filtered:
            _, sets = self._filtered()
            hv, lv = sets["harmful_val"], sets["harmless_val"]
        else:
            hv, lv = self.chat("harmful_val"), self.chat("harmless_val")
        settings = self._scoring_settings()
        kw = {k: settings[k] for k in ("batch_size", "reuse_prefix", "share_prefix")}
        ranked = rank_all(
            scores,
            Candidates.load(self.dir.candidates(filtered=filtered), self.model),
            Runner(self.model, hv, **kw),
            Runner(self.model, lv, **kw),
            methods,
            inplace_addition=settings["inplace_addition"],
            placement=settings["placement"],
            progress=self.progress,
        )
        self.dir.audit_parts.mkdir(parents=True, exist_ok=True)
        ranked.save(kept)
        write_json(marker, key)
        self.say(
            f"[audit] ranking scores: {ranked.stats['passes']:.0f} passes, "
            f"{ranked.stats['gflop']:.0f} GFLOP in {ranked.stats['sweep_seconds']:.1f} s"
        )
        return ranked

    def report(self) -> Path:
        from cosmic_tl.report import write_report

        path = write_report(self.dir, self.cfg)
        self.say(f"[report] {path}")
        return path

    def run(self) -> Path:
        self.evaluate()
        return self.report()
