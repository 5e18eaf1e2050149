"""The whole run as stages over a run directory: candidates → scores → select → evaluate → report.

This is the I/O edge of cosmic_tl: it loads prompts and models, calls the library, and
writes results into a :class:`~cosmic_tl.rundir.RunDir`. Each stage is reused when
its inputs are unchanged (see :mod:`cosmic_tl.rundir`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosmic_tl.candidates import Candidates, compute_candidates
from cosmic_tl.config import Config, torch_dtype
from cosmic_tl.evaluation import (
    DEFAULT_REFUSAL_PHRASES,
    EvalResult,
    Rate,
    SubstringJudge,
    evaluate,
    save_completions,
)
from cosmic_tl.interventions import Intervention
from cosmic_tl.models import load_model, model_id, read_card, resolve_spec
from cosmic_tl.prompts import clean_prompts, load_prompts, prompts_sha256, sample_prompts
from cosmic_tl.rundir import RunDir
from cosmic_tl.scoring import Scores, refusal_score
from cosmic_tl.selection import (
    NoCandidateError,
    Selection,
    compare,
    select_cosmic,
    select_refusal_tokens,
)
from cosmic_tl.store import read_json, write_json, write_tensors
from cosmic_tl.sweep import Runner, score_candidates

log = logging.getLogger("cosmic_tl")

SETS = (
    "harmful_train",
    "harmless_train",
    "harmful_val",
    "harmless_val",
    "harmful_test",
    "harmless_test",
)


@dataclass(frozen=True)
class RunPrompts:
    """The six prompt lists of a run, sampled with the config's seed."""

    sets: dict[str, list[str]]

    def hash(self, *names: str) -> dict[str, str]:
        return {n: prompts_sha256(self.sets[n]) for n in names}

    def __getitem__(self, name: str) -> list[str]:
        return self.sets[name]


def load_run_prompts(cfg: Config) -> RunPrompts:
    """Load, clean and sample every prompt set named in ``cfg``."""
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    out = {}
    for name in SETS:
        split = name.split("_")[1]
        raw = load_prompts(getattr(cfg, name), split=split)
        out[name] = sample_prompts(clean_prompts(raw), sizes[split], seed=cfg.seed)
    return RunPrompts(out)


def judge_phrases(cfg: Config) -> tuple[str, ...]:
    """The organism's own refusal phrases if its card has them, else the default list."""
    kind, name = resolve_spec(cfg.model)
    if kind == "alias":
        try:
            phrases = read_card(name).get("judge_phrases")
        except OSError:
            phrases = None
        if phrases:
            return tuple(phrases)
    return DEFAULT_REFUSAL_PHRASES


def filter_by_refusal_score(
    model: Any,
    harmful: list[str],
    harmless: list[str],
    token_ids: tuple[int, ...],
    batch_size: int,
) -> tuple[list[str], list[str]]:
    """Arditi's prompt filter: harmful prompts the model refuses, harmless ones it answers."""
    kept = []
    for prompts, sign in ((harmful, 1.0), (harmless, -1.0)):
        logits = Runner(
            model, prompts, batch_size=batch_size, reuse_prefix=False, share_prefix=False
        ).clean.logits
        assert logits is not None
        score = refusal_score(logits, token_ids)
        kept.append([p for p, s in zip(prompts, score.tolist(), strict=True) if sign * s > 0])
    if not kept[0] or not kept[1]:
        raise ValueError(
            f"prompt filtering left {len(kept[0])} harmful and {len(kept[1])} harmless validation "
            "prompts; the model does not refuse with these refusal tokens. Turn off --filter-prompts"
        )
    return kept[0], kept[1]


