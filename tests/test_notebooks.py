"""Execute the example notebooks 01–03 top to bottom, as a reader would (minutes each on a CPU).

Each notebook runs in a fresh ``python3`` kernel of this interpreter (jupyter_client
starts kernel specs whose command is ``python`` with ``sys.executable``), inherits the
test session's model cache (``COSMIC_TL_CACHE``, set by ``conftest.py``) and works in a
temporary directory. A cell that raises fails the test with the cell's traceback; then
the outputs that show the notebook did its job (figures, tables, the computed
conclusion) are checked by cell id.

Notebooks 01 and 02 need the refusal organisms. Building one is a fine-tune of several
minutes, so this file does not build them: the test is skipped, saying how to build
them, when they are not in the test cache. ``COSMIC_TL_TEST_CACHE=DIR`` points the tests
at a cache where they are built (``COSMIC_TL_CACHE=DIR cosmic-tl build NAME``).
Notebook 04 needs GPUs and hub downloads and is only checked for being stored clean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from cosmic_tl.models import cache_dir, is_cached

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT = 3600  # seconds for one cell: scoring two models with the baseline on a busy CPU is slow
PLOTLY = "application/vnd.plotly.v1+json"
NOT_EXECUTED = "04_large_models_gpu.ipynb"  # needs GPUs and hub downloads

# notebook -> (organisms it needs, {cell id: what its outputs must contain})
# "figures:N" = at least N plotly figures, "html" / "markdown" = a rich display of that type.
CASES: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "01_quickstart.ipynb": (
        ("smollm2-135m-refuse",),
        {"heatmaps": "figures:3", "tables": "html", "rates": "figures:1"},
    ),
    "02_cosmic_vs_refusal_tokens.ipynb": (
        ("smollm2-135m-refuse", "smollm2-135m-refuse-odd"),
        {
            "behaviour": "html",
            "figures": "figures:4",
            "evaluate": "figures:1",
            "discussion": "markdown",
        },
    ),
    "03_weakly_aligned.ipynb": (
        (),
        {
            "heatmaps": "figures:5",
            "rates-table": "figures:1",
            "completions": "html",
            "conclusion": "markdown",
        },
    ),
}


def _cells(nb: Any) -> dict[str, Any]:
    return {cell.get("id"): cell for cell in nb.cells}


def _count(cell: Any, mime: str) -> int:
    return sum(mime in out.get("data", {}) for out in cell.get("outputs", []))


def test_notebooks_are_stored_clean() -> None:
    """The committed notebooks are valid and stored without outputs (CI regenerates them)."""
    for name in [*CASES, NOT_EXECUTED]:
        path = NOTEBOOKS / name
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{name}, cell {cell.get('id')}: stored with outputs; clear them"
                )


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_runs(
    name: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    organisms, expected = CASES[name]
    missing = [o for o in organisms if not is_cached(o)]
    if missing:
        pytest.skip(
            f"{name} needs {', '.join(missing)}, not built in the test cache {cache_dir()}; build with "
            f"`COSMIC_TL_CACHE=DIR cosmic-tl build NAME` and run pytest with COSMIC_TL_TEST_CACHE=DIR"
        )
    if not organisms:
        request.getfixturevalue("smollm2_dir")  # the stock model, built once per session
    # plotly's mimetype renderer: figures become one small JSON output each, whatever the
    # user's own renderer settings.
    monkeypatch.setenv("PLOTLY_RENDERER", "plotly_mimetype")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()  # raises CellExecutionError, with the traceback, if a cell fails

    cells = _cells(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.execution_count is not None, f"{name}: cell {cell.get('id')} did not run"
            assert not [o for o in cell.outputs if o.output_type == "error"]
    for cell_id, what in expected.items():
        assert cell_id in cells, f"{name}: no cell with id {cell_id!r}"
        cell = cells[cell_id]
        if what.startswith("figures:"):
            n = _count(cell, PLOTLY)
            assert n >= int(what.split(":")[1]), f"{name}, cell {cell_id}: {n} figures, expected {what}"
        else:
            mime = {"html": "text/html", "markdown": "text/markdown"}[what]
            assert _count(cell, mime), f"{name}, cell {cell_id}: no {mime} output"
