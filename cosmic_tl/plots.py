"""Plotly figures from results: score heatmaps, layer cosines, the comparison, refusal rates.

Every function takes result objects (:class:`~cosmic_tl.scoring.Scores`,
:class:`~cosmic_tl.selection.Selection`, :class:`~cosmic_tl.evaluation.Rate`) and returns a
``plotly.graph_objects.Figure``; nothing here writes files or prints (the report layer
does). In a notebook::

    fig = score_heatmap(scores, "S_abl+S_add", selection=pick)
    fig.show()

Heatmaps put the candidate's layer ``l`` (it acts on the input of block ``l``) on x and its
end-of-instruction position on y, first template token at the top.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Bool, Float
from plotly.subplots import make_subplots
from torch import Tensor

from cosmic_tl.audit import Audit, AuditRow
from cosmic_tl.bootstrap import Stability
from cosmic_tl.evaluation import Rate
from cosmic_tl.scoring import Scores, cosine
from cosmic_tl.selection import Selection

GRID_NAMES = (
    "S_abl",
    "S_add",
    "S_abl+S_add",
    "KL",
    "bypass",
    "induce",
    "KL_linear",
    "bypass_mode",
    "induce_mode",
)
_LOG_ODDS = ("bypass", "induce", "bypass_mode", "induce_mode")
_KL = ("KL", "KL_linear")
NOT_COMPUTED = "not computed (cannot change the pick)"
KL_FLOOR = 1e-6  # KL is drawn as log10(max(KL, floor)): exact zeros would stretch the scale
REASONS = {
    "late_layer": "late layer (l ≥ ⌊0.8·n⌋)",
    "last_position": "position −1 rule (layer beyond both argmax medians)",
    "nan": "a score is NaN",
    "kl": "KL on harmless prompts above the threshold",
    "induce": "induce score below the threshold",
    "zero_direction": "zero direction (changes nothing)",
    "late_last_position": "position −1 at a late layer (l ≥ int(0.6·n))",
}
# (symbol, colour) of the discarded-candidate markers, one legend entry per reason.
REASON_MARKERS = {
    "late_layer": ("x", "rgba(60,60,60,0.45)"),
    "last_position": ("triangle-down", "rgba(0,0,0,0.75)"),
    "nan": ("circle-open", "rgba(0,0,0,0.85)"),
    "kl": ("x", "rgba(0,0,0,0.85)"),
    "induce": ("square-open", "rgba(0,0,0,0.75)"),
    "zero_direction": ("circle", "rgba(120,120,120,0.6)"),
    "late_last_position": ("triangle-down", "rgba(60,60,60,0.45)"),
}
PICK_STYLE = {  # method → (symbol, colour, short name)
    "cosmic": ("star", "gold", "COSMIC"),
    "refusal_tokens": ("diamond", "magenta", "baseline"),
    "substring": ("hexagon", "cyan", "substring"),
}
TITLES = {
    "S_abl": "S_abl: ablated harmful vs harmless baseline (higher is better)",
    "S_add": "S_add: added harmless vs harmful baseline (higher is better)",
    "S_abl+S_add": "COSMIC ranking S_abl + S_add (higher is better)",
    "KL": "KL(clean ‖ ablated) on harmless prompts (lower is better)",
    "bypass": "bypass: refusal log-odds, harmful, ablated (lower is better)",
    "induce": "induce: refusal log-odds, harmless, added (higher is better)",
    "KL_linear": "KL(clean ‖ linearly ablated) on harmless prompts (lower is better)",
    "bypass_mode": "bypass (mode's interventions): refusal log-odds, harmful, ablated (lower is better)",
    "induce_mode": "induce (mode's interventions): refusal log-odds, harmless, added (higher is better)",
}


def _pos(p: int) -> str:
    """A position with a typographic minus, as in the docs (−1 is the last token)."""
    return str(p).replace("-", "−")


def _tick_labels(scores: Scores) -> list[str]:
    """``"−k: <token>"``, HTML-escaped: plotly would read ``<|im_end|>`` as a tag."""
    return [
        f"{_pos(p)}: {html.escape(label, quote=False)}"
        for p, label in zip(scores.positions, scores.position_labels, strict=True)
    ]


def _masked(
    grid: Float[Tensor, "pos layer"], computed: Bool[Tensor, "pos layer"]
) -> Float[np.ndarray, "pos layer"]:
    """The grid as float64 numpy with every uncomputed cell set to NaN."""
    out = grid.detach().double().cpu().numpy().copy()
    out[~computed.cpu().numpy()] = np.nan
    return out


def grid_values(
    scores: Scores, name: str
) -> tuple[Float[np.ndarray, "pos layer"], Bool[np.ndarray, "pos layer"]]:
    """``(values, computed)`` of a named grid; ``S_abl+S_add`` is summed on the fly."""
    if name not in GRID_NAMES:
        raise ValueError(f"unknown grid {name!r}; choose one of {', '.join(GRID_NAMES)}")
    parts = ("S_abl", "S_add") if name == "S_abl+S_add" else (name,)
    missing = [p for p in parts if p not in scores.grids]
    if missing:
        raise ValueError(
            f"these scores have no {missing[0]!r} grid"
            + (" (refusal-token baseline disabled)" if missing[0] in (*_LOG_ODDS, "KL_linear") else "")
        )
    done = np.logical_and.reduce([scores.computed[p].cpu().numpy() for p in parts])
    values = sum(_masked(scores.grids[p], scores.computed[p]) for p in parts)
    return np.asarray(values, dtype=np.float64), done


def _as_z(values: np.ndarray) -> list[list[float | None]]:
    """Nested lists with None for NaN, which plotly leaves blank."""
    return [[None if math.isnan(v) else float(v) for v in row] for row in values.tolist()]


def _fmt(v: float) -> str:
    return "NaN" if math.isnan(v) else f"{v:.4g}"


def _hover(scores: Scores, name: str, values: np.ndarray, done: np.ndarray) -> list[list[str]]:
    """Per-cell hover: the cell, the plotted value and every other score computed there."""
    text = []
    for i, (p, label) in enumerate(zip(scores.positions, scores.position_labels, strict=True)):
        row = []
        for j in range(scores.n_layers):
            head = f"position {_pos(p)} ({html.escape(label, quote=False)}), layer {j}"
            if not done[i, j]:
                row.append(f"{head}<br>{name}: {NOT_COMPUTED}")
                continue
            others = [
                f"{k} = {_fmt(float(g[i, j]))}"
                for k, g in scores.grids.items()
                if k != name and bool(scores.computed[k][i, j])
            ]
            row.append(f"{head}<br><b>{name} = {_fmt(float(values[i, j]))}</b><br>" + " · ".join(others))
        text.append(row)
    return text


def _clean_cosine(scores: Scores) -> float:
    """S_abl and S_add without intervention: both equal cos(b_harmful, b_harmless)."""
    if "cos_harmful_harmless" in scores.clean:
        return float(scores.clean["cos_harmful_harmless"])
    return cosine(scores.b_harmful, scores.b_harmless)


def _colour(scores: Scores, name: str, values: np.ndarray, kl_threshold: float) -> dict[str, Any]:
    """Heatmap z and colour settings for one grid (see :func:`score_heatmap`)."""
    if name in _KL:
        with np.errstate(invalid="ignore"):
            z = np.log10(np.maximum(values, KL_FLOOR))
        finite = z[np.isfinite(z)]
        lo, hi = (math.floor(finite.min()), math.ceil(finite.max())) if finite.size else (-3, 0)
        ticks = list(range(lo, max(hi, lo + 1) + 1))
        return {
            "z": z,
            "colorscale": "RdBu_r",
            "zmid": math.log10(kl_threshold),
            "colorbar": {
                "title": {"text": "KL (log)"},
                "tickvals": ticks,
                "ticktext": [f"1e{t}" for t in ticks],
            },
        }
    if name in _LOG_ODDS:
        return {"z": values, "colorscale": "RdBu_r", "zmid": 0.0, "colorbar": {"title": {"text": name}}}
    clean = _clean_cosine(scores) * (2 if name == "S_abl+S_add" else 1)
    return {"z": values, "colorscale": "BrBG", "zmid": clean, "colorbar": {"title": {"text": name}}}


def _heatmap_trace(scores: Scores, name: str, kl_threshold: float = 0.1) -> go.Heatmap:
    values, done = grid_values(scores, name)
    style = _colour(scores, name, values, kl_threshold)
    return go.Heatmap(
        x=list(range(scores.n_layers)),
        y=list(scores.positions),
        z=_as_z(style.pop("z")),
        hovertext=_hover(scores, name, values, done),
        hoverinfo="text",
        hoverongaps=True,
        name=name,
        **style,
    )


def _discarded_traces(scores: Scores, selection: Selection, prefix: str = "") -> list[go.Scatter]:
    """One marker trace per discard reason, with the reason in each marker's hover."""
    cells: dict[str, list[tuple[int, int]]] = {}
    for i, row in enumerate(selection.reasons):
        for j, reason in enumerate(row):
            if reason:
                cells.setdefault(reason, []).append((j, scores.positions[i]))
    traces = []
    for reason, xy in cells.items():
        symbol, colour = REASON_MARKERS.get(reason, ("x", "black"))
        why = REASONS.get(reason, reason)
        traces.append(
            go.Scatter(
                x=[x for x, _ in xy],
                y=[y for _, y in xy],
                mode="markers",
                marker={"symbol": symbol, "color": colour, "size": 8, "line": {"width": 1.5}},
                name=f"{prefix}discarded: {reason} ({len(xy)})",
                legendgroup=f"{prefix}{reason}",
                hovertext=[
                    f"position {_pos(y)}, layer {x}<br>discarded ({reason}): {why}" for x, y in xy
                ],
                hoverinfo="text",
            )
        )
    return traces


