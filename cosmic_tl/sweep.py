"""The one generic (position, layer) sweep: call a metric for each candidate cell.

COSMIC's cosine scores, the refusal-token scores and KL are metrics passed to it by
the planner (:mod:`cosmic_tl.planner`), which decides which cells need them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

Cell = tuple[int, int]  # (pos index, layer)
# A metric maps a chunk of cells to one dict of grid values per cell.
Metric = Callable[[Sequence[Cell]], Sequence[dict[str, float]]]


def cellwise(metric: Callable[[int, int], dict[str, float]]) -> Metric:
    """A :data:`Metric` that calls ``metric(pos_index, layer)`` for each cell of a chunk."""
    return lambda cells: [metric(i, j) for i, j in cells]


def sweep(
    metric: Metric,
    cells: Iterable[Cell],
    shape: tuple[int, int],
    *,
    chunk: int = 1,
    progress: bool = True,
    desc: str = "sweep",
) -> tuple[dict[str, Float[Tensor, "pos layer"]], dict[str, Bool[Tensor, "pos layer"]]]:
    """Call ``metric`` on the cells, ``chunk`` at a time, and collect ``[pos, layer]`` grids.

    A metric that computes many cells at once faster than one by one (the engine's
    logit passes share one unembedding, :meth:`~cosmic_tl.engine.Runner.run_many`)
    gets them ``chunk`` at a time; :func:`cellwise` makes a metric of a function of
    one cell. Returns the grids (NaN where the metric gave no value) and, per grid, a
    mask of the cells the metric filled in (a metric may itself return NaN).

    >>> grids, filled = sweep(cellwise(lambda i, l: {"x": i + l}), [(0, 0), (1, 2)], (2, 3))
    >>> grids["x"][1, 2].item(), bool(filled["x"][0, 1])
    (3.0, False)
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, not {chunk}")
    todo = list(cells)
    grids: dict[str, Tensor] = {}
    filled: dict[str, Tensor] = {}
    with tqdm(total=len(todo), desc=desc, disable=not progress, leave=False) as bar:
        for k in range(0, len(todo), chunk):
            part = todo[k : k + chunk]
            values = metric(part)
            if len(values) != len(part):
                raise ValueError(f"the metric returned {len(values)} results for {len(part)} cells")
            for (i, j), cell_values in zip(part, values, strict=True):
                for name, value in cell_values.items():
                    if name not in grids:
                        grids[name] = torch.full(shape, math.nan, dtype=torch.float64)
                        filled[name] = torch.zeros(shape, dtype=torch.bool)
                    grids[name][i, j] = value
                    filled[name][i, j] = True
            bar.update(len(part))
    return grids, filled
