"""The cosmic-tl command end to end on the tiny model: stages, resume, recompute, interrupts."""

from __future__ import annotations

import json
import shutil

import pytest

from cosmic_tl import cli
from cosmic_tl.config import Config, preset
from cosmic_tl.evaluation import Rate


def _args(tiny_dir, out, *extra):
    return [
        "run",
        "--model",
        str(tiny_dir),
        "--out",
        str(out),
        "--n-train",
        "4",
        "--n-val",
        "3",
        "--n-test",
        "2",
        "--max-new-tokens",
        "3",
        "--batch-size",
        "4",
        "--quiet",
        "--kl-threshold",
        "1e9",
        *extra,
    ]


def _stages(out):
    return json.loads((out / "stages.json").read_text())


@pytest.fixture(scope="module")
def first_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert cli.main(_args(tiny_dir, out)) == 0
    return out


def test_run_writes_every_artifact(first_run):
    for name in (
        "config.json",
        "candidates.safetensors",
        "candidates.json",
        "scores.safetensors",
        "scores.json",
        "selection_cosmic.json",
        "selection_refusal_tokens.json",
        "comparison.json",
        "direction.safetensors",
        "direction.json",
        "metrics.json",
        "report.html",
        "completions/harmful_baseline.jsonl",
    ):
        assert (first_run / name).exists(), name
    assert not list(first_run.rglob("*.tmp"))
    metrics = json.loads((first_run / "metrics.json").read_text())
    assert metrics["cosmic"]["found"] and metrics["harmful, no intervention"]["n"] == 2
    report = (first_run / "report.html").read_text()
    kl = metrics["cosmic"]["KL"]
    assert f"<th>cosmic: KL on harmless</th><td>{kl:.4f}</td>" in report  # rounded for reading
    stages = _stages(first_run)
    assert f"candidates {stages['candidates']['seconds']:.1f}" in report
    cfg = Config.from_dict(json.loads((first_run / "config.json").read_text()))
    assert cfg.n_train == 4 and cfg.selection.kl_threshold == 1e9


