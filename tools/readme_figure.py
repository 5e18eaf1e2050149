"""Render a run's main report figure to a PNG with headless Chromium (for the README).

The main figure is COSMIC's ranking (``S_abl + S_add``) beside the refusal-token
baseline's (``bypass``) with both picks marked, or COSMIC's ranking alone when the run
has no baseline grids. Needs the ``chromium`` binary (``apt-get install chromium``).

    python tools/readme_figure.py runs/smollm2-135m-refuse-ace docs/img/main-figure.png
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from plotly.offline import get_plotlyjs

from cosmic_tl.plots import summary_figures
from cosmic_tl.scoring import Scores
from cosmic_tl.selection import Selection

WIDTH, HEIGHT = 1400, 560


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished run directory")
    ap.add_argument("png", type=Path, help="where to write the image")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Chromium on the PATH (apt-get install chromium)")

    scores = Scores.load(args.run / "scores")
    cosmic = Selection.load(args.run / "selection_cosmic")
    base_path = args.run / "selection_refusal_tokens"
    base = Selection.load(base_path) if base_path.with_suffix(".json").exists() else None
    figs = summary_figures(scores, cosmic, base)
    fig = figs.get("comparison", figs["heatmap_cosmic_ranking"])
    fig.update_layout(width=WIDTH, height=HEIGHT)
    div = fig.to_html(full_html=False, include_plotlyjs=False, config={"staticPlot": True})
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<script>{get_plotlyjs()}</script></head><body style='margin:0'>{div}</body></html>"
    )
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "figure.html"
        html.write_text(page, encoding="utf-8")
        args.png.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--window-size={WIDTH},{HEIGHT}",
                "--virtual-time-budget=5000",
                f"--screenshot={args.png.resolve()}",
                html.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
