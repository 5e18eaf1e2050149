"""The self-contained HTML report of a run directory (plotly.js embedded, works offline)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from plotly.offline import get_plotlyjs

from cosmic_tl.audit import BEHAVIOUR, Audit
from cosmic_tl.bootstrap import Stability
from cosmic_tl.config import Config
from cosmic_tl.evaluation import Rate
from cosmic_tl.results import RunMetrics
from cosmic_tl.rundir import RunDir, relative_links, run_methods
from cosmic_tl.scoring import Scores
from cosmic_tl.selection import Selection
from cosmic_tl.store import atomic_write_bytes, read_json

METHOD_LABELS = {
    "cosmic": "COSMIC",
    "refusal_tokens": "refusal-token baseline (Arditi et al.)",
    "substring": "substring baseline (COSMIC paper)",
}
CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f4f4f4}.fig{margin:1.5em 0}.warn{color:#a40}code{background:#f4f4f4;padding:0 .2em}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _rate(r: Rate | None) -> str:
    if r is None:
        return "–"
    return f"{r.rate:.0%} [{r.low:.0%}, {r.high:.0%}] ({r.k}/{r.n})"


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_esc(a)}</th><td>{b}</td></tr>" for a, b in rows) + "</table>"


def _load(path: Path, kind: Any) -> Any:
    return kind.load(path) if path.with_suffix(".json").exists() else None


def render(dir_: RunDir, cfg: Config) -> str:
    """The report's HTML text for a run directory."""
    from cosmic_tl.plots import refusal_bars, summary_figures

    methods = run_methods(cfg)
    scores: Scores | None = _load(dir_.scores_for("cosmic", cfg), Scores)
    base_scores: Scores | None = _load(dir_.scores_for("refusal_tokens", cfg), Scores)
    picks: dict[str, Selection | None] = {m: _load(dir_.selection(m), Selection) for m in methods}
    cosmic, base = picks.get("cosmic"), picks.get("refusal_tokens")
    metrics = RunMetrics.load(dir_.metrics) if dir_.metrics.exists() else None
    comparison = dict(read_json(dir_.comparison)) if dir_.comparison.exists() else {}
    parts = [f"<h1>cosmic_tl run: {_esc(cfg.model)}</h1>"]
    summary = [
        ("model", _esc(cfg.model)),
        ("mode", _esc(cfg.mode.upper())),
        ("prompts (train / val / test per set)", f"{cfg.n_train} / {cfg.n_val} / {cfg.n_test}"),
    ]
    for method, sel in picks.items():
        if sel is None:
            continue
        text = (
            f"position {sel.position}, layer {sel.layer}"
            if sel.found
            else f"<span class=warn>none: {_esc(sel.message)}</span>"
        )
        text += "".join(f"<br>note: {_esc(n)}" for n in sel.notes)
        text += "".join(f"<br><span class=warn>warning: {_esc(w)}</span>" for w in sel.warnings)
        summary.append((f"{METHOD_LABELS.get(method, method)} pick", text))
    for method, c in comparison.items():
        if not isinstance(c, dict):
            continue
        label = METHOD_LABELS.get(method, method)
        summary.append((f"COSMIC vs {label}: same pick", _esc(c.get("same_pick"))))
        if c.get("direction_cosine") is not None:
            summary.append(
                (f"COSMIC vs {label}: cosine of the directions", f"{c['direction_cosine']:.3f}")
            )
        for key, who in (
            ("cosmic_rank_under_baseline", "COSMIC's pick"),
            ("baseline_rank_under_cosmic", "its pick"),
        ):
            among = c.get("cosmic_rank_among" if key.startswith("cosmic") else "baseline_rank_among")
            if c.get(key) is not None:
                score = label if key.startswith("cosmic") else "COSMIC"
                summary.append(
                    (f"COSMIC vs {label}: rank of {who} under {score}'s score", f"{c[key]} of {among}")
                )
    timings = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in dir_.timings().items())
    summary.append(("stage timings (s)", _esc(timings or "–")))
    parts.append("<h2>Summary</h2>" + _table(summary))
    if metrics is not None:
        rows = [
            ("judge phrases", _esc(", ".join(metrics.judge_phrases))),
            ("harmful, no intervention", _rate(metrics.harmful_clean)),
            ("harmless, no intervention", _rate(metrics.harmless_clean)),
        ]
        for method, m in metrics.methods.items():
            if not m.found:
                rows.append((f"{method}", "no direction to evaluate"))
                continue
            rows += [
                (f"{method}: refusal on harmful, direction ablated", _rate(m.harmful_ablated)),
                (f"{method}: attack success rate", _rate(m.attack_success)),
                (f"{method}: refusal on harmless, direction added", _rate(m.harmless_added)),
                (f"{method}: KL on harmless", "–" if m.kl is None else f"{m.kl:.4f}"),
            ]
        warn = "".join(f"<p><span class=warn>warning: {_esc(w)}</span></p>" for w in metrics.warnings)
        parts.append("<h2>Evaluation (refusal rates, Wilson 95% intervals)</h2>" + _table(rows) + warn)
    audit = _load(dir_.audit, Audit)
    if audit is not None:
        parts.append(_audit_section(audit))
    figures = (
        summary_figures(scores, cosmic, base, base_scores, picks.get("substring"))
        if scores is not None
        else {}
    )
    if metrics is not None:
        bars = {
            "harmful, no intervention": metrics.harmful_clean,
            "harmless, no intervention": metrics.harmless_clean,
        }
        picked = metrics.methods.get("cosmic")
        if picked is not None and picked.found:
            assert picked.harmful_ablated is not None and picked.harmless_added is not None
            bars["harmful, COSMIC ablated"] = picked.harmful_ablated
            bars["harmless, COSMIC added"] = picked.harmless_added
        figures["refusal_rates"] = refusal_bars(bars, title="Refusal rates")
    stability: Stability | None = _load(dir_.stability, Stability)
    if stability is not None:
        parts.append(_stability_section(stability, cfg, picks))
    if audit is not None:
        from cosmic_tl.plots import audit_heatmap, audit_scatter

        figures["audit_heatmap"] = audit_heatmap(audit)
        figures["audit_proxy"] = audit_scatter(audit)
    parts.append("<h2>Figures</h2>")
    for name, fig in figures.items():
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}")
        parts.append(f"<div class=fig id='{_esc(name)}'>{div}</div>")
    links = "".join(f"<li><a href='{_esc(p)}'>{_esc(p)}</a></li>" for p in relative_links(dir_.root))
    parts.append(f"<h2>Raw files</h2><ul>{links}</ul>")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>cosmic_tl report</title>"
        f"<style>{CSS}</style><script type='text/javascript'>{get_plotlyjs()}</script></head>"
        f"<body>{''.join(parts)}</body></html>"
    )


