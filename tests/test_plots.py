"""Figures from hand-made scores and selections (no model)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from jaxtyping import install_import_hook

from cosmic_tl.evaluation import Rate
from cosmic_tl.scoring import Scores
from cosmic_tl.selection import Selection, select_cosmic, select_refusal_tokens

with install_import_hook("cosmic_tl.plots", "beartype.beartype"):
    from cosmic_tl import plots

POS = (-3, -2, -1)
LABELS = ("<|im_end|>", "\\n", "assistant")
N = 10  # layers 8 and 9 are "late"
EVAL = (2, 5)


def make(baseline: bool = True) -> Scores:
    """COSMIC picks (-2, 3) after (-3, 4) is dropped for KL; the baseline picks (-3, 1)."""
    z = lambda: torch.zeros(len(POS), N, dtype=torch.float64)  # noqa: E731
    a, s, kl = z() + 0.5, z() + 0.5, z() + 0.01
    a[0, 4], s[0, 4], kl[0, 4] = 1.0, 1.0, 0.7  # best ranking, KL too high
    a[1, 3], s[1, 3] = 0.9, 0.9
    grids = {"S_abl": a, "S_add": s, "KL": kl}
    if baseline:
        bypass, induce = z() + 1.0, z() - 1.0
        induce[0, 1], bypass[0, 1] = 0.5, -2.0
        grids |= {"bypass": bypass, "induce": induce, "KL_linear": kl.clone()}
    computed = {k: torch.ones_like(v, dtype=torch.bool) for k, v in grids.items()}
    for name in ("S_abl", "KL"):  # a cell the engine skipped
        grids[name][2, 6] = math.nan
        computed[name][2, 6] = False
    cos = torch.linspace(0.99, 0.9, N, dtype=torch.float64)
    return Scores(
        grids,
        computed,
        POS,
        LABELS,
        EVAL,
        cos,
        torch.tensor([1.0, 0.0, 0.0, 0.0]),
        torch.tensor([0.6, 0.8, 0.0, 0.0]),
        "ace",
        1.0,
        "tiny",
    )


def empty_baseline(scores: Scores) -> Selection:
    grids = dict(scores.grids) | {"induce": torch.zeros(len(POS), N, dtype=torch.float64) - 3}
    sel = select_refusal_tokens(dataclasses.replace(scores, grids=grids))
    assert not sel.found
    return sel


def traces(fig: go.Figure, prefix: str) -> list:
    return [t for t in fig.data if (t.name or "").startswith(prefix)]


def z_of(fig: go.Figure) -> np.ndarray:
    return np.array(fig.data[0].z, dtype=float)  # None → NaN


def test_selections_are_as_the_tests_expect():
    sc = make()
    assert select_cosmic(sc).pick == (-2, 3)
    assert select_refusal_tokens(sc).pick == (-3, 1)


def test_heatmap_axes_ticks_and_uncomputed_cells():
    fig = plots.score_heatmap(make(), "S_abl")
    assert fig.layout.xaxis.title.text.startswith("layer")
    assert fig.layout.yaxis.title.text == "end-of-instruction position"
    assert list(fig.layout.yaxis.tickvals) == list(POS)
    ticks = list(fig.layout.yaxis.ticktext)
    assert ticks[0] == "−3: &lt;|im_end|&gt;" and ticks[2] == "−1: assistant"
    z = z_of(fig)
    assert z.shape == (3, N) and math.isnan(z[2, 6]) and fig.data[0].z[2][6] is None
    assert "not computed (cannot change the pick)" in fig.data[0].hovertext[2][6]
    assert "S_abl = 0.5" in fig.data[0].hovertext[0][0]
    # diverging around the no-intervention cosine cos(b_harmful, b_harmless) = 0.6
    assert fig.data[0].zmid == pytest.approx(0.6)


def test_ranking_heatmap_marks_pick_discards_and_eval_layers():
    sc = make()
    sel = select_cosmic(sc)
    fig = plots.score_heatmap(sc, "S_abl+S_add", selection=sel)
    z = z_of(fig)
    assert z[1, 3] == pytest.approx(1.8) and math.isnan(z[2, 6])  # one part uncomputed
    assert fig.layout.yaxis.ticktext[1] == "−2: \\n"
    (pick,) = traces(fig, "COSMIC pick")
    assert list(pick.x) == [3] and list(pick.y) == [-2]
    assert any(s.name == "pick" and s.x0 == 2.5 and s.y0 == -2.5 for s in fig.layout.shapes)
    assert any("pick: −2, layer 3" in a.text for a in fig.layout.annotations)
    (kl,) = traces(fig, "discarded: kl")
    assert list(kl.x) == [4] and list(kl.y) == [-3] and "KL" in kl.hovertext[0]
    (late,) = traces(fig, "discarded: late_layer")
    assert len(late.x) == 2 * 3 and set(late.x) == {8, 9}
    assert all("discarded (late_layer)" in h for h in late.hovertext)
    evals = [s for s in fig.layout.shapes if (s.name or "").startswith("evaluation layer")]
    assert sorted(s.x0 for s in evals) == [1.5, 4.5] and sum(bool(s.showlegend) for s in evals) == 1
    fig.to_json()  # serialises (NaN-free z)


def test_kl_heatmap_is_log_scaled_around_the_threshold():
    fig = plots.score_heatmap(make(), "KL", kl_threshold=0.1)
    z = z_of(fig)
    assert z[0, 0] == pytest.approx(-2.0) and z[0, 4] == pytest.approx(math.log10(0.7))
    assert math.isnan(z[2, 6]) and fig.data[0].zmid == pytest.approx(-1.0)
    assert "1e-2" in fig.data[0].colorbar.ticktext


def test_baseline_heatmap_and_errors():
    sc = make()
    fig = plots.score_heatmap(sc, "bypass", selection=select_refusal_tokens(sc))
    (pick,) = traces(fig, "baseline pick")
    assert (pick.x[0], pick.y[0]) == (1, -3)
    (induce,) = traces(fig, "discarded: induce")
    assert "induce score below the threshold" in induce.hovertext[0]
    with pytest.raises(ValueError, match="baseline disabled"):
        plots.score_heatmap(make(baseline=False), "bypass")
    with pytest.raises(ValueError, match="unknown grid"):
        plots.score_heatmap(sc, "S_sum")


def test_layer_cosine_curve_marks_eval_layers():
    sc = make()
    fig = plots.layer_cosine_curve(sc)
    assert fig.layout.xaxis.title.text.startswith("layer") and fig.layout.yaxis.title.text
    assert list(fig.data[0].y) == pytest.approx(sc.layer_cosines.tolist())
    (ev,) = traces(fig, "evaluation layers")
    assert list(ev.x) == list(EVAL)
    assert sorted(s.x0 for s in fig.layout.shapes) == list(EVAL)


def test_comparison_marks_both_picks_on_both_panels():
    sc = make()
    fig = plots.comparison_figure(sc, select_cosmic(sc), select_refusal_tokens(sc))
    assert [t.type for t in fig.data].count("heatmap") == 2
    for prefix, xy in (("COSMIC pick", (3, -2)), ("baseline pick", (1, -3))):
        found = traces(fig, prefix)
        assert sorted(t.xaxis for t in found) == ["x", "x2"]
        assert all((t.x[0], t.y[0]) == xy for t in found)
    assert list(fig.layout.yaxis.ticktext) == list(fig.layout.yaxis2.ticktext)
    assert traces(fig, "COSMIC discarded") and traces(fig, "baseline discarded")


def test_comparison_without_a_baseline_pick_or_grids():
    sc = make()
    fig = plots.comparison_figure(sc, select_cosmic(sc), empty_baseline(sc))
    assert "baseline: no candidate survived" in fig.layout.title.text
    assert not traces(fig, "baseline pick") and len(traces(fig, "COSMIC pick")) == 2
    bare = make(baseline=False)
    fig = plots.comparison_figure(bare, select_cosmic(bare), None)
    assert [t.type for t in fig.data].count("heatmap") == 1
    assert "baseline: not run" in fig.layout.title.text
    assert any("disabled" in a.text for a in fig.layout.annotations)


def test_refusal_bars_error_bars_are_the_wilson_bounds():
    rates = {
        "harmful, baseline": Rate.of(90, 100),
        "harmful, ablated": Rate.of(7, 100),
        "harmless, baseline": Rate.of(1, 100),
        "harmless, added": Rate.of(0, 0),
    }
    fig = plots.refusal_bars(rates)
    bar = fig.data[0]
    assert list(bar.x) == list(rates) and tuple(fig.layout.yaxis.range) == (0, 1)
    for i, r in enumerate(list(rates.values())[:3]):
        assert bar.y[i] + bar.error_y.array[i] == pytest.approx(r.high)
        assert bar.y[i] - bar.error_y.arrayminus[i] == pytest.approx(r.low)
    assert math.isnan(bar.y[3]) and bar.text[3] == "no items"


def test_summary_figures():
    sc = make()
    cosmic, baseline = select_cosmic(sc), select_refusal_tokens(sc)
    figs = plots.summary_figures(sc, cosmic, baseline)
    assert set(figs) == {
        "layer_cosines",
        "heatmap_cosmic_ranking",
        "heatmap_s_abl",
        "heatmap_s_add",
        "heatmap_kl",
        "heatmap_bypass",
        "heatmap_induce",
        "comparison",
    }
    assert all(isinstance(f, go.Figure) for f in figs.values())
    assert not traces(figs["heatmap_s_abl"], "discarded") and traces(
        figs["heatmap_s_abl"], "COSMIC pick"
    )
    bare = plots.summary_figures(make(baseline=False))
    assert set(bare) == {
        "layer_cosines",
        "heatmap_cosmic_ranking",
        "heatmap_s_abl",
        "heatmap_s_add",
        "heatmap_kl",
    }
