"""The behavioural audit: statistics against hand values, the planted model's known answer,
agreement with evaluation, batched rows, resume, and a method that found nothing."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import re

import pytest
import torch
from conftest import HARMFUL, HARMLESS

from cosmic_tl.audit import (
    Audit,
    AuditRow,
    Behaviour,
    Estimate,
    average_ranks,
    bootstrap_mean,
    spearman,
    stratified_cells,
    summarise,
)
from cosmic_tl.candidates import compute_candidates
from cosmic_tl.config import SelectionSettings
from cosmic_tl.evaluation import Rate, SubstringJudge, evaluate, greedy_tokens
from cosmic_tl.interventions import Intervention, intervene, row_hooks
from cosmic_tl.models import load_model
from cosmic_tl.models.organisms.planted import build_planted
from cosmic_tl.planner import score_candidates
from cosmic_tl.selection import SELECT, NoCandidateError, Selection
from cosmic_tl.templates import chat_prompts

# the module (``cosmic_tl.audit`` the attribute is the function, as for ``sweep``)
audit_mod = importlib.import_module("cosmic_tl.audit")
METHODS = ("cosmic", "refusal_tokens", "substring")

# ---------------------------------------------------------------- statistics


def test_average_ranks_and_spearman_against_hand_values():
    assert average_ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    # ranks of y: 1, 2, 3.5, 5, 3.5; Σdxdy = 8, Σdx² = 10, Σdy² = 9.5
    assert spearman([1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 6.0, 7.0, 8.0, 7.0]) == pytest.approx(
        8 / math.sqrt(95)
    )
    assert spearman([1.0, 2.0, 3.0], [30.0, 20.0, 10.0]) == pytest.approx(-1.0)
    assert spearman([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]) is None  # constant: undefined
    assert spearman([1.0, 2.0], [1.0, 2.0]) is None
    with pytest.raises(ValueError, match="2 x values but 3"):
        spearman([1.0, 2.0], [1.0, 2.0, 3.0])


def test_bootstrap_mean_is_seeded_and_brackets_the_mean():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0])
    a, b = bootstrap_mean(x, seed=3), bootstrap_mean(x, seed=3)
    assert a == b and a.mean == pytest.approx(3.2) and a.n == 5
    assert a.low < a.mean < a.high and a.low >= 0.0 and a.high <= 10.0
    one = bootstrap_mean(torch.tensor([2.5]))
    assert (one.mean, one.low, one.high) == (2.5, 2.5, 2.5)
    assert math.isnan(bootstrap_mean(torch.tensor([])).mean)


def test_stratified_cells_cover_layers_and_skip_taken_cells():
    cells = stratified_cells((3, 8), 4, {(0, 0), (1, 0), (2, 0)}, seed=1)
    assert len(cells) == len(set(cells)) == 4
    assert not {(0, 0), (1, 0), (2, 0)} & set(cells)
    assert sorted(c[1] // 2 for c in cells) == [0, 1, 2, 3]  # one per bin of two layers
    assert cells == stratified_cells((3, 8), 4, {(0, 0), (1, 0), (2, 0)}, seed=1)
    assert len(stratified_cells((1, 2), 5, set(), seed=0)) == 2  # no more cells than the grid


# ---------------------------------------------------------------- the summary on hand-made rows


def _behaviour(asr: int, induced: int, n: int = 4) -> Behaviour:
    zero = Estimate(0.0, 0.0, 0.0, n)
    return Behaviour(Rate.of(asr, n), Rate.of(induced, n), zero, zero)


def _selection(method: str, pick: tuple[int, int] | None) -> Selection:
    return Selection(
        method,  # type: ignore[arg-type]
        pick[0] if pick else None,
        pick[1] if pick else None,
        {},
        torch.zeros(1, 4),
        (("",) * 4,),
        {},
        (-1,),
        "ace",
        "m",
        message="none" if pick is None else "picked",
    )


def test_regret_best_and_spearman_of_hand_made_rows():
    # (layer, proxy, reason, ASR k of 4, induced k of 4) for one method, COSMIC's proxy
    table = [(0, 0.9, "", 1, 1), (1, 0.5, "kl", 4, 4), (2, 0.7, "", 3, 1), (3, 0.1, "late_layer", 0, 0)]
    rows = [
        AuditRow("cosmic", -1, j, ("x",), {"cosmic": p}, {"cosmic": why}, _behaviour(a, i))
        for j, p, why, a, i in table
    ]
    s = summarise(rows, {"cosmic": _selection("cosmic", (-1, 0))})["cosmic"]
    assert s.pick_score == 0.25 and s.best == (-1, 1) and s.best_score == 1.0
    assert s.regret == 0.75 and s.best_removed_by == "kl"
    assert s.best_kept == (-1, 2) and s.regret_kept == pytest.approx(0.25)
    # proxy ranks 4, 2, 3, 1 against behaviour ranks 2, 4, 3, 1: 1 − 6·(4 + 4)/(4·15) = 0.2
    assert s.spearman == pytest.approx(0.2) and s.n_spearman == 4
    # a baseline's proxy is better when lower: the same values mean the opposite ranking
    flipped = [dataclasses.replace(r, proxy={"substring": r.proxy["cosmic"]}) for r in rows]
    flipped = [dataclasses.replace(r, reasons={"substring": r.reasons["cosmic"]}) for r in flipped]
    b = summarise(flipped, {"substring": _selection("substring", (-1, 1))})["substring"]
    assert b.spearman == pytest.approx(-0.2) and b.regret == 0.0
    none = summarise(rows, {"cosmic": _selection("cosmic", None)})["cosmic"]
    assert none.pick is None and none.regret is None and none.best == (-1, 1)


# ---------------------------------------------------------------- the planted model


@pytest.fixture(scope="module")
def planted(tmp_path_factory, smollm2_dir):
    p = build_planted(tmp_path_factory.mktemp("planted"), smollm2_dir)
    return p, load_model(p.path, device="cpu")


def _pipeline_of(model, harmful, harmless, settings=None):
    """Candidates, full score grids and every method's selection."""
    cands = compute_candidates(model, harmful, harmless, batch_size=8, progress=False)
    scores = score_candidates(
        model, cands, harmful[:4], harmless[:4], baseline=METHODS[1:], full=True, progress=False
    )
    sels = {}
    for m in METHODS:
        try:
            sels[m] = SELECT[m](scores, settings, cands)
        except NoCandidateError as err:
            sels[m] = err.selection
    return cands, scores, sels


