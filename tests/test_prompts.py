"""Tests for cosmic_tl.prompts: bundled sets, file loaders, cleaning and sampling."""

from __future__ import annotations

import csv
import inspect
import json
import random
import re
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from cosmic_tl.prompts import (
    BUNDLED_SETS,
    EXTRA_SPLITS,
    SPLITS,
    PromptFileError,
    clean_prompts,
    file_sha256,
    load_bundled,
    load_bundled_records,
    load_prompts,
    prompts_sha256,
    reference_sample,
    sample_prompts,
)

CATEGORIES = {
    "harmful": {
        "weapons",
        "cybercrime",
        "fraud",
        "drugs",
        "harassment",
        "privacy_violation",
        "dangerous_chemistry",
        "misinformation",
        "violence",
        "self_harm",
        "hate_speech",
        "theft",
    },
    "harmless": {
        "everyday_tasks",
        "coding",
        "cooking",
        "science",
        "writing",
        "maths",
        "history",
        "health_fitness",
        "travel",
        "language",
        "business",
        "arts",
    },
}
SPLIT_SIZES = {"train": 240, "val": 60, "test": 100}


# --- bundled sets -------------------------------------------------------------------


@pytest.mark.parametrize("kind", BUNDLED_SETS)
def test_bundled_sets_are_large_disjoint_and_unique(kind: str) -> None:
    by_split = {split: load_bundled(kind, split) for split in SPLITS}
    everything = [p for prompts in by_split.values() for p in prompts]
    assert len(everything) >= 300
    assert {split: len(p) for split, p in by_split.items()} == SPLIT_SIZES
    assert all(p.strip() == p and p for p in everything)
    assert len({p.lower() for p in everything}) == len(everything)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not set(by_split[a]) & set(by_split[b])


@pytest.mark.parametrize("kind", BUNDLED_SETS)
@pytest.mark.parametrize("split", SPLITS)
def test_every_category_is_in_every_split(kind: str, split: str) -> None:
    records = load_bundled_records(kind, split)
    assert {r["category"] for r in records} == CATEGORIES[kind]
    assert all(set(r) == {"instruction", "category"} for r in records)


def test_harmful_and_harmless_do_not_overlap() -> None:
    harmful = {p.lower() for s in SPLITS for p in load_bundled("harmful", s)}
    harmless = {p.lower() for s in SPLITS for p in load_bundled("harmless", s)}
    assert not harmful & harmless


@pytest.mark.parametrize(
    ("kind", "split", "size"),
    [
        ("harmless", "train_tasks", 300),
        ("harmless", "train_contrast", 200),
        ("harmless", "train_everyday", 400),
        ("harmful", "train_extra", 120),
        ("harmful", "train_everyday", 200),
    ],
)
def test_extra_train_splits_are_unique_and_disjoint_from_every_split(kind, split, size) -> None:
    extra = load_bundled(kind, split)
    assert len(extra) >= size
    assert len({p.lower() for p in extra}) == len(extra)
    assert all(p.strip() == p and p and "\n" not in p and len(p) <= 200 for p in extra)
    others = {p.lower() for k in BUNDLED_SETS for s in SPLITS for p in load_bundled(k, s)}
    others |= {
        p.lower()
        for k, splits in EXTRA_SPLITS.items()
        for s in splits
        if (k, s) != (kind, split)
        for p in load_bundled(k, s)
    }
    assert not {p.lower() for p in extra} & others
    assert load_prompts(f"bundled:{kind}:{split}") == extra
    other = "harmful" if kind == "harmless" else "harmless"
    if split not in EXTRA_SPLITS[other]:  # a split of one kind only
        with pytest.raises(PromptFileError, match="unknown split"):
            load_bundled(other, split)


def test_extra_splits_are_train_only() -> None:
    assert all(s.startswith("train_") for splits in EXTRA_SPLITS.values() for s in splits)
    with pytest.raises(PromptFileError, match="train_tasks"):
        load_bundled("harmless", "val_tasks")


