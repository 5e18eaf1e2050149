"""Settings are checked before any work: one clear line naming the option."""

from __future__ import annotations

import pytest
import torch

from cosmic_tl import cli
from cosmic_tl.config import Config, ConfigError, SelectionSettings, check_device, preset
from cosmic_tl.interventions import Intervention

BAD = [
    (["--alpha", "nan"], "--alpha must be a finite number"),
    (["--alpha", "inf"], "--alpha must be a finite number"),
    (["--kl-threshold", "-1"], "--kl-threshold must be at least 0"),
    (["--kl-threshold", "nan"], "--kl-threshold must be a finite number"),
    (["--max-layer-fraction", "7"], "--max-layer-fraction must be a fraction in (0, 1]"),
    (["--max-layer-fraction", "0"], "--max-layer-fraction must be a fraction in (0, 1]"),
    (["--eval-layer-fraction", "-0.5"], "--eval-layer-fraction must be a fraction in (0, 1]"),
    (["--induce-threshold", "nan"], "--induce-threshold must be a finite number"),
    (["--n-train", "0"], "--n-train must be a whole number of at least 1"),
    (["--n-val", "-2"], "--n-val must be a whole number of at least 1"),
    (["--batch-size", "0"], "--batch-size must be a whole number of at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a whole number of at least 1"),
    (["--refusal-tokens", "auto", "I"], "--refusal-tokens auto cannot be combined"),
    (["--device", "banana"], "--device 'banana' is not a device torch knows"),
    (["--device", "mps"], "--device mps: Apple MPS is not available"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_setting_is_one_clear_line_before_any_work(args, message, tmp_path, caplog):
    caplog.set_level("INFO", logger="cosmic_tl")
    out = tmp_path / "run"
    assert cli.main(["run", "--out", str(out), "--quiet", *args]) == 2
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error:")]
    assert len(errors) == 1 and message in errors[0], caplog.text
    assert "\n" not in errors[0] and not out.exists()  # refused before the run directory


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(ConfigError, match="--device cuda: CUDA is not available"):
        check_device("cuda")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        check_device("cuda:1")


def test_good_settings_pass():
    check_device(None)
    check_device("cpu")
    cfg = preset("paper", alpha=2.5, kl_threshold=0.0, max_layer_fraction=1.0)
    assert cfg.selection.max_layer_fraction == 1.0 and cfg.alpha == 2.5
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_python_settings_are_checked_too():
    with pytest.raises(ConfigError, match="--kl-threshold"):
        SelectionSettings(kl_threshold=-0.1)
    with pytest.raises(ConfigError, match="--n-test must be a whole number"):
        Config(n_test=0)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        Intervention("add", "lce", torch.ones(4), alpha=float("nan"))
