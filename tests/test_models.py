"""Model specs, the alias cache (atomic, corruption-detecting), clear errors, and the
import direction inside cosmic_tl.models."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cosmic_tl import models
from cosmic_tl.models import Alias, CacheError, ModelSpecError, is_cached, resolve_spec
from cosmic_tl.models.cache import ensure, is_built

ROOT = Path(__file__).resolve().parents[1]


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


def test_build_is_told_whether_to_show_progress(fake_alias, tmp_path):
    seen = []

    def build(out, *, progress=True):
        seen.append(progress)
        (out / "config.json").write_text("{}")
        return {}

    ensure(Alias("quiet-model", "for tests", build), progress=False)
    ensure(Alias("loud-model", "for tests", build))
    assert seen == [False, True]
    alias, calls = fake_alias  # a build callable without the keyword works as before
    ensure(alias, progress=False)
    assert len(calls) == 1


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


def test_unknown_alias_names_are_errors():
    for call in (models.ensure_alias, is_cached, models.organism_judge, models.build_organism):
        with pytest.raises(ModelSpecError, match="no-such-model"):
            call("no-such-model")


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


# ---------------------------------------------------------------- import direction


def _module_names() -> dict[str, Path]:
    """Every module of the cosmic_tl package by dotted name (a package by its __init__)."""
    out = {}
    for path in sorted((ROOT / "cosmic_tl").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The cosmic_tl modules that the import statements of one module name, lazy ones included.

    ``from pkg import x`` names the submodule ``pkg.x`` when there is one, else ``pkg``.
    A package's ``__init__`` that Python runs before a submodule is not counted: only
    what the statements written in the module name.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules}


# Which parts of cosmic_tl.models each part may import ("" is the package itself, which
# re-exports the catalogue): catalogue -> organisms, stock, cache, boot; organisms -> boot.
ALLOWED = {
    "": {"boot", "cache", "catalogue", "organisms"},
    "catalogue": {"boot", "cache", "organisms", "stock"},
    "organisms": {"boot", "organisms"},
    "stock": {"boot"},
    "cache": set(),
    "boot": set(),
}


def _part(module: str) -> str:
    rest = module.removeprefix("cosmic_tl.models")
    return rest.split(".")[1] if rest else ""


def test_imports_inside_models_run_one_way():
    modules = _module_names()
    inside = sorted(m for m in modules if m == "cosmic_tl.models" or m.startswith("cosmic_tl.models."))
    assert {_part(m) for m in inside} == set(ALLOWED)
    wrong = [
        f"{m} imports {t}"
        for m in inside
        for t in sorted(_imported(m, modules[m], modules))
        if (t == "cosmic_tl.models" or t.startswith("cosmic_tl.models.")) and t != m
        if _part(t) not in ALLOWED[_part(m)]
    ]
    assert not wrong, wrong


def test_no_import_circle_reachable_from_models():
    modules = _module_names()
    graph = {m: _imported(m, p, modules) - {m} for m, p in modules.items()}
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, " -> ".join((*path[path.index(m) :], m))
        if m in done:
            return
        for t in sorted(graph[m]):
            visit(t, (*path, m))
        done.add(m)

    visit("cosmic_tl.models", ())
    assert {"cosmic_tl.models.catalogue", "cosmic_tl.models.organisms.builder"} <= done


def test_boot_hides_loading_bars_only_when_asked(
    tiny_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from transformers.utils import logging as hf_logging

    from cosmic_tl.models.boot import boot

    boot(tiny_dir, device="cpu", progress=True)
    shown = capfd.readouterr().err
    boot(tiny_dir, device="cpu", progress=False)
    hidden = capfd.readouterr().err
    assert "Loading weights" in shown  # transformers' own bar, shown by default
    assert "Loading weights" not in hidden
    assert hf_logging.is_progress_bar_enabled()  # the global switch is put back