def test_bundled_prompts_are_single_sentences_of_reasonable_length() -> None:
    for kind in BUNDLED_SETS:
        for split in SPLITS:
            for prompt in load_bundled(kind, split):
                assert 6 <= len(prompt.split()) <= 30, prompt
                assert "\n" not in prompt


def test_docs_tables_match_bundled_files() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs" / "prompts.md"
    rows = re.findall(r"^\| `(\w+)` \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", docs.read_text(), re.M)
    documented = {name: tuple(int(x) for x in counts) for name, *counts in rows}
    expected: dict[str, tuple[int, ...]] = {}
    for kind in BUNDLED_SETS:
        per_split = [Counter(r["category"] for r in load_bundled_records(kind, s)) for s in SPLITS]
        for category in CATEGORIES[kind]:
            counts = [c[category] for c in per_split]
            expected[category] = (*counts, sum(counts))
    assert documented == expected


def test_bundled_source_strings() -> None:
    assert load_prompts("bundled:harmful:val") == load_bundled("harmful", "val")
    assert load_prompts("bundled:harmless", split="test") == load_bundled("harmless", "test")


@pytest.mark.parametrize(
    ("kind", "split", "message"),
    [("harmfull", "train", "unknown bundled prompt set 'harmfull'"), ("harmful", "dev", "'dev'")],
)
def test_unknown_bundled_set_or_split(kind: str, split: str, message: str) -> None:
    with pytest.raises(PromptFileError, match=message) as info:
        load_bundled(kind, split)
    assert "expected one of" in str(info.value)


def test_bare_set_name_points_to_bundled_syntax() -> None:
    with pytest.raises(PromptFileError, match="'bundled:harmful:val'"):
        load_prompts("harmful", split="val")


def test_malformed_bundled_source() -> None:
    with pytest.raises(PromptFileError, match="bundled:KIND:SPLIT"):
        load_prompts("bundled:harmful:train:extra")
    with pytest.raises(PromptFileError, match="unknown split 'nope'"):
        load_prompts("bundled:harmless:nope")


# --- file formats -------------------------------------------------------------------

PROMPTS = ["First prompt, with a comma", 'Second "quoted" prompt', "Third prompt"]


def _write_csv(path: Path, column: str, extra: str = "category") -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([extra, column])
        writer.writerows([["x", p] for p in PROMPTS])
    return path


@pytest.mark.parametrize("column", ["goal", "Behavior", "Goal", "prompt", "instruction"])
def test_csv_recognised_columns(tmp_path: Path, column: str) -> None:
    # goal = AdvBench, Behavior = HarmBench, Goal = JailbreakBench
    path = _write_csv(tmp_path / "set.csv", column)
    assert load_prompts(path) == PROMPTS
    assert load_prompts(str(path)) == PROMPTS


def test_csv_named_column_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "custom.csv"
    path.write_text("\ufeffid,question\n1,Alpha?\n2,Beta?\n", encoding="utf-8")
    assert load_prompts(path, column="question") == ["Alpha?", "Beta?"]


