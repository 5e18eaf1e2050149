"""Model specs, the alias cache (atomic, corruption-detecting) and clear errors."""

from __future__ import annotations

import pytest

from cosmic_tl import models
from cosmic_tl.models import Alias, CacheError, ModelSpecError, is_cached, resolve_spec
from cosmic_tl.models.cache import ensure, is_built


@pytest.fixture
def fake_alias(monkeypatch, tmp_path):
    monkeypatch.setenv("COSMIC_TL_CACHE", str(tmp_path / "cache"))
    calls = []

    def build(out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "weights.bin").write_bytes(b"x" * 100)
        return {"recipe": "fake"}

    return Alias("fake-model", "for tests", build), calls


def test_alias_builds_once_and_detects_corruption(fake_alias):
    alias, calls = fake_alias
    path = ensure(alias)
    assert is_built(alias) and len(calls) == 1
    ensure(alias)
    assert len(calls) == 1  # cached
    (path / "weights.bin").write_bytes(b"x" * 10)  # truncated file
    assert not is_built(alias)
    ensure(alias)
    assert len(calls) == 2 and is_built(alias)
    assert models.read_card("fake-model") == {"recipe": "fake"}


def test_interrupted_build_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("COSMIC_TL_CACHE", str(tmp_path / "cache"))

    def build(out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    alias = Alias("broken-model", "for tests", build)
    with pytest.raises(KeyboardInterrupt):
        ensure(alias)
    assert not is_built(alias)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_cache_path_that_is_a_file(fake_alias, monkeypatch, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    monkeypatch.setenv("COSMIC_TL_CACHE", str(blocker))
    with pytest.raises(CacheError, match="writable"):
        ensure(fake_alias[0])


def test_spec_resolution(tmp_path):
    assert resolve_spec("smollm2-135m-instruct") == ("alias", "smollm2-135m-instruct")
    assert resolve_spec("Qwen/Qwen2.5-7B-Instruct") == ("hub", "Qwen/Qwen2.5-7B-Instruct")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_spec(tmp_path) == ("dir", str(tmp_path))
    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve_spec(tmp_path.parent)
    with pytest.raises(ModelSpecError, match="unknown model spec"):
        resolve_spec("./does/not/exist")
    with pytest.raises(ModelSpecError, match="unknown model spec"):
        resolve_spec("a/b/c")


def test_hub_name_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises((ModelSpecError, OSError), match="hub|offline|local"):
        models.load_model("nonexistent-org/nonexistent-model-xyz", device="cpu")


def test_smollm2_alias_loads(smollm2):
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.d_model == 576
    assert is_cached("smollm2-135m-instruct")
