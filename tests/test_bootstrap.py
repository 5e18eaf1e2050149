"""Pick stability under bootstrap resamples: the draw, the reuse of shared work (equal to
the straightforward computation on the resampled lists), the summary and its record."""

from __future__ import annotations

import math
import random

import pytest
import torch

from cosmic_tl.bootstrap import (
    SETS,
    Bootstrap,
    PromptFilter,
    Resample,
    Stability,
    mean_pairwise_cosine,
    method_stability,
    resample_indices,
    stability,
)
from cosmic_tl.candidates import compute_candidates, train_activations
from cosmic_tl.config import SelectionSettings
from cosmic_tl.engine import Runner
from cosmic_tl.evaluation import wilson_interval
from cosmic_tl.interventions import Intervention
from cosmic_tl.planner import score_candidates
from cosmic_tl.prompts import load_bundled
from cosmic_tl.selection import SELECT, NoCandidateError

SIZES = {"harmful_train": 8, "harmless_train": 7, "harmful_val": 5, "harmless_val": 4}
PROMPTS = {
    "harmful_train": load_bundled("harmful", "train")[:8],
    "harmless_train": load_bundled("harmless", "train")[:7],
    "harmful_val": load_bundled("harmful", "val")[:5],
    "harmless_val": load_bundled("harmless", "val")[:4],
}
# Loose enough that every method picks something on a random model.
LOOSE = SelectionSettings(kl_threshold=1e9, induce_threshold=-1e9)


def _drawn(indices: dict[str, tuple[int, ...]], keep: dict[str, frozenset[int]] | None = None):
    """The explicitly resampled prompt lists (optionally only the kept prompts)."""
    return {
        n: [PROMPTS[n][i] for i in idx if keep is None or i in keep[n]] for n, idx in indices.items()
    }


# ---------------------------------------------------------------- the draw


def test_resample_indices_are_deterministic_for_a_seed():
    a = resample_indices(SIZES, seed=3, resample=2)
    assert a == resample_indices(SIZES, seed=3, resample=2)
    assert list(a) == list(SETS)
    for name, idx in a.items():
        assert len(idx) == SIZES[name] and all(0 <= i < SIZES[name] for i in idx)
    assert a != resample_indices(SIZES, seed=4, resample=2)
    assert a != resample_indices(SIZES, seed=3, resample=1)
    # A bootstrap draw repeats prompts and leaves some out (true for this seed).
    assert any(len(set(idx)) < len(idx) for idx in a.values())
    # Known answer: the sets are drawn in order from one stream seeded by (seed, resample).
    rng = random.Random("cosmic_tl.bootstrap:0:0")
    expected = {n: tuple(rng.randrange(SIZES[n]) for _ in range(SIZES[n])) for n in SETS}
    assert resample_indices(SIZES, seed=0, resample=0) == expected


def test_resample_indices_reject_bad_sizes():
    with pytest.raises(ValueError, match="positive size"):
        resample_indices({**SIZES, "harmful_val": 0}, seed=0, resample=0)
    with pytest.raises(ValueError, match="positive size"):
        resample_indices({"harmful_train": 3}, seed=0, resample=0)


# ---------------------------------------------------------------- the reused work


def test_weighted_candidates_equal_compute_candidates_on_the_resampled_lists(tiny):
    idx = resample_indices(SIZES, seed=1, resample=0)
    acts = train_activations(tiny, PROMPTS["harmful_train"], PROMPTS["harmless_train"], batch_size=3)
    counts = [
        torch.bincount(torch.tensor(idx[n]), minlength=SIZES[n]).double()
        for n in ("harmful_train", "harmless_train")
    ]
    fast = acts.candidates(*counts)
    drawn = _drawn(idx)
    slow = compute_candidates(
        tiny, drawn["harmful_train"], drawn["harmless_train"], batch_size=3, progress=False
    )
    for name in ("directions", "harmful_mean", "harmless_mean", "eval_harmful", "eval_harmless"):
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=1e-5, atol=1e-5)
    assert (fast.n_harmful, fast.n_harmless) == (8, 7)
    assert fast.positions == slow.positions and fast.model_id == slow.model_id
    # Unweighted: the plain candidates.
    plain = compute_candidates(tiny, PROMPTS["harmful_train"], PROMPTS["harmless_train"], progress=False)
    torch.testing.assert_close(acts.candidates().directions, plain.directions, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="non-negative weights"):
        acts.harmful.means(torch.zeros(8))