def test_json_list_of_strings(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_text(json.dumps(PROMPTS))
    assert load_prompts(path) == PROMPTS


@pytest.mark.parametrize("field", ["instruction", "goal", "Goal", "prompt", "Behavior", "text"])
def test_json_list_of_objects(tmp_path: Path, field: str) -> None:
    path = tmp_path / "set.json"
    path.write_text(json.dumps([{field: p, "category": "c"} for p in PROMPTS]))
    assert load_prompts(path) == PROMPTS


def test_json_field_preference_and_override(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_text(json.dumps([{"text": "t", "instruction": "i", "q": "custom"}]))
    assert load_prompts(path) == ["i"]
    assert load_prompts(path, column="q") == ["custom"]


def test_jsonl_objects_and_strings(tmp_path: Path) -> None:
    objects = tmp_path / "objects.jsonl"
    objects.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n\n")
    assert load_prompts(objects) == PROMPTS
    strings = tmp_path / "strings.jsonl"
    strings.write_text("\n".join(json.dumps(p) for p in PROMPTS))
    assert load_prompts(strings) == PROMPTS


def test_txt_one_prompt_per_line(tmp_path: Path) -> None:
    path = tmp_path / "set.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    assert load_prompts(path) == PROMPTS


def test_bundled_file_loads_through_load_prompts(tmp_path: Path) -> None:
    records = load_bundled_records("harmful", "val")
    path = tmp_path / "copy.json"
    path.write_text(json.dumps(records))
    assert load_prompts(path) == load_bundled("harmful", "val")


# --- bad input ------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(PromptFileError, match="not found") as info:
        load_prompts(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts("data/nope.csv")


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".txt"])
def test_empty_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.write_text("  \n")
    with pytest.raises(PromptFileError, match="file is empty") as info:
        load_prompts(path)
    assert str(path) in str(info.value)


def test_json_without_prompts(tmp_path: Path) -> None:
    path = tmp_path / "none.json"
    path.write_text("[]")
    with pytest.raises(PromptFileError, match="contains no prompts"):
        load_prompts(path)


def test_malformed_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  "ok",\n  "missing quote\n]')
    with pytest.raises(PromptFileError, match=r"malformed JSON at line 3") as info:
        load_prompts(path)
    assert str(path) in str(info.value)


def test_json_not_a_list(tmp_path: Path) -> None:
    path = tmp_path / "dict.json"
    path.write_text('{"goal": "x"}')
    with pytest.raises(PromptFileError, match="expected a JSON list"):
        load_prompts(path)


def test_json_mixed_items(tmp_path: Path) -> None:
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(["a", {"goal": "b"}, 3]))
    with pytest.raises(PromptFileError, match="item 0 is a str"):
        load_prompts(path)


def test_malformed_jsonl_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"goal": "a"}\n\n{"goal": "b"\n')
    with pytest.raises(PromptFileError, match="malformed JSON on line 3") as info:
        load_prompts(path)
    assert str(path) in str(info.value)


def test_jsonl_object_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "partial.jsonl"
    path.write_text('{"goal": "a"}\n{"other": "b"}\n')
    with pytest.raises(PromptFileError, match="line 2 has no string field 'goal'") as info:
        load_prompts(path)
    assert "other" in str(info.value)


def test_json_no_recognised_field(tmp_path: Path) -> None:
    path = tmp_path / "fields.json"
    path.write_text(json.dumps([{"question": "a", "id": 1}]))
    with pytest.raises(PromptFileError, match="no recognised prompt field") as info:
        load_prompts(path)
    message = str(info.value)
    assert "question, id" in message  # fields found
    assert "instruction, goal, Goal, prompt, Behavior, behavior, text" in message  # accepted
    assert str(path) in message


def test_json_named_field_missing(tmp_path: Path) -> None:
    path = tmp_path / "fields.json"
    path.write_text(json.dumps([{"goal": "a"}]))
    with pytest.raises(PromptFileError, match="no field named 'query'") as info:
        load_prompts(path, column="query")
    assert "fields found: goal" in str(info.value)


def test_csv_no_recognised_column(tmp_path: Path) -> None:
    path = tmp_path / "cols.csv"
    path.write_text("id,question\n1,a\n")
    with pytest.raises(PromptFileError, match="no recognised prompt column") as info:
        load_prompts(path)
    message = str(info.value)
    assert "columns found: id, question" in message
    assert "accepted: goal, Goal, Behavior, prompt, instruction" in message
    with pytest.raises(PromptFileError, match="no column named 'query'"):
        load_prompts(path, column="query")


def test_csv_header_only(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("goal,target\n")
    with pytest.raises(PromptFileError, match="contains no prompts"):
        load_prompts(path)


@pytest.mark.parametrize("name", ["prompts.parquet", "prompts.yaml", "prompts"])
def test_unsupported_extension(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("something")
    with pytest.raises(PromptFileError, match="unsupported file extension") as info:
        load_prompts(path)
    assert ".json, .jsonl, .csv, .txt" in str(info.value)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="is a directory"):
        load_prompts(tmp_path)


def test_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 prompt\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match="not UTF-8"):
        load_prompts(path)


# --- Hugging Face datasets (faked: no network in tests) ----------------------------


class _FakeDataset:
    def __init__(self, columns: dict[str, list[object]]) -> None:
        self._columns = columns
        self.column_names = list(columns)

    def __getitem__(self, name: str) -> list[object]:
        return self._columns[name]


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset: object) -> None:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    def load_dataset(name: str, split: str) -> _FakeDataset:
        calls.append((name, split))
        return _FakeDataset({"target": ["t1", "t2"], "Goal": ["g1", "g2"]})

    _fake_datasets(monkeypatch, load_dataset)
    assert load_prompts("owner/jailbreaks", split="harmful") == ["g1", "g2"]
    assert load_prompts("owner/jailbreaks", column="target") == ["t1", "t2"]
    assert calls == [("owner/jailbreaks", "harmful"), ("owner/jailbreaks", "train")]


