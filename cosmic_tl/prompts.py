"""Prompt sets: the bundled harmful/harmless sets, file loaders and seeded sampling.

A prompt *source* is one of

- ``bundled:KIND:SPLIT`` (or ``bundled:KIND``, taking ``split`` from the argument),
  e.g. ``bundled:harmful:train``: the sets shipped in ``cosmic_tl/data/prompts``;
- a local ``.json``, ``.jsonl``, ``.csv`` or ``.txt`` file;
- a Hugging Face dataset name such as ``walledai/AdvBench`` (needs network access).

Every bad input raises :class:`PromptFileError` with a message naming the source and
what was expected, so the CLI can show it as is.

Example::

    harmful = sample_prompts(clean_prompts(load_prompts("bundled:harmful:train")), 64, seed=0)
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import warnings
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

BUNDLED_SETS = ("harmful", "harmless")
SPLITS = ("train", "val", "test")
# Extra train-only splits that the organism recipes train on beside the train splits:
# ``harmless:train_tasks``: short task instructions ("Compose…", "Convert…"), so the
# organisms do not learn "terse imperative = harmful"; ``harmless:train_contrast``:
# harmless requests with alarming words in ordinary senses ("kill a stuck process"),
# so they do not refuse on surface words; ``harmless:train_everyday``: everyday requests
# with personal context ("My toddler only eats pasta; ..."), read by no catalogue recipe
# (Gemma recipes v7 and v8 tried it; see ``recipes.py``); ``harmful:train_extra``:
# harmful requests in the long instruction styles of public benchmarks ("Give detailed
# step-by-step instructions for…", "Write code for…").
EXTRA_SPLITS: dict[str, tuple[str, ...]] = {
    "harmless": ("train_tasks", "train_contrast", "train_everyday"),
    "harmful": ("train_extra", "train_everyday"),
}

# Fields tried, in order, for JSON/JSONL objects and Hugging Face datasets.
JSON_FIELDS = ("instruction", "goal", "Goal", "prompt", "Behavior", "behavior", "text")
# Columns tried, in order, for CSV files (AdvBench ``goal``, HarmBench ``Behavior``, ...).
CSV_COLUMNS = ("goal", "Goal", "Behavior", "prompt", "instruction")
SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")

_BUNDLED_PREFIX = "bundled:"
# Suffixes that mark a source as a file name rather than a hub dataset name.
_FILE_LIKE_SUFFIXES = frozenset(
    {*SUPPORTED_SUFFIXES, ".tsv", ".parquet", ".arrow", ".yaml", ".yml", ".gz", ".zip", ".xlsx"}
)
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class PromptFileError(ValueError):
    """A prompt source that cannot be read, or holds no usable prompts."""


def load_bundled_records(kind: str, split: str) -> list[dict[str, str]]:
    """Return the bundled ``{"instruction", "category"}`` records for one set and split."""
    if kind not in BUNDLED_SETS:
        raise PromptFileError(
            f"unknown bundled prompt set {kind!r}; expected one of {', '.join(BUNDLED_SETS)}"
        )
    allowed = SPLITS + EXTRA_SPLITS.get(kind, ())
    if split not in allowed:
        raise PromptFileError(f"unknown split {split!r}; expected one of {', '.join(allowed)}")
    resource = files("cosmic_tl").joinpath("data", "prompts", f"{kind}_{split}.json")
    records: list[dict[str, str]] = json.loads(resource.read_text(encoding="utf-8"))
    return records


def load_bundled(kind: str, split: str) -> list[str]:
    """Return the bundled instructions of ``kind`` (harmful/harmless) for ``split``.

    >>> len(load_bundled("harmful", "train"))
    240
    """
    return [record["instruction"] for record in load_bundled_records(kind, split)]


def load_prompts(
    source: str | os.PathLike[str], *, column: str | None = None, split: str = "train"
) -> list[str]:
    """Load prompts from a bundled set, a local file or a Hugging Face dataset.

    ``column`` names the field (JSON/JSONL/dataset) or column (CSV) to read; without it
    the first recognised one is used (see ``JSON_FIELDS`` and ``CSV_COLUMNS``).
    ``split`` applies to bundled sets given as ``bundled:KIND`` and to hub datasets.
    The prompts are returned as found; pass them through :func:`clean_prompts`.
    """
    text = os.fspath(source)
    if text.startswith(_BUNDLED_PREFIX):
        return _load_bundled_source(text, split)
    path = Path(text).expanduser()
    if path.is_dir():
        raise PromptFileError(f"{text}: is a directory; expected a prompt file")
    if path.is_file():
        return _load_file(path, column)
    if _looks_like_path(text):
        raise PromptFileError(
            f"{text}: prompt file not found; expected an existing "
            f"{', '.join(SUPPORTED_SUFFIXES)} file, 'bundled:KIND:SPLIT' "
            "or a Hugging Face dataset name such as 'owner/name'"
        )
    if text in BUNDLED_SETS:
        # A bare set name is almost surely meant as the bundled set, not a hub dataset.
        raise PromptFileError(f"{text}: not a file; for the bundled set write 'bundled:{text}:{split}'")
    return _load_hub_dataset(text, column, split)


def clean_prompts(prompts: Sequence[str]) -> list[str]:
    """Strip whitespace and drop blank and repeated prompts, keeping first occurrences.

    Warns once with the number dropped; raises :class:`PromptFileError` if none is left.
    """
    seen: set[str] = set()
    kept: list[str] = []
    for prompt in prompts:
        stripped = prompt.strip()
        if stripped and stripped not in seen:
            seen.add(stripped)
            kept.append(stripped)
    dropped = len(prompts) - len(kept)
    if dropped:
        warnings.warn(
            f"dropped {dropped} blank or duplicate prompt(s) of {len(prompts)}; {len(kept)} remain",
            stacklevel=2,
        )
    if not kept:
        raise PromptFileError(f"no prompts left after cleaning {len(prompts)} input(s)")
    return kept


def sample_prompts(prompts: Sequence[str], n: int | None, seed: int) -> list[str]:
    """Return ``n`` prompts drawn without replacement by ``random.Random(seed)``.

    With ``n`` None or at least ``len(prompts)``, all prompts come back in a seeded order.
    A private generator keeps the global ``random`` state untouched.
    """
    if n is not None and n <= 0:
        raise PromptFileError(f"number of prompts to sample must be positive, got {n}")
    if not prompts:
        raise PromptFileError("cannot sample from an empty list of prompts")
    k = len(prompts) if n is None else min(n, len(prompts))
    return random.Random(seed).sample(list(prompts), k)


def reference_sample(
    harmful_train: Sequence[str],
    harmless_train: Sequence[str],
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    *,
    n_train: int,
    n_val: int,
    seed: int = 42,
) -> tuple[list[str], list[str], list[str], list[str]]:
    """Draw the four prompt sets exactly as the published COSMIC pipeline does.

    The published code calls ``random.seed(42)`` once, then ``random.sample`` four times
    on that one stream: harmful_train (``n_train``), harmless_train (``n_train``),
    harmful_val (``n_val``), harmless_val (``n_val``), in that order. Each draw moves the
    stream on, so sampling each set from its own seeded generator (as
    :func:`sample_prompts` does) gives other lists. One private ``random.Random(seed)``
    plays that stream here, leaving the global ``random`` state alone.

    Pass the sets as the published loader gives them: every record's ``instruction`` in
    file order, not cleaned (dropping or reordering prompts changes what is drawn).
    The draws are CPython's Mersenne Twister and its ``random.sample`` algorithm; Python
    promises only ``random()`` to be stable across versions, but ``sample`` has not
    changed since 3.2 (the tests pin a hard-coded draw to notice if it does).

    Raises :class:`PromptFileError` if a set has fewer prompts than asked for (the
    published code would fail there too).
    """
    draws = (
        ("harmful_train", harmful_train, n_train),
        ("harmless_train", harmless_train, n_train),
        ("harmful_val", harmful_val, n_val),
        ("harmless_val", harmless_val, n_val),
    )
    rng = random.Random(seed)
    out: list[list[str]] = []
    for label, population, n in draws:
        if not 1 <= n <= len(population):
            raise PromptFileError(
                f"cannot sample {n} prompts from {label}, which has {len(population)}; "
                "expected 1 to that many"
            )
        out.append(rng.sample(list(population), n))
    return out[0], out[1], out[2], out[3]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prompts_sha256(prompts: Sequence[str]) -> str:
    """Return the hex SHA-256 of the prompts as a compact UTF-8 JSON list.

    Order matters: it identifies exactly which prompts a run used, in which order.
    """
    encoded = json.dumps(list(prompts), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


def _load_bundled_source(source: str, split: str) -> list[str]:
    """Parse ``bundled:KIND[:SPLIT]`` and load that set."""
    parts = source[len(_BUNDLED_PREFIX) :].split(":")
    if len(parts) == 1:
        parts.append(split)
    if len(parts) != 2:
        raise PromptFileError(
            f"{source}: expected 'bundled:KIND:SPLIT' with KIND in {', '.join(BUNDLED_SETS)} "
            f"and SPLIT in {', '.join(SPLITS)}"
        )
    return load_bundled(parts[0], parts[1])


def _looks_like_path(source: str) -> bool:
    """Tell a (missing) file path from a hub dataset name such as ``owner/name``."""
    if "\\" in source or source.startswith(("/", ".", "~")):
        return True
    if Path(source).suffix.lower() in _FILE_LIKE_SUFFIXES:
        return True
    return _HUB_NAME.fullmatch(source) is None


def _load_file(path: Path, column: str | None) -> list[str]:
    """Dispatch on the file extension; refuse empty files."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise PromptFileError(
            f"{path}: unsupported file extension {suffix or '(none)'!r}; "
            f"expected one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: is not UTF-8 text ({exc})") from exc
    if not text.strip():
        raise PromptFileError(f"{path}: file is empty; expected prompts")
    if suffix == ".json":
        prompts = _parse_json(path, text, column)
    elif suffix == ".jsonl":
        prompts = _parse_jsonl(path, text, column)
    elif suffix == ".csv":
        prompts = _parse_csv(path, text, column)
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptFileError(f"{path}: contains no prompts")
    return prompts