def _audit(model, cands, scores, sels, harmful, harmless, **kw):
    return audit_mod.audit(
        model,
        sels,
        dict.fromkeys(sels, scores),
        dict.fromkeys(sels, cands),
        harmful,
        harmless,
        judge=SubstringJudge(),
        max_new_tokens=kw.pop("max_new_tokens", 8),
        progress=False,
        **kw,
    )


def test_the_planted_cell_is_the_best_audited_candidate(planted, tmp_path):
    info, model = planted
    harmful, harmless = info.prompts(HARMLESS)
    cands, scores, sels = _pipeline_of(model, harmful, harmless)
    result = _audit(model, cands, scores, sels, harmful, harmless)
    assert len(result.rows) == len(cands.positions) * cands.n_layers  # the whole grid: 1 × 6
    best = max(result.rows, key=lambda r: r.behaviour.score)
    assert best.cell == info.cell
    assert best.behaviour.asr.rate == 1.0 and best.behaviour.induced.rate == 1.0
    assert all(r.behaviour.score <= 0.5 for r in result.rows if r.cell != info.cell)
    assert abs(best.behaviour.kl.mean) < 1e-6 and abs(best.behaviour.ce.mean) < 1e-6
    assert result.clean.asr.rate == 0.0 and result.clean.induced.rate == 0.0
    # the filters, known by construction (6 layers: late from 4, position -1 late from 3)
    assert result.row((-1, 0)).reasons == dict.fromkeys(METHODS, "zero_direction")
    assert result.row((-1, 3)).reasons == {
        "cosmic": "",
        "refusal_tokens": "induce",  # adding d at layer 3 makes no one say "I"
        "substring": "late_last_position",
    }
    assert result.row((-1, 4)).reasons["cosmic"] == "late_layer"
    for m, s in result.methods.items():
        assert s.best == info.cell and s.n_ranked == s.n_candidates == 6  # full grids
        assert (s.regret == 0.0) == (s.pick == info.cell), (m, s)
    assert any(s.pick == info.cell for s in result.methods.values())
    # a method that picked another cell: regret = 1 − its behaviour
    wrong = dataclasses.replace(sels["cosmic"], position=-1, layer=3)
    s = summarise(result.rows, {"cosmic": wrong})["cosmic"]
    assert s.regret == pytest.approx(1.0 - result.row((-1, 3)).behaviour.score) and s.regret > 0
    result.save(tmp_path / "audit")
    assert Audit.load(tmp_path / "audit") == result
    # the figures: behaviour over the grid with the picks, proxy against behaviour per method
    from cosmic_tl.plots import audit_heatmap, audit_scatter

    heat = audit_heatmap(result)
    assert heat.data[0].z[0] == [r.behaviour.score for r in sorted(result.rows, key=lambda r: r.layer)]
    assert {t.name for t in heat.data[1:]} == {"COSMIC pick", "baseline pick", "substring pick"}
    scatter = audit_scatter(result)
    assert [a.text.split(":")[0] for a in scatter.layout.annotations] == [
        "COSMIC",
        "baseline",
        "substring",
    ]