def test_report_warns_when_the_model_refuses_harmless_prompts(first_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(first_run, out)
    assert "the model refuses" not in (out / "report.html").read_text()  # 0 of 2 refused
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["harmless, no intervention"] = Rate.of(2, 2).to_dict()  # interval from 34 %
    (out / "metrics.json").write_text(json.dumps(metrics))
    assert cli.main(["report", "--out", str(out)]) == 0
    report = (out / "report.html").read_text()
    assert "warning: the model refuses 2 of 2 harmless test prompts" in report


def test_report_shows_a_selections_notes(first_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(first_run, out)
    record = out / "selection_cosmic.json"
    meta = json.loads(record.read_text())
    assert meta["notes"] == []  # the tiny run's KL threshold of 1e9 drops nothing
    meta["notes"] = ["2 higher-ranked candidates were dropped by the KL filter, the best at …"]
    record.write_text(json.dumps(meta))
    assert cli.main(["report", "--out", str(out)]) == 0
    assert "<br>note: 2 higher-ranked candidates were dropped" in (out / "report.html").read_text()


def test_evaluate_stage_prints_the_over_refusal_warning(
    first_run, tmp_path, monkeypatch, caplog, tiny_dir
):
    import cosmic_tl.pipeline as pipeline
    from cosmic_tl.evaluation import SubstringJudge

    out = tmp_path / "copy"
    shutil.copytree(first_run, out)
    # A judge that calls every completion a refusal (none has a million characters):
    # only the evaluate stage recomputes, and the tiny model now "refuses" 2 of 2.
    monkeypatch.setattr(pipeline, "run_judge", lambda cfg: SubstringJudge(("x",), min_chars=10**6))
    caplog.set_level("INFO", logger="cosmic_tl")
    assert cli.main(_args(tiny_dir, out)) == 0
    assert "[scores] up to date" in caplog.text
    assert "warning: the model refuses 2 of 2 harmless test prompts" in caplog.text
    assert json.loads((out / "metrics.json").read_text())["harmless, no intervention"]["k"] == 2


def test_second_run_reuses_and_changed_setting_recomputes(first_run, tiny_dir, caplog):
    before = _stages(first_run)
    caplog.set_level("INFO", logger="cosmic_tl")
    assert cli.main(_args(tiny_dir, first_run)) == 0
    assert _stages(first_run) == before
    assert "[scores] up to date" in caplog.text
    assert cli.main(_args(tiny_dir, first_run, "--max-new-tokens", "4")) == 0
    after = _stages(first_run)
    for stage in ("candidates", "scores", "select"):
        assert after[stage] == before[stage]
    assert after["evaluate"]["key"] != before["evaluate"]["key"]
    assert cli.main(_args(tiny_dir, first_run, "--mode", "lce")) == 0
    again = _stages(first_run)
    assert (
        again["candidates"] == after["candidates"] and again["scores"]["key"] != after["scores"]["key"]
    )


def test_interrupted_stage_resumes(tiny_dir, tmp_path, monkeypatch):
    import cosmic_tl.pipeline as pipeline

    real = pipeline.score_candidates

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "score_candidates", boom)
    assert cli.main(_args(tiny_dir, tmp_path)) == 130
    assert "candidates" in _stages(tmp_path) and "scores" not in _stages(tmp_path)
    assert not (tmp_path / "scores.json").exists()
    monkeypatch.setattr(pipeline, "score_candidates", real)
    cand_key = _stages(tmp_path)["candidates"]
    assert cli.main(_args(tiny_dir, tmp_path)) == 0
    assert _stages(tmp_path)["candidates"] == cand_key and "evaluate" in _stages(tmp_path)


def test_refuses_to_mix_models(first_run, capsys, caplog):
    caplog.set_level("INFO", logger="cosmic_tl")
    assert (
        cli.main(["candidates", "--model", "smollm2-135m-instruct", "--out", str(first_run), "--quiet"])
        == 2
    )
    assert "holds a run of model" in caplog.text


def test_bad_options(tmp_path, caplog):
    with pytest.raises(SystemExit):
        cli.main(["run", "--preset", "nope"])
    with pytest.raises(SystemExit):
        cli.main(["run", "--mode", "sideways"])
    caplog.set_level("INFO", logger="cosmic_tl")
    assert (
        cli.main(
            [
                "run",
                "--harmful-train",
                str(tmp_path / "missing.json"),
                "--out",
                str(tmp_path / "r"),
                "--model",
                "smollm2-135m-instruct",
            ]
        )
        == 2
    )
    assert "missing.json" in caplog.text


def test_read_only_output_dir(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    caplog.set_level("INFO", logger="cosmic_tl")
    assert cli.main(["run", "--out", str(blocker / "run"), "--model", "smollm2-135m-instruct"]) == 2
    assert "cannot write to the run directory" in caplog.text


def test_presets_and_options_map_onto_config():
    ns = cli.build_parser().parse_args(
        [
            "run",
            "--preset",
            "paper",
            "--n-val",
            "7",
            "--no-baseline",
            "--refusal-tokens",
            "I",
            "As",
            "--kl-threshold",
            "0.2",
        ]
    )
    cfg = cli.config_from_args(ns)
    assert cfg == preset("paper", n_val=7, baseline=False, refusal_tokens=("I", "As"), kl_threshold=0.2)
    assert cfg.n_train == 180 and cfg.max_new_tokens == 512


def test_models_command(caplog):
    caplog.set_level("INFO", logger="cosmic_tl")
    assert cli.main(["models"]) == 0
    assert "smollm2-135m-instruct" in caplog.text


def test_export_command(first_run, tmp_path):
    from cosmic_tl.models import load_model

    assert cli.main(["export", "--out", str(first_run), "--to", str(tmp_path / "edited")]) == 0
    edited = load_model(tmp_path / "edited", device="cpu")
    assert (tmp_path / "edited" / "config.json").exists() and edited.cfg.n_layers == 4
    assert cli.main(["export", "--out", str(first_run), "--to", str(tmp_path / "edited")]) == 2


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(
    _chromium() is None, reason="needs Chromium (apt-get install chromium); CI installs it"
)
def test_report_renders_in_chromium(first_run, tmp_path):
    """Open report.html offline in headless Chromium: every figure must have drawn its SVG."""
    import re
    import subprocess

    html = (first_run / "report.html").read_text()
    assert "<script src=" not in html  # self-contained: plotly.js is inline
    figure_ids = re.findall(r"<div class=fig id='([^']+)'", html)
    assert len(figure_ids) >= 5
    dom = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path}",
            "--virtual-time-budget=20000",
            "--dump-dom",
            (first_run / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for fig in figure_ids:
        start = dom.index(f'id="{fig}"')
        nxt = dom.find('class="fig"', start + 1)
        section = dom[start : nxt if nxt > 0 else len(dom)]
        assert "main-svg" in section, f"figure {fig} did not draw"