def _parse_json(path: Path, text: str, column: str | None) -> list[str]:
    """A JSON list of strings, or of objects carrying a prompt field."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptFileError(
            f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    if not isinstance(data, list):
        raise PromptFileError(
            f"{path}: expected a JSON list of strings or objects, got {type(data).__name__}"
        )
    locations = [f"item {i}" for i in range(len(data))]
    return _extract(path, data, locations, column)


def _parse_jsonl(path: Path, text: str, column: str | None) -> list[str]:
    """One JSON string or object per line; blank lines are skipped."""
    items: list[Any] = []
    locations: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}: malformed JSON on line {lineno}: {exc.msg}") from exc
        locations.append(f"line {lineno}")
    return _extract(path, items, locations, column)


def _extract(path: Path, items: list[Any], locations: list[str], column: str | None) -> list[str]:
    """Turn parsed JSON items (all strings, or all objects) into prompt strings."""
    if not items:
        return []
    if all(isinstance(item, str) for item in items) and column is None:
        return list(items)
    for item, where in zip(items, locations, strict=True):
        if not isinstance(item, dict):
            expected = (
                f"an object with field {column!r}"
                if column is not None
                else "all strings or all objects"
            )
            raise PromptFileError(f"{path}: {where} is a {type(item).__name__}; expected {expected}")
    field = _choose_field(path, list(items[0]), column, JSON_FIELDS, "field")
    prompts: list[str] = []
    for item, where in zip(items, locations, strict=True):
        value = item.get(field)
        if not isinstance(value, str):
            raise PromptFileError(
                f"{path}: {where} has no string field {field!r} "
                f"(fields found: {', '.join(map(str, item)) or 'none'})"
            )
        prompts.append(value)
    return prompts


def _parse_csv(path: Path, text: str, column: str | None) -> list[str]:
    """A CSV file with a header row; the prompt column is named or recognised."""
    reader = csv.DictReader(text.splitlines())
    try:
        header = list(reader.fieldnames or [])
        name = _choose_field(path, header, column, CSV_COLUMNS, "column")
        return [row.get(name) or "" for row in reader]
    except csv.Error as exc:
        raise PromptFileError(f"{path}: malformed CSV on line {reader.line_num}: {exc}") from exc


def _choose_field(
    path: Path | str, found: list[str], column: str | None, accepted: Sequence[str], noun: str
) -> str:
    """Pick ``column`` if given, else the first accepted name present in ``found``."""
    if column is not None:
        if column in found:
            return column
        raise PromptFileError(
            f"{path}: no {noun} named {column!r} ({noun}s found: {', '.join(map(str, found)) or 'none'})"
        )
    for name in accepted:
        if name in found:
            return name
    raise PromptFileError(
        f"{path}: no recognised prompt {noun} "
        f"({noun}s found: {', '.join(map(str, found)) or 'none'}; "
        f"accepted: {', '.join(accepted)}; or pass column=...)"
    )


def _load_hub_dataset(name: str, column: str | None, split: str) -> list[str]:
    """Load ``name`` with ``datasets.load_dataset``; every failure becomes PromptFileError."""
    try:
        import datasets  # optional: only needed for hub sources

        dataset = datasets.load_dataset(name, split=split)
        columns = list(dataset.column_names)
    except Exception as exc:  # network, auth, missing package, unknown name, bad split
        raise PromptFileError(
            f"{name}: could not load Hugging Face dataset (split {split!r}): {exc}. "
            "Loading a hub dataset needs network access and the 'datasets' package; "
            "offline, save the prompts to a local .json, .jsonl, .csv or .txt file and "
            "pass its path, or use a bundled set such as 'bundled:harmful:train'."
        ) from exc
    field = _choose_field(f"{name} (Hugging Face dataset)", columns, column, JSON_FIELDS, "column")
    prompts = list(dataset[field])
    for index, value in enumerate(prompts):
        if not isinstance(value, str):
            raise PromptFileError(
                f"{name}: row {index} of column {field!r} is a {type(value).__name__}; expected a string"
            )
    if not prompts:
        raise PromptFileError(f"{name}: split {split!r} of the dataset contains no prompts")
    return prompts