# ---------------------------------------------------------------- on the tiny random model


def test_stacked_rows_equal_each_intervention_alone(tiny):
    prompts = chat_prompts(tiny.tokenizer, HARMFUL[:3])
    batch = prompts.batches(3)[0]
    r = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(0))
    ivs = [
        Intervention("ablate", "lce", r),
        None,
        Intervention("add", "ace", r, layer=2, reference=r / 3),
    ]
    with torch.no_grad():
        with tiny.hooks(fwd_hooks=row_hooks([(iv, 3) for iv in ivs], tiny)):
            stacked = tiny(batch.tokens.repeat(3, 1), attention_mask=batch.attention_mask.repeat(3, 1))
        for c, iv in enumerate(ivs):
            with intervene(tiny, *([iv] if iv else [])):
                alone = tiny(batch.tokens, attention_mask=batch.attention_mask)
            torch.testing.assert_close(stacked[3 * c : 3 * c + 3], alone, rtol=1e-4, atol=1e-4)
    with (
        pytest.raises(ValueError, match="row groups cover 9"),
        tiny.hooks(fwd_hooks=row_hooks([(iv, 3) for iv in ivs], tiny)),
    ):
        tiny(batch.tokens, attention_mask=batch.attention_mask)


def test_answer_scores_split_to_fit_the_logit_budget_give_the_same_numbers(tiny, monkeypatch):
    prompts = chat_prompts(tiny.tokenizer, HARMLESS[:4])
    answers = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
    r = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(1))
    ivs = [None, Intervention("ablate", "lce", r)]
    whole = audit_mod.answer_scores(tiny, prompts, answers, ivs, max_rows=8)
    seen = []
    real = audit_mod._stacked_batches

    def spy(p, n_groups, max_rows):
        seen.append(max_rows)
        return real(p, n_groups, max_rows)

    monkeypatch.setattr(audit_mod, "_stacked_batches", spy)
    # room for the logits of two rows only: one prompt per batch, both interventions
    longest = 5 if audit_mod.last_logits_only(tiny) else max(len(p) for p in prompts.ids) + 4
    monkeypatch.setattr(audit_mod, "LOGIT_BYTES", 2 * 4 * longest * tiny.cfg.d_vocab)
    split = audit_mod.answer_scores(tiny, prompts, answers, ivs, max_rows=8)
    assert seen == [2]
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_run(tiny):
    return _pipeline_of(tiny, HARMFUL, HARMLESS, SelectionSettings(kl_threshold=1e9))