def _pick_trace(selection: Selection, *, showlegend: bool = True) -> go.Scatter | None:
    """A large marker on the selected cell; None when the method found nothing."""
    if selection.pick is None:
        return None
    position, layer = selection.pick
    symbol, colour, short = PICK_STYLE.get(selection.method, ("star", "gold", selection.method))
    return go.Scatter(
        x=[layer],
        y=[position],
        mode="markers",
        marker={"symbol": symbol, "color": colour, "size": 18, "line": {"width": 2, "color": "black"}},
        name=f"{short} pick ({_pos(position)}, layer {layer})",
        legendgroup=f"pick-{selection.method}",
        showlegend=showlegend,
        hovertext=[f"{short} pick: position {_pos(position)}, layer {layer}"],
        hoverinfo="text",
    )


def _mark_eval_layers(fig: go.Figure, scores: Scores, **where: int) -> None:
    """Dashed column outlines at COSMIC's evaluation layers (the residual after block j)."""
    layers = sorted(scores.eval_layers)
    label = f"evaluation layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"
    for n, j in enumerate(layers):
        fig.add_vrect(
            x0=j - 0.5,
            x1=j + 0.5,
            line={"dash": "dash", "color": "black", "width": 1.5},
            fillcolor="rgba(0,0,0,0)",
            name=label,
            legendgroup="eval",
            showlegend=n == 0 and where.get("col", 1) == 1,
            annotation_text="eval",
            annotation_position="top",
            **where,
        )