def _stability_section(st: Stability, cfg: Config, run_picks: dict[str, Selection | None]) -> str:
    """The picks over bootstrap resamples: a table per method and the frequency heatmaps."""
    from cosmic_tl.plots import stability_heatmaps

    rows = [
        ("resamples (seed)", f"{st.resamples} (seed {st.seed})"),
        ("prompts per resample", _esc(", ".join(f"{k} {v}" for k, v in st.sizes.items()))),
        (
            "time",
            f"{st.seconds['setup']:.1f} s shared work, {st.seconds['per_resample']:.1f} s per resample",
        ),
    ]
    if st.mode != cfg.mode:
        rows.append(("note", "<span class=warn>computed for another mode than this run's</span>"))
    for name, m in st.methods.items():
        label = METHOD_LABELS.get(name, name)
        if m.modal is None:
            text = "<span class=warn>no pick on any resample</span>"
        else:
            r = m.modal_share
            text = (
                f"modal cell: position {m.modal[0]}, layer {m.modal[1]}, picked on {r.k}/{r.n} "
                f"resamples ({r.rate:.0%} [{r.low:.0%}, {r.high:.0%}], Wilson 95%)"
            )
        cos = "–" if math.isnan(m.mean_cosine) else f"{m.mean_cosine:.3f}"
        text += f"; no pick on {m.n_none}; mean pairwise cosine of the picked directions {cos}"
        own = run_picks.get(name)
        if own is not None and own.pick is not None:
            r = Rate.of(m.picks.count(own.pick), st.resamples)
            text += (
                f"<br>the run's own pick (position {own.pick[0]}, layer {own.pick[1]}): picked on "
                f"{r.k}/{r.n} resamples [{r.low:.0%}, {r.high:.0%}]"
            )
        rows.append((label, text))
    fig = stability_heatmaps(st).to_html(full_html=False, include_plotlyjs=False, div_id="fig-stability")
    return (
        "<h2>Stability over bootstrap resamples of the train and val prompts</h2>"
        + _table(rows)
        + f"<div class=fig id='stability'>{fig}</div>"
    )