class Pipeline:
    """Runs (or resumes) the stages of one run directory."""

    def __init__(
        self,
        cfg: Config,
        out: str | Path,
        *,
        progress: bool = True,
        force: bool = False,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg, self.progress = cfg, progress
        self.dir = RunDir(Path(out))
        self.dir.open(cfg, force=force)
        self.say = say or log.info
        self.prompts = load_run_prompts(cfg)
        self._model: Any = None
        self.keys: dict[str, str] = {}

    @property
    def model(self) -> Any:
        if self._model is None:
            self.say(f"loading model {self.cfg.model} ...")
            self._model = load_model(
                self.cfg.model, device=self.cfg.device, dtype=torch_dtype(self.cfg.dtype)
            )
        return self._model

    def _stage(
        self,
        name: str,
        upstream: list[str],
        outputs: list[str],
        extra: Any,
        work: Callable[[], dict[str, Any] | None],
    ) -> bool:
        key = self.dir.stage_key(name, self.cfg, [self.keys[u] for u in upstream], extra)
        self.keys[name] = key
        if self.dir.done(name, key, outputs):
            self.say(f"[{name}] up to date, reusing {', '.join(outputs)}")
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
            c = compute_candidates(
                self.model,
                self.prompts["harmful_train"],
                self.prompts["harmless_train"],
                batch_size=self.cfg.batch_size,
                system=self.cfg.system_prompt,
                progress=self.progress,
            )
            c.save(self.dir.path("candidates"))

        self._stage(
            "candidates",
            [],
            ["candidates.safetensors", "candidates.json"],
            self.prompts.hash("harmful_train", "harmless_train"),
            work,
        )

    def scores(self) -> None:
        self.candidates()
        outputs = ["scores.safetensors", "scores.json"]
        if self.cfg.filter_prompts and self.cfg.baseline:
            outputs += ["scores_baseline.safetensors", "scores_baseline.json"]

        def work() -> dict[str, Any]:
            cands = Candidates.load(self.dir.path("candidates"), self.model)
            cfg = self.cfg
            kw: dict[str, Any] = dict(
                mode=cfg.mode,
                alpha=cfg.alpha,
                settings=cfg.selection,
                refusal_tokens=cfg.refusal_tokens,
                full=cfg.full_grids,
                batch_size=cfg.batch_size,
                system=cfg.system_prompt,
                reuse_prefix=cfg.reuse_prefix,
                share_prefix=cfg.share_prefix,
                progress=self.progress,
            )
            hv, lv = self.prompts["harmful_val"], self.prompts["harmless_val"]
            split = cfg.filter_prompts and cfg.baseline
            s = score_candidates(self.model, cands, hv, lv, baseline=cfg.baseline and not split, **kw)
            s.save(self.dir.path("scores"))
            info: dict[str, Any] = {"gflop": s.stats.get("gflop")}
            if split:
                from cosmic_tl.scoring import default_refusal_tokens, encode_refusal_tokens

                names = cfg.refusal_tokens or default_refusal_tokens(model_id(self.model))
                ids = encode_refusal_tokens(self.model.tokenizer, names)
                fh, fl = filter_by_refusal_score(self.model, hv, lv, ids, cfg.batch_size)
                b = score_candidates(self.model, cands, fh, fl, baseline=True, **kw)
                b.save(self.dir.path("scores_baseline"))
                info["filtered_val"] = [len(fh), len(fl)]
            return info

        self._stage(
            "scores", ["candidates"], outputs, self.prompts.hash("harmful_val", "harmless_val"), work
        )

    def select(self) -> None:
        self.scores()
        outputs = ["selection_cosmic.json", "comparison.json"]
        if self.cfg.baseline:
            outputs.append("selection_refusal_tokens.json")

        def work() -> dict[str, Any]:
            cands = Candidates.load(self.dir.path("candidates"))
            scores = Scores.load(self.dir.path("scores"))
            try:
                cosmic = select_cosmic(scores, self.cfg.selection, cands)
            except NoCandidateError as err:
                cosmic = err.selection
            cosmic.save(self.dir.path("selection_cosmic"))
            info: dict[str, Any] = {"cosmic": cosmic.pick}
            comparison: dict[str, Any] = {}
            if self.cfg.baseline:
                bpath = (
                    "scores_baseline"
                    if self.dir.path("scores_baseline.json").exists() and self.cfg.filter_prompts
                    else "scores"
                )
                base = select_refusal_tokens(
                    Scores.load(self.dir.path(bpath)), self.cfg.selection, cands
                )
                base.save(self.dir.path("selection_refusal_tokens"))
                comparison = compare(cosmic, base).to_dict()
                info["refusal_tokens"] = base.pick
            write_json(self.dir.path("comparison.json"), comparison)
            if cosmic.found:
                assert cosmic.direction is not None and cosmic.reference is not None
                write_tensors(
                    self.dir.path("direction.safetensors"),
                    {"direction": cosmic.direction, "reference": cosmic.reference},
                )
                write_json(self.dir.path("direction.json"), direction_card(cosmic, self.cfg))
            return info

        self._stage("select", ["scores"], outputs, None, work)

    def evaluate(self) -> None:
        self.select()
        outputs = ["metrics.json"]

        def work() -> dict[str, Any]:
            metrics = self._evaluate()
            write_json(self.dir.path("metrics.json"), metrics)
            return {}

        self._stage(
            "evaluate",
            ["select"],
            outputs,
            {**self.prompts.hash("harmful_test", "harmless_test"), "judge": judge_phrases(self.cfg)},
            work,
        )

    def _evaluate(self) -> dict[str, Any]:
        cfg = self.cfg
        judge = SubstringJudge(judge_phrases(cfg))
        ht, lt = self.prompts["harmful_test"], self.prompts["harmless_test"]
        kw: dict[str, Any] = dict(
            judge=judge,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=min(cfg.batch_size, 16),
            system=cfg.system_prompt,
            progress=self.progress,
        )
        rates: dict[str, Any] = {"judge_phrases": list(judge.phrases)}

        def record(name: str, res: EvalResult) -> Rate:
            save_completions(self.dir.path(f"completions/{name}.jsonl"), res)
            return res.rate

        rates["harmful, no intervention"] = record(
            "harmful_baseline", evaluate(self.model, ht, **kw)
        ).to_dict()
        rates["harmless, no intervention"] = record(
            "harmless_baseline", evaluate(self.model, lt, **kw)
        ).to_dict()
        for method in ("cosmic", "refusal_tokens"):
            path = self.dir.path(f"selection_{method}.json")
            if not path.exists():
                continue
            sel = Selection.load(path)
            if not sel.found:
                rates[method] = {"found": False, "message": sel.message}
                continue
            assert sel.direction is not None and sel.layer is not None
            ref = sel.reference.float() if sel.reference is not None else None
            ablate = Intervention("ablate", cfg.mode, sel.direction.float(), sel.layer, ref, cfg.alpha)
            added = Intervention("add", cfg.mode, sel.direction.float(), sel.layer, ref, cfg.alpha)
            abl = evaluate(self.model, ht, intervention=ablate, **kw)
            add = evaluate(self.model, lt, intervention=added, **kw)
            abl_rate = record(f"harmful_ablated_{method}", abl)
            rates[method] = {
                "found": True,
                "pick": list(sel.pick) if sel.pick else None,
                "harmful, ablated": abl_rate.to_dict(),
                "attack success rate": abl.asr.to_dict(),
                "harmless, added": record(f"harmless_added_{method}", add).to_dict(),
                "KL": sel.scores.get("KL"),
            }
        return rates

    def report(self) -> Path:
        from cosmic_tl.report import write_report

        path = write_report(self.dir, self.cfg)
        self.say(f"[report] {path}")
        return path

    def run(self) -> Path:
        self.evaluate()
        return self.report()


def direction_card(sel: Selection, cfg: Config) -> dict[str, Any]:
    """JSON that documents direction.safetensors."""
    return {
        "format": "safetensors with 'direction' [d_model] (r = μ_harmful − μ_harmless, not "
        "normalised) and 'reference' [d_model] (μ_harmless, the affine reference)",
        "model": cfg.model,
        "method": sel.method,
        "position": sel.position,
        "layer": sel.layer,
        "hook": f"blocks.{sel.layer}.hook_resid_pre",
        "mode": cfg.mode,
        "alpha": cfg.alpha,
        "scores": sel.scores,
        "use": "cosmic_tl.Intervention('ablate'|'add', mode, direction, layer, reference)",
    }


def read_metrics(dir_: RunDir) -> dict[str, Any]:
    p = dir_.path("metrics.json")
    return dict(read_json(p)) if p.exists() else {}