def _axes(fig: go.Figure, scores: Scores, **where: int) -> None:
    fig.update_xaxes(title_text="layer l (candidate acts on the input of block l)", **where)
    fig.update_yaxes(
        title_text="end-of-instruction position",
        tickvals=list(scores.positions),
        ticktext=_tick_labels(scores),
        autorange="reversed",
        **where,
    )


def score_heatmap(
    scores: Scores,
    name: str,
    *,
    selection: Selection | None = None,
    title: str | None = None,
    show_discarded: bool = True,
    kl_threshold: float = 0.1,
) -> go.Figure:
    """Layer × position heatmap of one grid, with a selection's discards and pick.

    ``name`` is ``S_abl``, ``S_add``, ``S_abl+S_add``, ``KL``, ``bypass`` or ``induce``.
    Uncomputed cells are blank (hover: "not computed"). Colour scales are diverging
    around the value that separates good from bad: for the S grids the no-intervention
    value ``cos(b_harmful, b_harmless)`` (twice that for the sum), so colour says whether a
    candidate moves the activations the intended way; for ``bypass``/``induce`` log-odds
    0 (red = refusal more likely); KL is drawn on a log10 scale centred at ``kl_threshold``
    (red = discarded by the KL filter), since its values span orders of magnitude.
    """
    fig = go.Figure(_heatmap_trace(scores, name, kl_threshold))
    if selection is not None:
        if show_discarded:
            fig.add_traces(_discarded_traces(scores, selection))
        if selection.pick is not None:
            fig.add_trace(_pick_trace(selection))
            position, layer = selection.pick
            fig.add_shape(
                type="rect",
                x0=layer - 0.5,
                x1=layer + 0.5,
                y0=position - 0.5,
                y1=position + 0.5,
                line={"color": "black", "width": 3},
                name="pick",
            )
            fig.add_annotation(
                x=layer, y=position, text=f"pick: {_pos(position)}, layer {layer}", ax=40, ay=-30
            )
    _mark_eval_layers(fig, scores)
    _axes(fig, scores)
    if title is None:
        title = f"{TITLES[name]} — {scores.model_id}, {scores.mode}"
        if selection is not None and not selection.found:
            title += "<br><sup>no candidate survived the filters</sup>"
    fig.update_layout(
        title=title,
        height=max(320, 140 + 45 * len(scores.positions)),
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def layer_cosine_curve(scores: Scores) -> go.Figure:
    """Per-layer cosine of harmful and harmless mean evaluation activations.

    COSMIC evaluates at the least similar layers (``L_low``), marked in red: where the
    two prompt sets differ most, so a candidate's effect is easiest to read.
    """
    layers = list(range(scores.n_layers))
    cos = scores.layer_cosines.double().cpu().tolist()
    evals = sorted(scores.eval_layers)
    fig = go.Figure(
        go.Scatter(
            x=layers,
            y=cos,
            mode="lines+markers",
            name="cos(mean harmful, mean harmless)",
            hovertemplate="layer %{x}: cos = %{y:.5f}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=evals,
            y=[cos[j] for j in evals],
            mode="markers",
            marker={"color": "red", "size": 12, "symbol": "circle-open", "line": {"width": 3}},
            name=f"evaluation layers L_low ({len(evals)})",
            hovertemplate="evaluation layer %{x}: cos = %{y:.5f}<extra></extra>",
        )
    )
    for j in evals:
        fig.add_vline(
            x=j, line={"dash": "dot", "color": "red", "width": 1}, name=f"evaluation layer {j}"
        )
    fig.update_layout(
        title=f"Harmful vs harmless mean evaluation activations — {scores.model_id}",
        xaxis_title="layer j (residual after block j)",
        yaxis_title="cosine similarity",
    )
    return fig


def _status(selection: Selection | None, short: str) -> str:
    if selection is None:
        return f"{short}: not run"
    if selection.pick is None:
        return f"{short}: no candidate survived"
    return f"{short}: {_pos(selection.pick[0])}, layer {selection.pick[1]}"


def comparison_figure(
    scores: Scores,
    cosmic: Selection | None,
    baseline: Selection | None,
    baseline_scores: Scores | None = None,
) -> go.Figure:
    """COSMIC's ranking beside the baseline's ``bypass`` grid, both picks on both panels.

    Each panel shows its own method's discarded candidates. ``baseline_scores`` holds
    the baseline's grids when they were scored apart (on filtered prompts), else
    ``scores`` does. Without refusal-token grids the right panel says so; a baseline
    that found nothing is named in the title.
    """
    right_scores = baseline_scores if baseline_scores is not None else scores
    has_baseline = "bypass" in right_scores.grids
    fig = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        horizontal_spacing=0.14,
        subplot_titles=(
            "COSMIC: S_abl + S_add (higher is better)",
            "baseline: bypass (lower is better)" if has_baseline else "baseline: not scored",
        ),
    )
    left = _heatmap_trace(scores, "S_abl+S_add")
    left.colorbar.update(x=0.44, len=0.9)  # left panel ends at 0.43
    fig.add_trace(left, row=1, col=1)
    if cosmic is not None:
        fig.add_traces(_discarded_traces(scores, cosmic, "COSMIC "), rows=1, cols=1)
    if has_baseline:
        right = _heatmap_trace(right_scores, "bypass")
        right.colorbar.update(x=1.01, len=0.9)
        fig.add_trace(right, row=1, col=2)
        if baseline is not None:
            fig.add_traces(_discarded_traces(right_scores, baseline, "baseline "), rows=1, cols=2)
    else:
        fig.add_annotation(
            text="no refusal-token grids:<br>the baseline was disabled when scoring",
            xref="x2 domain",
            yref="y2 domain",
            x=0.5,
            y=0.5,
            showarrow=False,
        )
    for col in (1, 2):
        for sel in (cosmic, baseline):
            trace = _pick_trace(sel, showlegend=col == 1) if sel is not None else None
            if trace is not None:
                fig.add_trace(trace, row=1, col=col)
        if col == 1:
            _mark_eval_layers(fig, scores, row=1, col=col)
        elif has_baseline:
            _mark_eval_layers(fig, right_scores, row=1, col=col)
        _axes(fig, scores, row=1, col=col)
    fig.update_yaxes(title_text="", row=1, col=2)
    same = cosmic is not None and baseline is not None and cosmic.found and cosmic.pick == baseline.pick
    title = f"{_status(cosmic, 'COSMIC')} · {_status(baseline, 'baseline')}"
    if same:
        title += " (same pick)"
    fig.update_layout(
        title=f"COSMIC vs refusal-token baseline — {scores.model_id}<br><sup>{title}</sup>",
        height=max(360, 160 + 45 * len(scores.positions)),
        legend={"orientation": "h", "y": -0.3},
    )
    return fig