def test_hub_dataset_failure_explains_offline_use(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(name: str, split: str) -> None:
        raise ConnectionError("no route to host")

    _fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(PromptFileError) as info:
        load_prompts("owner/advbench")
    message = str(info.value)
    assert "owner/advbench" in message
    assert "no route to host" in message
    assert "network access" in message
    assert "local .json" in message


def test_hub_dataset_without_prompt_column(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_datasets(monkeypatch, lambda name, split: _FakeDataset({"a": ["x"], "b": ["y"]}))
    with pytest.raises(PromptFileError, match="columns found: a, b"):
        load_prompts("owner/odd")


# --- cleaning -------------------------------------------------------------------------


def test_clean_prompts_drops_blank_and_duplicates_with_one_warning() -> None:
    raw = ["  a ", "b", "", "a", "   ", "c", "b\n"]
    with pytest.warns(UserWarning, match="dropped 4 blank or duplicate") as record:
        assert clean_prompts(raw) == ["a", "b", "c"]
    assert len(record) == 1


def test_clean_prompts_silent_when_clean(recwarn: pytest.WarningsRecorder) -> None:
    assert clean_prompts(["x", "y"]) == ["x", "y"]
    assert len(recwarn) == 0


def test_clean_prompts_nothing_left() -> None:
    with pytest.raises(PromptFileError, match="no prompts left"), pytest.warns(UserWarning):
        clean_prompts(["", "  "])
    with pytest.raises(PromptFileError, match="no prompts left"):
        clean_prompts([])


def test_duplicates_in_file_dropped_after_loading(tmp_path: Path) -> None:
    path = tmp_path / "dupes.txt"
    path.write_text("one\ntwo\none\n")
    with pytest.warns(UserWarning, match="dropped 1"):
        assert clean_prompts(load_prompts(path)) == ["one", "two"]


# --- sampling and hashing ----------------------------------------------------------


def test_sampling_is_deterministic_per_seed() -> None:
    prompts = load_bundled("harmless", "train")
    first = sample_prompts(prompts, 32, seed=0)
    assert first == sample_prompts(prompts, 32, seed=0)
    assert first != sample_prompts(prompts, 32, seed=1)
    assert len(first) == len(set(first)) == 32
    assert set(first) <= set(prompts)


def test_sampling_does_not_touch_global_random(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling neither reseeds nor depends on the global generator."""

    def no_reseed(*_: object) -> None:
        raise AssertionError("sample_prompts must not reseed the global generator")

    random.seed(1)
    first = sample_prompts(["a", "b", "c", "d"], 2, seed=5)
    random.seed(2)
    monkeypatch.setattr(random, "seed", no_reseed)
    assert sample_prompts(["a", "b", "c", "d"], 2, seed=5) == first


@pytest.mark.parametrize("n", [None, 3, 100])
def test_sampling_all_returns_a_seeded_permutation(n: int | None) -> None:
    prompts = [f"p{i}" for i in range(3)]
    result = sample_prompts(prompts, n, seed=7)
    assert sorted(result) == prompts
    assert result == sample_prompts(prompts, None, seed=7)


@pytest.mark.parametrize("n", [0, -2])
def test_sampling_rejects_non_positive_n(n: int) -> None:
    with pytest.raises(PromptFileError, match="must be positive"):
        sample_prompts(["a"], n, seed=0)


def test_sampling_empty() -> None:
    with pytest.raises(PromptFileError, match="empty"):
        sample_prompts([], None, seed=0)


# --- the published pipeline's sampling -------------------------------------------------

# Small sets; harmless_train is large enough (400 > 21) that random.sample takes its
# set-based branch, the others its pool branch, as with the real splits.
_SETS = (
    [f"harmful {i}" for i in range(10)],
    [f"harmless {i}" for i in range(400)],
    [f"harmful val {i}" for i in range(8)],
    [f"harmless val {i}" for i in range(30)],
)


def test_reference_sample_is_one_stream_in_the_published_order() -> None:
    rng = random.Random(42)  # the published random.seed(42), on a private generator
    expected = (
        rng.sample(_SETS[0], 3),
        rng.sample(_SETS[1], 3),
        rng.sample(_SETS[2], 2),
        rng.sample(_SETS[3], 2),
    )
    assert reference_sample(*_SETS, n_train=3, n_val=2) == expected
    # The other order of draws, or a generator per set, gives other lists.
    assert reference_sample(*_SETS, n_train=3, n_val=2)[1] != random.Random(42).sample(_SETS[1], 3)


def test_reference_sample_pinned_draw() -> None:
    """Computed once with CPython 3.11's ``random.seed(42)`` and four ``random.sample``
    calls (Mersenne Twister plus ``sample``'s algorithm, unchanged since 3.2); this fails
    if a Python release ever changes them."""
    assert reference_sample(*_SETS, n_train=3, n_val=2, seed=42) == (
        ["harmful 1", "harmful 0", "harmful 4"],
        ["harmless 125", "harmless 114", "harmless 71"],
        ["harmful val 1", "harmful val 5"],
        ["harmless val 23", "harmless val 28"],
    )


def test_reference_sample_leaves_global_random_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests wrap cosmic_tl in beartype (conftest), whose container checks draw from
    # the global generator; unwrap to look at the function itself.
    plain = inspect.unwrap(reference_sample)
    random.seed(1234)
    state = random.getstate()
    monkeypatch.setattr(random, "seed", lambda *_: pytest.fail("reference_sample reseeded random"))
    first = plain(*_SETS, n_train=3, n_val=2)
    assert random.getstate() == state
    random.random()  # nor does it depend on the global state
    assert plain(*_SETS, n_train=3, n_val=2) == first


def test_reference_sample_does_not_modify_its_inputs() -> None:
    sets = tuple(list(s) for s in _SETS)
    reference_sample(*sets, n_train=3, n_val=2)
    assert sets == _SETS


@pytest.mark.parametrize(
    ("n_train", "n_val", "label"),
    [(11, 2, "harmful_train"), (3, 9, "harmful_val"), (0, 2, "harmful_train")],
)
def test_reference_sample_rejects_impossible_sizes(n_train: int, n_val: int, label: str) -> None:
    with pytest.raises(PromptFileError, match=f"from {label}, which has"):
        reference_sample(*_SETS, n_train=n_train, n_val=n_val)


def test_hashes(tmp_path: Path) -> None:
    path = tmp_path / "h.txt"
    path.write_bytes(b"abc")
    assert file_sha256(path) == ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    digest = prompts_sha256(["a", "b"])
    assert len(digest) == 64
    assert digest == prompts_sha256(("a", "b"))
    assert digest != prompts_sha256(["b", "a"])