def test_audit_agrees_with_evaluation_and_an_unbatched_cross_entropy(tiny, tiny_run):
    cands, scores, sels = tiny_run
    harmful, harmless = HARMFUL[:4], HARMLESS[:4]
    result = _audit(tiny, cands, scores, sels, harmful, harmless, k=2, stratified=2, max_rows=8)
    assert len(result.rows) >= 3  # top 2 per method, picks, 2 stratified (overlapping)
    assert sum("stratified" in r.labels for r in result.rows) == 2
    judge = SubstringJudge()
    sel = sels["cosmic"]
    row = result.row(sel.pick)
    abl = evaluate(tiny, harmful, judge=judge, intervention=sel.intervention("ablate"), max_new_tokens=8)
    add = evaluate(tiny, harmless, judge=judge, intervention=sel.intervention("add"), max_new_tokens=8)
    assert row.behaviour.asr == abl.asr and row.behaviour.induced == add.rate
    # the capability measure, prompt by prompt, without stacking
    prompts = chat_prompts(tiny.tokenizer, harmless)
    stops = audit_mod.stop_token_ids(tiny)
    deltas = []
    for ids in prompts.ids:
        tokens = torch.tensor([ids])
        new = greedy_tokens(tiny, tokens, torch.ones_like(tokens), max_new_tokens=8, stop_ids=stops)[
            0
        ].tolist()
        ends = [t for t, x in enumerate(new) if x in stops]
        answer = new[: ends[0] + 1] if ends else new
        full = torch.tensor([[*ids, *answer]])
        ce = []
        for iv in (None, sel.intervention("ablate")):
            with torch.no_grad(), intervene(tiny, *([iv] if iv else [])):
                logits = tiny(full)[0, len(ids) - 1 : -1].double()
            logp = torch.log_softmax(logits, -1)
            ce.append(float(-logp[torch.arange(len(answer)), torch.tensor(answer)].mean()))
        deltas.append(ce[1] - ce[0])
    assert row.behaviour.ce.mean == pytest.approx(sum(deltas) / len(deltas), rel=1e-3, abs=1e-4)
    assert row.behaviour.ce.low <= row.behaviour.ce.mean <= row.behaviour.ce.high
    for m, s in result.methods.items():
        assert s.pick == sels[m].pick
        if s.best_score is not None and s.pick_score is not None:
            assert s.regret == pytest.approx(s.best_score - s.pick_score) and s.regret >= 0