def refusal_bars(
    rates: Mapping[str, Rate], *, title: str = "Refusal rates (95% Wilson intervals)"
) -> go.Figure:
    """One bar per rate with its Wilson interval as asymmetric error bars; y in [0, 1].

    The interval, not just the rate, is what tells two conditions apart on ~100 prompts.
    """
    labels = list(rates)
    values = [r.rate if r.n else math.nan for r in rates.values()]
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=values,
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [r.high - r.rate if r.n else 0.0 for r in rates.values()],
                "arrayminus": [r.rate - r.low if r.n else 0.0 for r in rates.values()],
            },
            text=[f"{r.k}/{r.n}" if r.n else "no items" for r in rates.values()],
            textposition="inside",
            hovertext=[
                f"{label}: {r.rate:.1%} [{r.low:.1%}, {r.high:.1%}] ({r.k}/{r.n})"
                if r.n
                else f"{label}: no judged items"
                for label, r in rates.items()
            ],
            hoverinfo="text",
        )
    )
    fig.update_layout(title=title, yaxis={"range": [0, 1], "tickformat": ".0%", "title": "rate"})
    return fig


def summary_figures(
    scores: Scores,
    cosmic: Selection | None = None,
    baseline: Selection | None = None,
    baseline_scores: Scores | None = None,
    substring: Selection | None = None,
) -> dict[str, go.Figure]:
    """Every figure that applies to these results, keyed by a file-friendly name.

    Keys: ``layer_cosines``, ``heatmap_cosmic_ranking``, ``heatmap_s_abl``,
    ``heatmap_s_add``, ``heatmap_kl`` and, with baseline grids (in ``scores``, or in
    ``baseline_scores`` when the baseline was scored apart), ``heatmap_bypass``,
    ``heatmap_induce`` and (given a COSMIC selection) ``comparison``; with a substring
    selection, ``heatmap_bypass_mode``.
    """
    figs = {
        "layer_cosines": layer_cosine_curve(scores),
        "heatmap_cosmic_ranking": score_heatmap(scores, "S_abl+S_add", selection=cosmic),
        "heatmap_s_abl": score_heatmap(scores, "S_abl", selection=cosmic, show_discarded=False),
        "heatmap_s_add": score_heatmap(scores, "S_add", selection=cosmic, show_discarded=False),
        "heatmap_kl": score_heatmap(scores, "KL", selection=cosmic),
    }
    if substring is not None and "bypass_mode" in scores.grids:
        figs["heatmap_bypass_mode"] = score_heatmap(scores, "bypass_mode", selection=substring)
    bs = baseline_scores if baseline_scores is not None else scores
    if "bypass" in bs.grids and "induce" in bs.grids:
        figs["heatmap_bypass"] = score_heatmap(bs, "bypass", selection=baseline)
        figs["heatmap_induce"] = score_heatmap(bs, "induce", selection=baseline)
        if cosmic is not None:
            figs["comparison"] = comparison_figure(scores, cosmic, baseline, baseline_scores)
    return figs