def _cell(c: Any) -> str:
    return "–" if c is None else f"position {c[0]}, layer {c[1]}"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _audit_section(audit: Audit) -> str:
    """The audit's per-method table and every audited candidate, best first."""
    st = audit.settings
    intro = (
        f"<p>{len(audit.rows)} candidates evaluated by generation on {st.get('n_harmful')} harmful "
        f"and {st.get('n_harmless')} harmless test prompts (top {st.get('k')} per method, the "
        f"picks, {st.get('stratified')} stratified; seed {st.get('seed')}) in "
        f"{audit.stats.get('seconds', 0.0):.0f} s. Behaviour = {_esc(BEHAVIOUR)}; no intervention: "
        f"ASR {_rate(audit.clean.asr)}, refusal on harmless {_rate(audit.clean.induced)}.</p>"
    )
    head = (
        "<tr><th>method</th><th>pick</th><th>pick's behaviour</th><th>best audited</th>"
        "<th>best's behaviour</th><th>regret</th><th>best passing the filters</th>"
        "<th>regret (passing)</th><th>filter that removed the best</th>"
        "<th>Spearman (proxy, behaviour)</th></tr>"
    )
    body = ""
    for m, s in audit.methods.items():
        pick = (
            _cell(s.pick) if s.pick is not None else f"<span class=warn>none: {_esc(s.message)}</span>"
        )
        removed = "–" if s.best_removed_by is None else (_esc(s.best_removed_by) or "none (kept)")
        rho = "–" if s.spearman is None else f"{s.spearman:.2f} (n = {s.n_spearman})"
        if 0 <= s.n_ranked < s.n_candidates:
            rho += f"<br><span class=warn>ranked: {s.n_ranked} of {s.n_candidates} scored</span>"
        body += (
            f"<tr><td>{_esc(METHOD_LABELS.get(m, m))}</td><td>{pick}</td><td>{_num(s.pick_score)}</td>"
            f"<td>{_cell(s.best)}</td><td>{_num(s.best_score)}</td><td>{_num(s.regret)}</td>"
            f"<td>{_cell(s.best_kept)}</td><td>{_num(s.regret_kept)}</td><td>{removed}</td>"
            f"<td>{rho}</td></tr>"
        )
    cand = (
        "<tr><th>candidate</th><th>set</th><th>why audited</th><th>behaviour</th>"
        "<th>ASR (ablated)</th><th>refusal (added)</th><th>KL</th><th>Δ cross-entropy</th>"
        "<th>filters</th></tr>"
    )
    for r in sorted(audit.rows, key=lambda r: (-r.behaviour.score, r.source, r.cell)):
        b = r.behaviour
        fates = ", ".join(f"{m}: {why or 'kept'}" for m, why in r.reasons.items())
        cand += (
            f"<tr><td>{_cell(r.cell)}</td><td>{_esc(r.source)}</td><td>{_esc(' '.join(r.labels))}</td>"
            f"<td>{_num(b.score)}</td><td>{_rate(b.asr)}</td><td>{_rate(b.induced)}</td>"
            f"<td>{_esc(b.kl)}</td><td>{_esc(b.ce)}</td><td>{_esc(fates)}</td></tr>"
        )
    return (
        "<h2>Audit (behaviour of many candidates)</h2>"
        + intro
        + f"<table>{head}{body}</table><details><summary>every audited candidate</summary>"
        + f"<table>{cand}</table></details>"
    )


def write_report(dir_: RunDir, cfg: Config) -> Path:
    """Render and atomically write ``report.html``."""
    return atomic_write_bytes(dir_.report, render(dir_, cfg).encode())