@pytest.mark.parametrize("share_prefix", [True, False])
def test_a_resampled_runner_equals_a_runner_on_the_resampled_list(tiny, share_prefix):
    prompts = PROMPTS["harmful_val"]
    index = [3, 0, 3, 3, 1]
    base = Runner(tiny, prompts, batch_size=2, share_prefix=share_prefix)
    view = base.resampled(index)
    direct = Runner(tiny, [prompts[i] for i in index], batch_size=2, share_prefix=share_prefix)
    assert view.clean.logits is not None and direct.clean.logits is not None
    assert view.clean.eval_sums is not None and direct.clean.eval_sums is not None
    torch.testing.assert_close(view.clean.logits, direct.clean.logits, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(view.clean.eval_sums, direct.clean.eval_sums, atol=1e-4, rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    r, ref = torch.randn(tiny.cfg.d_model, generator=g), torch.randn(tiny.cfg.d_model, generator=g)
    for iv in (Intervention("ablate", "ace", r, layer=2, reference=ref), Intervention("add", "lce", r)):
        a = view.run(iv, eval_layers=(1, 3), logits=True)
        b = direct.run(iv, eval_layers=(1, 3), logits=True)
        assert a.logits is not None and b.logits is not None
        assert a.eval_sums is not None and b.eval_sums is not None
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(a.eval_sums[[1, 3]], b.eval_sums[[1, 3]], atol=1e-4, rtol=1e-5)
    assert view.passes == 2 and base.passes == 0  # the view counts its own passes
    with pytest.raises(ValueError, match="indices must be in"):
        base.resampled([0, 5])
    with pytest.raises(ValueError, match="at least one prompt"):
        base.resampled([])
    with pytest.raises(ValueError, match="already a resample"):
        view.resampled([0])


def _assert_same_selection(fast, slow, what: str) -> None:
    assert fast.pick == slow.pick, what
    r1, r2 = fast.ranking, slow.ranking
    assert torch.equal(torch.isnan(r1), torch.isnan(r2)), what  # the same cells were scored
    torch.testing.assert_close(r1.nan_to_num(), r2.nan_to_num(), atol=1e-4, rtol=1e-4, msg=what)
    if slow.direction is not None:
        assert fast.direction is not None
        torch.testing.assert_close(fast.direction, slow.direction, atol=1e-5, rtol=1e-5, msg=what)


def _straightforward(tiny, drawn, method, baselines, tokens):
    cands = compute_candidates(
        tiny, drawn["harmful_train"], drawn["harmless_train"], batch_size=3, progress=False
    )
    scores = score_candidates(
        tiny,
        cands,
        drawn["harmful_val"],
        drawn["harmless_val"],
        mode="ace",
        settings=LOOSE,
        baseline=baselines,
        refusal_tokens=tokens,
        batch_size=3,
        progress=False,
    )
    try:
        return SELECT[method](scores, LOOSE, cands)
    except NoCandidateError as err:
        return err.selection


@pytest.mark.parametrize(("resample", "shared"), [(0, False), (1, True)])
def test_a_resample_equals_the_straightforward_computation(tiny, resample, shared):
    boot = Bootstrap(
        tiny,
        *(PROMPTS[n] for n in SETS),
        seed=5,
        settings=LOOSE,
        baselines=("refusal_tokens", "substring"),
        refusal_tokens=("I",),
        batch_size=3,
        progress=False,
        share_val_caches=shared,
    )
    indices = boot.indices(resample)
    fast = boot.selections(indices)
    assert set(fast) == {"cosmic", "refusal_tokens", "substring"}
    drawn = _drawn(indices)
    baselines = ("refusal_tokens", "substring")
    for method in fast:
        slow = _straightforward(tiny, drawn, method, baselines, ("I",))
        _assert_same_selection(fast[method], slow, method)
        assert fast[method].found


def test_a_filtered_resample_equals_filtering_the_resampled_lists(tiny):
    keep = {n: frozenset(range(0, len(PROMPTS[n]), 2)) | {1} for n in SETS}
    boot = Bootstrap(
        tiny,
        *(PROMPTS[n] for n in SETS),
        seed=2,
        settings=LOOSE,
        baselines=("refusal_tokens",),
        refusal_tokens=("I",),
        prompt_filter=PromptFilter(keep, ("Sure",)),
        batch_size=3,
        progress=False,
    )
    indices = boot.indices(0)
    fast = boot.selections(indices)
    assert set(fast) == {"cosmic", "refusal_tokens"}
    # COSMIC on every drawn prompt, Arditi's baseline on the drawn prompts the filter kept.
    _assert_same_selection(
        fast["cosmic"], _straightforward(tiny, _drawn(indices), "cosmic", (), ("I",)), "cosmic"
    )
    slow = _straightforward(
        tiny, _drawn(indices, keep), "refusal_tokens", ("refusal_tokens",), ("Sure",)
    )
    _assert_same_selection(fast["refusal_tokens"], slow, "filtered refusal_tokens")
    # A resample whose drawn prompts the filter all drops: no pick, not a crash.
    none_kept = PromptFilter({**keep, "harmless_val": frozenset()}, ("Sure",))
    empty = Bootstrap(
        tiny,
        *(PROMPTS[n] for n in SETS),
        settings=LOOSE,
        refusal_tokens=("I",),
        prompt_filter=none_kept,
        batch_size=3,
        progress=False,
    ).resample(0)
    assert (
        empty.picks["refusal_tokens"] is None and "filter kept none" in empty.messages["refusal_tokens"]
    )
    assert empty.picks["cosmic"] is not None


# ---------------------------------------------------------------- the summary


def test_method_stability_known_answer():
    positions = (-2, -1)
    e = torch.eye(3, dtype=torch.float64)
    picks = [(-1, 2), (-1, 2), None, (-2, 0), (-1, 2)]
    dirs = [e[0], 2 * e[0], None, e[1], e[0] + e[1]]
    st = method_stability("cosmic", picks, dirs, positions, 4, 3)
    expected = torch.zeros(2, 4, dtype=torch.float64)
    expected[1, 2], expected[0, 0] = 3, 1
    assert torch.equal(st.frequency, expected)
    assert st.modal == (-1, 2) and st.n_none == 1
    assert (st.modal_share.k, st.modal_share.n) == (3, 5)
    assert (st.modal_share.low, st.modal_share.high) == wilson_interval(3, 5)
    # Pairs of [e0, 2e0, e1, (e0+e1)/√2]: cosines 1, 0, s, 0, s, s with s = 1/√2.
    s = 1 / math.sqrt(2)
    assert st.mean_cosine == pytest.approx((1 + 3 * s) / 6)
    assert torch.isnan(st.directions[2]).all() and torch.equal(st.directions[1], 2 * e[0])
    # Ties go to the first cell (lowest position, then layer); nothing found: no mode.
    tie = method_stability("x", [(-1, 3), (-2, 1)], [e[0], e[1]], positions, 4, 3)
    assert tie.modal == (-2, 1) and tie.modal_share.k == 1
    nothing = method_stability("x", [None, None], [None, None], positions, 4, 3)
    assert nothing.modal is None and nothing.modal_share.k == 0 and math.isnan(nothing.mean_cosine)
    assert math.isnan(mean_pairwise_cosine(e[:1]))


def test_stability_is_deterministic_and_round_trips(tiny, tmp_path):
    kw = dict(
        resamples=2,
        seed=7,
        settings=LOOSE,
        refusal_tokens=("I",),
        batch_size=3,
        progress=False,
    )
    seen: list[Resample] = []
    a = stability(tiny, *(PROMPTS[n] for n in SETS), on_resample=seen.append, **kw)
    b = stability(tiny, *(PROMPTS[n] for n in SETS), **{**kw, "resamples": 1})
    assert [r.resample for r in seen] == [0, 1]
    assert seen[1].indices == resample_indices(SIZES, 7, 1)
    assert set(a.methods) == {"cosmic", "refusal_tokens"}
    for m in a.methods:
        assert a.methods[m].picks[:1] == b.methods[m].picks  # resample 0 whatever B is
        assert torch.equal(
            a.methods[m].directions[:1].nan_to_num(), b.methods[m].directions.nan_to_num()
        )
        assert float(a.methods[m].frequency.sum()) == 2 - a.methods[m].n_none
    assert a.sizes == SIZES and a.resamples == 2 and a.seconds["setup"] > 0
    a.save(tmp_path / "st")
    back = Stability.load(tmp_path / "st")
    assert back.methods["cosmic"].picks == a.methods["cosmic"].picks
    assert back.methods["cosmic"].modal_share == a.methods["cosmic"].modal_share
    assert torch.equal(back.methods["cosmic"].directions.isnan(), a.methods["cosmic"].directions.isnan())
    assert back.positions == a.positions and back.n_layers == tiny.cfg.n_layers
    cos = a.methods["cosmic"].mean_cosine
    assert back.methods["cosmic"].mean_cosine == cos or (
        math.isnan(cos) and math.isnan(back.methods["cosmic"].mean_cosine)
    )
    seen[0].save(tmp_path / "r0")
    r0 = Resample.load(tmp_path / "r0")
    assert r0.indices == seen[0].indices and r0.picks == seen[0].picks
    assert set(r0.directions) == set(seen[0].directions)
    with pytest.raises(ValueError, match="at least 1"):
        stability(tiny, *(PROMPTS[n] for n in SETS), resamples=0)


# ---------------------------------------------------------------- the stage and the command


def _run_args(tiny_dir, out):
    return [
        "score",
        "--model",
        str(tiny_dir),
        "--out",
        str(out),
        "--n-train",
        "4",
        "--n-val",
        "3",
        "--batch-size",
        "4",
        "--quiet",
        "--kl-threshold",
        "1e9",
    ]


def test_stability_command_resumes_a_stopped_stage_and_reports(tiny_dir, tmp_path, monkeypatch, caplog):
    import json

    from cosmic_tl import cli

    out = tmp_path / "run"
    assert cli.main(_run_args(tiny_dir, out)) == 0
    caplog.set_level("INFO", logger="cosmic_tl")
    assert cli.main(["stability", str(out), "--resamples", "1", "--seed", "3", "--quiet"]) == 0
    assert "wall time" in caplog.text and "per resample" in caplog.text
    first = Stability.load(out / "stability")
    assert first.resamples == 1 and first.seed == 3
    assert "fig-stability" in (out / "report.html").read_text()

    calls: list[int] = []
    real = Bootstrap.resample

    def stopped(self, b, key=""):
        calls.append(b)
        if b == 2:
            raise KeyboardInterrupt
        return real(self, b, key)

    monkeypatch.setattr(Bootstrap, "resample", stopped)
    assert (
        cli.main(["stability", "--out", str(out), "--resamples", "3", "--seed", "3", "--quiet"]) == 130
    )
    assert calls == [1, 2]  # resample 0 reused from the first call
    assert (out / "stability_resamples" / "resample_001.json").is_file()
    assert Stability.load(out / "stability").resamples == 1  # the finished record is untouched

    def counted(self, b, key=""):
        calls.append(b)
        return real(self, b, key)

    monkeypatch.setattr(Bootstrap, "resample", counted)
    calls.clear()
    assert cli.main(["stability", str(out), "--resamples", "3", "--seed", "3", "--quiet"]) == 0
    assert calls == [2]  # the stopped stage resumes with the resample it was on
    done = Stability.load(out / "stability")
    assert done.resamples == 3
    assert done.methods["cosmic"].picks[:1] == first.methods["cosmic"].picks
    stages = json.loads((out / "stages.json").read_text())
    assert stages["stability"]["resamples"] == 3
    # Up to date: nothing recomputed; another seed draws again.
    calls.clear()
    assert cli.main(["stability", str(out), "--resamples", "3", "--seed", "3", "--quiet"]) == 0
    assert calls == []
    assert cli.main(["stability", str(out), "--resamples", "1", "--seed", "4", "--quiet"]) == 0
    assert calls == [0]
    assert cli.main(["stability", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert "not a run directory" in caplog.text


def test_stability_heatmaps_one_panel_per_method():
    from cosmic_tl.plots import stability_heatmaps

    positions, e = (-2, -1), torch.eye(3, dtype=torch.float64)
    methods = {
        "cosmic": method_stability(
            "cosmic", [(-1, 2), (-1, 2), (-2, 0), None], [e[0], e[0], e[1], None], positions, 4, 3
        ),
        "refusal_tokens": method_stability("refusal_tokens", [None] * 4, [None] * 4, positions, 4, 3),
    }
    st = Stability(
        methods,
        0,
        4,
        dict(SIZES),
        positions,
        ("\\n", "<|im_start|>"),
        "ace",
        "tiny",
        {"setup": 1.0, "resamples": 2.0, "per_resample": 0.5},
    )
    fig = stability_heatmaps(st)
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 2
    assert heat[0].z[1][2] == 0.5 and heat[0].z[0][0] == 0.25 and heat[1].z[0][0] == 0.0
    titles = [a.text for a in fig.layout.annotations]
    assert "COSMIC: modal (−1, 2) on 2/4" in titles[0] and "no pick on any of 4" in titles[1]
    assert "&lt;|im_start|&gt;" in fig.layout.yaxis.ticktext[1]
    # The report's section: the table, the figure and the run's own pick among the resamples.
    from types import SimpleNamespace

    from cosmic_tl.config import Config
    from cosmic_tl.report import _stability_section

    html = _stability_section(st, Config(), {"cosmic": SimpleNamespace(pick=(-1, 2))})  # type: ignore[dict-item]
    assert "fig-stability" in html and "picked on 2/4 resamples" in html
    assert "the run's own pick (position -1, layer 2): picked on 2/4" in html
    assert "no pick on any resample" in html  # refusal_tokens