def stability_heatmaps(stability: Stability) -> go.Figure:
    """How often each (position, layer) cell is picked over the bootstrap resamples, one
    heatmap per method (share of resamples; hover: the count).

    Each panel's title gives the modal cell with its share and Wilson interval, the
    resamples without a pick and the mean pairwise cosine of the picked directions.
    """
    names = list(stability.methods)
    b = stability.resamples
    titles = []
    for name in names:
        m = stability.methods[name]
        short = PICK_STYLE.get(name, ("", "", name))[2]
        if m.modal is None:
            titles.append(f"{short}: no pick on any of {b} resamples")
            continue
        share = m.modal_share
        cos = "–" if math.isnan(m.mean_cosine) else f"{m.mean_cosine:.3f}"
        titles.append(
            f"{short}: modal ({_pos(m.modal[0])}, {m.modal[1]}) on {share.k}/{b} "
            f"[{share.low:.0%}, {share.high:.0%}]; no pick {m.n_none}; mean cos {cos}"
        )
    fig = make_subplots(rows=len(names), cols=1, subplot_titles=titles, vertical_spacing=0.12)
    ticks = [
        f"{_pos(p)}: {html.escape(label, quote=False)}"
        for p, label in zip(stability.positions, stability.position_labels, strict=True)
    ]
    for row, name in enumerate(names, start=1):
        freq = stability.methods[name].frequency.double().cpu().numpy()
        hover = [
            [f"position {_pos(p)}, layer {j}: picked {int(c)} of {b}" for j, c in enumerate(line)]
            for p, line in zip(stability.positions, freq.tolist(), strict=True)
        ]
        fig.add_trace(
            go.Heatmap(
                z=(freq / b).tolist(),
                x=list(range(freq.shape[1])),
                y=list(stability.positions),
                zmin=0.0,
                zmax=1.0,
                colorscale="Blues",
                colorbar={"title": "share", "tickformat": ".0%"},
                showscale=row == 1,
                hovertext=hover,
                hoverinfo="text",
            ),
            row=row,
            col=1,
        )
        fig.update_yaxes(
            tickvals=list(stability.positions), ticktext=ticks, autorange="reversed", row=row, col=1
        )
        fig.update_xaxes(title_text="layer l", row=row, col=1)
    fig.update_layout(
        title=f"Picks over {b} bootstrap resamples (seed {stability.seed}) — "
        f"{stability.model_id}, {stability.mode}",
        height=max(360, 60 + (120 + 45 * len(stability.positions)) * len(names)),
    )
    return fig


