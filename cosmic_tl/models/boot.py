"""Boot a Hugging Face model directory or hub name as a TransformerLens ``TransformerBridge``.

This module knows nothing of aliases or the cache: :mod:`cosmic_tl.models.catalogue`
turns an alias into a directory first. ::

    model = boot("path/to/hf-dir", device="cpu")
    model_id(model)  # 'path/to/hf-dir'
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class ModelSpecError(ValueError):
    """A model spec that names no alias, local directory or reachable hub model."""


def boot(
    source: str | os.PathLike[str],
    *,
    name: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict[str, str | int] | None = None,
    n_devices: int | None = None,
    progress: bool = True,
) -> Any:
    """Boot ``source`` (a local HF directory or hub name) as a ``TransformerBridge`` in eval mode.

    ``name`` is the identity :func:`model_id` reports (default: ``source``). Without
    ``device``, ``device_map`` or ``n_devices`` the model goes to CUDA when there is
    one, else the CPU; ``device_map`` / ``n_devices`` split large models over GPUs.
    ``progress=False`` hides the progress bars ``transformers`` shows while loading.
    """
    from transformer_lens import TransformerBridge

    if device is None and device_map is None and n_devices is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with loading_bars(progress):
        bridge = TransformerBridge.boot_transformers(
            os.fspath(source), device=device, dtype=dtype, device_map=device_map, n_devices=n_devices
        )
    bridge.eval()
    bridge.cfg.cosmic_tl_model_id = os.fspath(source) if name is None else name  # type: ignore[attr-defined]
    return bridge


@contextmanager
def loading_bars(show: bool) -> Iterator[None]:
    """Within the block, ``transformers`` shows its loading progress bars only if ``show``
    (its global switch is put back afterwards)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def model_id(model: Any) -> str:
    """A stable identity for a booted model (its spec, else its HF name)."""
    ident = getattr(model.cfg, "cosmic_tl_model_id", None)
    return str(ident or getattr(model.cfg, "model_name", "unknown"))
