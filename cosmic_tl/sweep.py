"""The one generic (position, layer) sweep: call a metric for each candidate cell.

COSMIC's cosine scores, the refusal-token scores and KL are metrics passed to it by
the planner (:mod:`cosmic_tl.planner`), which decides which cells need them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

Cell = tuple[int, int]  # (pos index, layer)
Metric = Callable[[int, int], dict[str, float]]


def sweep(
    metric: Metric,
    cells: Iterable[Cell],
    shape: tuple[int, int],
    *,
    progress: bool = True,
    desc: str = "sweep",
) -> tuple[dict[str, Float[Tensor, "pos layer"]], dict[str, Bool[Tensor, "pos layer"]]]:
    """Call ``metric(pos_index, layer)`` for each cell and collect ``[pos, layer]`` grids.

    Returns the grids (NaN where the metric gave no value) and, per grid, a mask of
    the cells the metric filled in (a metric may itself return NaN).

    >>> grids, filled = sweep(lambda i, l: {"x": i + l}, [(0, 0), (1, 2)], (2, 3))
    >>> grids["x"][1, 2].item(), bool(filled["x"][0, 1])
    (3.0, False)
    """
    todo = list(cells)
    grids: dict[str, Tensor] = {}
    filled: dict[str, Tensor] = {}
    for i, j in tqdm(todo, desc=desc, disable=not progress, leave=False):
        for name, value in metric(i, j).items():
            if name not in grids:
                grids[name] = torch.full(shape, math.nan, dtype=torch.float64)
                filled[name] = torch.zeros(shape, dtype=torch.bool)
            grids[name][i, j] = value
            filled[name][i, j] = True
    return grids, filled


# ---------------------------------------------------------------------- scoring