# ---------------------------------------------------------------- the audit


def _audit_hover(row: AuditRow) -> str:
    b = row.behaviour
    reasons = ", ".join(f"{m}: {r or 'kept'}" for m, r in row.reasons.items())
    return (
        f"position {_pos(row.position)}, layer {row.layer}<br>behaviour {_fmt(b.score)}<br>"
        f"ASR (ablated) {b.asr}<br>induced refusal (added) {b.induced}<br>KL {b.kl}<br>"
        f"Δ cross-entropy {b.ce}<br>{html.escape(', '.join(row.labels))}<br>{html.escape(reasons)}"
    )


def audit_heatmap(audit: Audit) -> go.Figure:
    """The audited candidates' behaviour over the (position, layer) grid, picks marked.

    Sparse: cells that were not audited are blank. Only the rows of the first candidate
    set (COSMIC's) are drawn; a baseline on filtered prompts has its own set.
    """
    source = audit.rows[0].source if audit.rows else ""
    rows = [r for r in audit.rows if r.source == source]
    z = np.full((len(audit.positions), audit.n_layers), np.nan)
    text = [["not audited"] * audit.n_layers for _ in audit.positions]
    for r in rows:
        i = audit.positions.index(r.position)
        z[i, r.layer] = r.behaviour.score
        text[i][r.layer] = _audit_hover(r)
    fig = go.Figure(
        go.Heatmap(
            z=_as_z(z),
            x=list(range(audit.n_layers)),
            y=list(audit.positions),
            text=text,
            hoverinfo="text",
            colorscale="Viridis",
            zmin=0.0,
            zmax=1.0,
            colorbar={"title": "behaviour"},
        )
    )
    for method, summary in audit.methods.items():
        if summary.pick is None or method not in (rows[0].reasons if rows else {}):
            continue
        symbol, colour, short = PICK_STYLE.get(method, ("star", "gold", method))
        fig.add_trace(
            go.Scatter(
                x=[summary.pick[1]],
                y=[summary.pick[0]],
                mode="markers",
                marker={"symbol": symbol, "color": colour, "size": 16, "line": {"width": 2}},
                name=f"{short} pick",
                hoverinfo="skip",
            )
        )
    fig.update_xaxes(title_text="layer l (candidate acts on the input of block l)")
    fig.update_yaxes(
        title_text="end-of-instruction position",
        tickvals=list(audit.positions),
        ticktext=[
            f"{_pos(p)}: {html.escape(label, quote=False)}"
            for p, label in zip(audit.positions, audit.position_labels, strict=True)
        ],
        autorange="reversed",
    )
    fig.update_layout(
        title=f"Audit: behaviour of {len(rows)} candidates (mean of ASR ablated and refusal "
        f"added) — {audit.model_id}, {audit.mode}",
        height=max(320, 140 + 45 * len(audit.positions)),
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def audit_scatter(audit: Audit) -> go.Figure:
    """Each method's proxy (its ranking score) against behaviour over the audited
    candidates, kept ones filled, filtered ones open, the pick marked; Spearman in the title."""
    methods = list(audit.methods)
    titles = []
    for m in methods:
        rho = audit.methods[m].spearman
        rho_text = f"{rho:.2f}" if rho is not None else "n/a"
        titles.append(f"{PICK_STYLE.get(m, ('', '', m))[2]}: Spearman {rho_text}")
    fig = make_subplots(rows=1, cols=max(1, len(methods)), subplot_titles=titles or None)
    for col, m in enumerate(methods, 1):
        rows = [r for r in audit.rows_of(m) if r.proxy.get(m) is not None]
        for kept in (True, False):
            pool = [r for r in rows if (r.reasons[m] == "") == kept]
            if not pool:
                continue
            fig.add_trace(
                go.Scatter(
                    x=[r.proxy[m] for r in pool],
                    y=[r.behaviour.score for r in pool],
                    mode="markers",
                    marker={
                        "symbol": "circle" if kept else "circle-open",
                        "size": 9,
                        "color": "#1f77b4" if kept else "#d62728",
                    },
                    name="passes the filters" if kept else "removed by a filter",
                    legendgroup=str(kept),
                    showlegend=col == 1,
                    text=[_audit_hover(r) for r in pool],
                    hoverinfo="text",
                ),
                row=1,
                col=col,
            )
        pick = audit.methods[m].pick
        hit = [r for r in rows if r.cell == pick]
        if hit:
            symbol, colour, short = PICK_STYLE.get(m, ("star", "gold", m))
            fig.add_trace(
                go.Scatter(
                    x=[hit[0].proxy[m]],
                    y=[hit[0].behaviour.score],
                    mode="markers",
                    marker={"symbol": symbol, "color": colour, "size": 16, "line": {"width": 2}},
                    name=f"{short} pick",
                    hoverinfo="skip",
                ),
                row=1,
                col=col,
            )
        better = "higher" if m == "cosmic" else "lower"
        fig.update_xaxes(title_text=f"{_RANKING_NAMES.get(m, m)} ({better} is better)", row=1, col=col)
    fig.update_yaxes(title_text="behaviour", range=[-0.05, 1.05])
    fig.update_layout(
        title="Audit: proxy against behaviour", height=420, legend={"orientation": "h", "y": -0.3}
    )
    return fig


_RANKING_NAMES = {"cosmic": "S_abl + S_add", "refusal_tokens": "bypass", "substring": "bypass (mode)"}
