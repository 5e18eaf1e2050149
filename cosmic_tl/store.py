"""Atomic writes of JSON and safetensors files (the only file formats we write).

Every file is written to a temporary sibling and renamed into place, so a reader
never sees a half-written file and an interrupted run leaves the old file intact.
Nothing is ever unpickled: tensors are safetensors, metadata is JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, with the path in the error if it is malformed."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def write_tensors(path: str | os.PathLike[str], tensors: dict[str, Tensor]) -> Path:
    """Atomically write tensors as safetensors (contiguous CPU copies)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_tensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a safetensors file onto the CPU."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such tensor file: {path}")
    return dict(load_file(str(path), device="cpu"))


class RecordError(ValueError):
    """A record's files are missing, of another kind, or do not belong together."""


def record_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(<path>.safetensors, <path>.json)`` for a record named by ``path`` (any suffix dropped)."""
    base = Path(path).with_suffix("")
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


def save_record(
    path: str | os.PathLike[str], kind: str, tensors: dict[str, Tensor], meta: dict[str, Any]
) -> Path:
    """Write a record: ``tensors`` as ``<path>.safetensors``, ``meta`` as ``<path>.json``.

    The JSON names the record's ``kind`` and the shape of every tensor; it is written
    last, so a record whose JSON exists is complete. Returns the JSON path.
    """
    tensor_path, json_path = record_paths(path)
    write_tensors(tensor_path, tensors)
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    return write_json(json_path, {"kind": kind, "tensors": shapes, **meta})


def load_record(path: str | os.PathLike[str], kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a record written by :func:`save_record`; ``(tensors, meta)``.

    Raises :class:`RecordError` if the JSON is of another kind or the tensor file does
    not hold the tensors (and shapes) the JSON lists.
    """
    tensor_path, json_path = record_paths(path)
    if not json_path.is_file():
        raise RecordError(f"no such record: {json_path} is missing")
    meta = read_json(json_path)
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        raise RecordError(f"{json_path} does not describe a {kind} (kind {meta.get('kind')!r})")
    tensors = read_tensors(tensor_path)
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    listed = meta.get("tensors")
    if listed is not None and listed != shapes:
        raise RecordError(
            f"{tensor_path} holds {shapes}, {json_path.name} lists {listed}: the files do not "
            "belong together"
        )
    return tensors, meta
