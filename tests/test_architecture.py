"""The import graph drawn from the code: every module in a layer, imports only downwards,
no circle (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "cosmic_tl"

# Lower numbers are lower layers; a module may import its own layer or lower ones.
LAYERS: dict[str, int] = {
    "store": 0,
    "config": 0,
    "sweep": 0,
    "prompts": 0,
    "models.boot": 0,
    "templates": 1,
    "models.cache": 1,
    "models.organisms.rephrasing": 1,
    "formats": 2,
    "activations": 2,
    "interventions": 2,
    "models.stock": 2,
    "candidates": 3,
    "engine": 3,
    "scoring": 3,
    "selection": 4,
    "metrics": 4,
    "comparison": 5,
    "planner": 5,
    "evaluation": 6,
    "bootstrap": 6,
    "export": 6,
    "gguf_export": 6,
    "gguf_tokenizer": 0,
    "audit": 6,
    "plots": 6,
    "models.organisms.texts": 7,
    "models.organisms.recipes": 7,
    "models.organisms.training": 7,
    "models.organisms.builder": 7,
    "models.organisms.planted": 7,
    "models.organisms": 7,
    "models.catalogue": 8,
    "models": 8,
    "results": 9,
    "rundir": 9,
    "report": 10,
    "pipeline": 11,
    "cli": 12,
    "": 12,  # the package's __init__: the public API
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:`` (not run, not edges)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def _edges() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):  # function-level imports count too
            if getattr(node, "lineno", None) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cosmic_tl"):
                base = node.module.removeprefix("cosmic_tl").lstrip(".")
                for alias in node.names:
                    sub = f"{base}.{alias.name}".lstrip(".")
                    targets.append(sub if sub in mods else base)
            elif isinstance(node, ast.Import):
                targets = [
                    a.name.removeprefix("cosmic_tl").lstrip(".")
                    for a in node.names
                    if a.name.startswith("cosmic_tl")
                ]
            deps.update(t for t in targets if t != name)
        edges[name] = deps
    return edges


def test_every_module_has_a_layer():
    assert set(_modules()) == set(LAYERS), "place new modules in LAYERS and docs/architecture.md"


def test_imports_only_go_down():
    wrong = [
        f"{a or 'cosmic_tl'} (layer {LAYERS[a]}) imports {b} (layer {LAYERS[b]})"
        for a, deps in _edges().items()
        for b in deps
        if LAYERS[b] > LAYERS[a]
    ]
    assert not wrong, wrong


def test_no_import_circle():
    edges = _edges()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_the_check_sees_a_planted_upward_import(tmp_path, monkeypatch):
    """The graph is really drawn from the source: an added upward import is caught."""
    fake = tmp_path / "cosmic_tl"
    for path in ROOT.rglob("*.py"):
        target = fake / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (fake / "store.py").write_text(
        (fake / "store.py").read_text() + "\nfrom cosmic_tl.cli import main\n"
    )
    monkeypatch.setattr(__import__(__name__), "ROOT", fake)
    try:
        test_imports_only_go_down()
    except AssertionError as err:
        assert "store (layer 0) imports cli" in str(err)
    else:
        raise AssertionError("the planted import was not seen")