def test_a_killed_audit_resumes_without_redoing_finished_groups(tiny, tiny_run, tmp_path, monkeypatch):
    cands, scores, sels = tiny_run
    harmful, harmless = HARMFUL[:2], HARMLESS[:2]
    kw = {"k": 2, "stratified": 2, "max_rows": 4, "checkpoint": tmp_path, "key": "k1"}
    calls = []
    real = audit_mod._evaluate_group

    def dies_on_the_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(audit_mod, "_evaluate_group", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        _audit(tiny, cands, scores, sels, harmful, harmless, **kw)
    assert (tmp_path / "group_000.json").is_file() and not (tmp_path / "group_001.json").exists()
    monkeypatch.setattr(audit_mod, "_evaluate_group", real)
    resumed = _audit(tiny, cands, scores, sels, harmful, harmless, **kw)
    live = len(resumed.rows) - resumed.stats["zero_directions"]  # zero ones are not generated
    assert math.ceil(live / 2) >= 2  # 4 rows of 2 prompts: 2 candidates a group
    assert resumed.stats["evaluated"] == live - len(calls[0])
    fresh = _audit(tiny, cands, scores, sels, harmful, harmless, **{**kw, "checkpoint": None})
    assert [r.behaviour for r in resumed.rows] == [r.behaviour for r in fresh.rows]
    # another key (other settings) reuses nothing
    other = _audit(tiny, cands, scores, sels, harmful, harmless, **{**kw, "key": "k2"})
    assert other.stats["evaluated"] == live


def test_a_method_that_found_nothing_is_reported(tiny):
    cands, scores, sels = _pipeline_of(
        tiny, HARMFUL, HARMLESS, SelectionSettings(max_layer_fraction=0.1)
    )
    assert not sels["cosmic"].found
    settings = SelectionSettings(max_layer_fraction=0.1)
    result = _audit(
        tiny, cands, scores, sels, HARMFUL[:2], HARMLESS[:2], k=1, stratified=1, settings=settings
    )
    s = result.methods["cosmic"]
    assert s.pick is None and s.regret is None and s.pick_score is None
    assert "discarded" in s.message and s.best is not None
    assert all(r.reasons["cosmic"] == "late_layer" for r in result.rows)


# ---------------------------------------------------------------- the stage and the command


@pytest.mark.parametrize("late", [False, True], ids=["picks", "cosmic-finds-nothing"])
def test_audit_command_is_a_resumable_stage_and_a_report_section(tiny_dir, tmp_path, caplog, late):
    from test_cli import _args

    from cosmic_tl import cli
    from cosmic_tl.results import RunMetrics
    from cosmic_tl.rundir import RunDir

    extra = ["--max-layer-fraction", "0.1"] if late else []
    assert cli.main(_args(tiny_dir, tmp_path, *extra)) == 0
    caplog.set_level("INFO", logger="cosmic_tl")
    audit_args = ["audit", str(tmp_path), "--k", "2", "--stratified", "1", "--quiet"]
    assert cli.main(audit_args) == 0
    run = RunDir(tmp_path)
    result = Audit.load(run.audit)
    assert "audit" in json.loads(run.stages.read_text())
    assert not run.audit_parts.exists()  # the finished record holds everything
    assert "candidates in" in caplog.text and "wall time" in caplog.text
    summary = re.compile(r"Spearman (none|-?\d\.\d{3})$")  # rounded for reading
    lines = [r.getMessage() for r in caplog.records if "Spearman" in r.getMessage()]
    assert len(lines) == len(result.methods) and all(summary.search(x) for x in lines), lines
    html = run.report.read_text()
    assert "Audit (behaviour of many candidates)" in html and "fig-audit_heatmap" in html
    metrics = RunMetrics.load(run.metrics)
    assert all(s.n_ranked == s.n_candidates == 24 for s in result.methods.values())  # all ranked
    for method, s in result.methods.items():
        m = metrics.methods[method]
        assert (s.pick is not None) == m.found
        if m.found:  # the audit's generation of the pick agrees with the evaluation's
            assert result.row(s.pick).behaviour.asr == m.attack_success
    if late:
        assert result.methods["cosmic"].pick is None and "none: cosmic" in html
    caplog.clear()
    assert cli.main(audit_args) == 0
    assert "[audit] up to date" in caplog.text
    assert cli.main([*audit_args[:3], "3", *audit_args[4:]]) == 0  # another k: recomputed
    assert "[audit] running" in caplog.text
    assert cli.main(["audit", str(tmp_path / "nothing-here")]) == 2


def test_filter_reasons_follow_the_grids_where_kl_was_computed(tiny):
    from cosmic_tl.selection import KEPT, KL_NOT_SCORED, PREFILTERS, filter_reasons

    cands = compute_candidates(tiny, HARMFUL, HARMLESS, batch_size=8, progress=False)
    scores = score_candidates(tiny, cands, HARMFUL[:3], HARMLESS[:3], progress=False)  # lazy KL
    settings = SelectionSettings(kl_threshold=0.05)
    sel = SELECT["cosmic"](scores, settings)
    reasons = filter_reasons(scores, "cosmic", settings)
    pre = PREFILTERS["cosmic"](scores, settings)
    kl, done = scores.grids["KL"], scores.computed["KL"]
    i = scores.positions.index(sel.pick[0])
    assert reasons[i][sel.pick[1]] == KEPT
    for a, row in enumerate(reasons):
        for b, why in enumerate(row):
            if pre[a][b] != KEPT:
                assert why == pre[a][b]
            elif not bool(done[a, b]):
                assert why == KL_NOT_SCORED
            else:
                assert why == ("kl" if float(kl[a, b]) > 0.05 else KEPT)
    assert any(KL_NOT_SCORED in row for row in reasons)  # lazy scoring skipped some


def test_rank_all_fills_the_lazy_ranking_scores_as_full_scoring_computes_them(tiny):
    from cosmic_tl.engine import Runner
    from cosmic_tl.planner import rank_all, ranking_grids, unranked
    from cosmic_tl.templates import prompts_for

    cands = compute_candidates(tiny, HARMFUL, HARMLESS, batch_size=8, progress=False)
    kw = {"baseline": ("refusal_tokens", "substring"), "progress": False}
    lazy = score_candidates(tiny, cands, HARMFUL[:3], HARMLESS[:3], **kw)
    full = score_candidates(tiny, cands, HARMFUL[:3], HARMLESS[:3], full=True, **kw)
    assert unranked(lazy, "refusal_tokens") > 0  # bypass skipped where induce fails
    assert all(unranked(full, m) == 0 for m in METHODS)
    runners = [Runner(tiny, prompts_for(tiny, p)) for p in (HARMFUL[:3], HARMLESS[:3])]
    ranked = rank_all(lazy, cands, *runners, METHODS, progress=False)
    assert all(unranked(ranked, m) == 0 for m in METHODS)
    assert ranked.stats["passes"] > 0
    for m in METHODS:
        for name in ranking_grids(m):
            torch.testing.assert_close(ranked.grids[name], full.grids[name], rtol=1e-5, atol=1e-6)
            done = lazy.computed[name]  # cells scored before are kept as they were
            assert torch.equal(ranked.grids[name][done], lazy.grids[name][done])
    assert torch.equal(ranked.computed["KL"], lazy.computed["KL"])  # nothing else is computed
