"""The run directory: its lock, the metrics record, and the artifacts the report reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_cli import _args

from cosmic_tl import cli
from cosmic_tl import pipeline as pipeline_mod
from cosmic_tl.config import Config
from cosmic_tl.engine import Runner
from cosmic_tl.evaluation import Rate
from cosmic_tl.results import MethodMetrics, RunMetrics
from cosmic_tl.rundir import RunDir, RunDirBusy
from cosmic_tl.scoring import Scores, encode_refusal_tokens
from cosmic_tl.templates import chat_prompts

SYSTEM = "You answer like a pirate."


def _run_args(tiny_dir, out, *extra):
    return _args(tiny_dir, out, "--max-new-tokens", "2", *extra)


# ---------------------------------------------------------------- lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_is_refused_naming_its_process(tiny_dir, tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / ".lock").write_text(
            json.dumps({"pid": holder.pid, "host": os.uname().nodename, "command": "cosmic-tl run"})
        )
        with pytest.raises(RunDirBusy, match=f"in use by process {holder.pid}"):
            RunDir(tmp_path).acquire()
        caplog.set_level("INFO", logger="cosmic_tl")
        assert cli.main(_run_args(tiny_dir, tmp_path)) == 2
        assert f"in use by process {holder.pid}" in caplog.text
        assert not (tmp_path / "stages.json").exists()  # nothing was done
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    pid = _dead_pid()
    (tmp_path / ".lock").write_text(json.dumps({"pid": pid, "host": os.uname().nodename}))
    caplog.set_level("WARNING", logger="cosmic_tl")
    with RunDir(tmp_path).lock():
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"process {pid} that held it is no longer running" in caplog.text
    assert not (tmp_path / ".lock").exists()


def test_a_second_process_is_refused_while_a_pipeline_runs(tiny_dir, tmp_path):
    cfg = Config(model=str(tiny_dir), n_train=2, n_val=2, n_test=1)
    probe = (
        "import sys; from pathlib import Path; from cosmic_tl.rundir import RunDir, RunDirBusy\n"
        "try:\n    RunDir(Path(sys.argv[1])).acquire()\nexcept RunDirBusy as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    with pipeline_mod.Pipeline(cfg, tmp_path, progress=False):
        busy = subprocess.run(
            [sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True
        )
    assert busy.returncode == 3, busy.stderr
    assert f"in use by process {os.getpid()}" in busy.stdout
    free = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True)
    assert free.returncode == 0, free.stdout + free.stderr


# ---------------------------------------------------------------- metrics record


def test_metrics_warn_only_when_harmless_refusal_is_surely_above_five_percent():
    def warnings(k: int, n: int) -> tuple[str, ...]:
        return RunMetrics(("I'm sorry",), Rate.of(16, 16), Rate.of(k, n)).warnings

    assert warnings(0, 32) == () and warnings(0, 0) == ()
    assert Rate.of(3, 32).low < 0.05 and warnings(3, 32) == ()  # 9 %, but could be 5 % or less
    assert Rate.of(5, 16).low > 0.05
    (only,) = warnings(5, 16)
    assert "refuses 5 of 16 harmless test prompts" in only and "KL filter" in only


def test_metrics_record_round_trips():
    m = RunMetrics(
        ("I'm sorry",),
        Rate.of(3, 4),
        Rate.of(0, 4),
        {
            "cosmic": MethodMetrics(
                True,
                pick=(-1, 2),
                harmful_ablated=Rate.of(1, 4),
                attack_success=Rate.of(3, 4),
                harmless_added=Rate.of(2, 4),
                kl=0.05,
            ),
            "refusal_tokens": MethodMetrics(False, "all 10 candidates were discarded"),
        },
    )
    again = RunMetrics.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m
    assert m.to_dict()["harmful, no intervention"]["k"] == 3


# ---------------------------------------------------------------- filtered baseline


@pytest.fixture(scope="module")
def filtered_run(tiny_dir, tmp_path_factory):
    """A run with --filter-prompts, --refusal-tokens auto and a system prompt.

    The prompt filter's refusal score is replaced by a spy that records what it was
    given and keeps every prompt (a random model refuses nothing)."""
    out = tmp_path_factory.mktemp("filtered")
    seen: list[tuple[torch.Tensor, tuple[int, ...]]] = []

    def spy(logits, token_ids):
        seen.append((logits.clone(), tuple(token_ids)))
        sign = 1.0 if len(seen) % 2 else -1.0  # harmful first (kept if > 0), then harmless
        return torch.full((logits.shape[0],), sign, dtype=torch.float64)

    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline_mod, "refusal_score", spy)
    try:
        args = ["--filter-prompts", "--refusal-tokens", "auto", "--system-prompt", SYSTEM]
        assert cli.main(_run_args(tiny_dir, out, *args)) == 0
    finally:
        mp.undo()
    return out, seen


def test_filtered_baseline_is_in_the_report(filtered_run):
    out, _ = filtered_run
    html = (out / "report.html").read_text()
    assert "fig-heatmap_bypass" in html
    assert "disabled when scoring" not in html and "baseline: not scored" not in html


def test_filter_uses_the_resolved_refusal_tokens(filtered_run, tiny):
    out, seen = filtered_run
    tokens = json.loads((out / "scores_baseline.json").read_text())["refusal_tokens"]
    assert tokens and tokens != ["auto"]
    assert len(seen) == 4  # train and val, harmful then harmless
    assert all(ids == encode_refusal_tokens(tiny.tokenizer, tokens) for _, ids in seen)


def test_filter_sees_the_prompts_with_the_system_prompt(filtered_run, tiny, tiny_dir):
    out, seen = filtered_run
    cfg = Config.from_dict(json.loads((out / "config.json").read_text()))
    assert cfg.system_prompt == SYSTEM
    val = pipeline_mod.load_run_prompts(cfg)
    names = ("harmful_train", "harmless_train", "harmful_val", "harmless_val")
    for (logits, _), name in zip(seen, names, strict=True):
        prompts = chat_prompts(tiny.tokenizer, val[name], system=SYSTEM)
        expected = Runner(tiny, prompts, batch_size=4, share_prefix=False).clean.logits
        assert expected is not None
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    scores = Scores.load(out / "scores_baseline")
    assert "bypass" in scores.grids and "bypass" not in Scores.load(out / "scores").grids
