"""Task data: the real Dolly split loads with stable ids; bad rows stop with the file, the line
numbers and the fix, or are skipped and reported; ``limit``; which rows get a CoT form."""
from __future__ import annotations

import json
import random

import pytest

from cot2align_core.data import DataError, has_cot_form, read_jsonl, validate_rows

GOOD = {"instruction": "Add the numbers.", "input": "1 and 2", "output": "3"}


def write_lines(path, lines: list) -> str:
    """Write jsonl: dicts are dumped, strings written as they are."""
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines),
                    encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- real Dolly
@pytest.fixture(scope="module")
def dolly_dev(dolly_dir):
    return read_jsonl(dolly_dir / "dev.jsonl", "train")


def test_dolly_dev_loads_with_stable_ids(dolly_dev, dolly_dir):
    rows = dolly_dev.rows
    assert len(rows) == 1000 and dolly_dev.skipped == []
    assert dolly_dev.source == str(dolly_dir / "dev.jsonl")
    assert [r["id"] for r in rows[:3]] == ["train-000001", "train-000002", "train-000003"]
    assert rows[-1]["id"] == "train-001000"
    assert len({r["id"] for r in rows}) == 1000
    again = read_jsonl(dolly_dir / "dev.jsonl", "train")
    assert [r["id"] for r in again.rows] == [r["id"] for r in rows]


def test_dolly_rows_drop_the_prompt_and_keep_the_input(dolly_dev, dolly_dir):
    with open(dolly_dir / "dev.jsonl", encoding="utf-8") as fh:
        raw = [json.loads(line) for line in fh]
    assert all("prompt" in r for r in raw)
    for row, src in zip(dolly_dev.rows, raw):
        assert set(row) == {"id", "instruction", "input", "output"}
        assert row["instruction"] == src["instruction"].strip()
        assert row["input"] == (src.get("input") or "").strip()
        assert row["output"] == src["output"].strip()
    with_input = sum(bool(r["input"]) for r in dolly_dev.rows)
    assert 0 < with_input < 1000  # Dolly mixes rows with and without context


def test_dolly_cot_forms_follow_the_input(dolly_dev):
    rows = dolly_dev.rows
    assert all(has_cot_form(r, cot_requires_input=False) for r in rows)
    cot = [r for r in rows if has_cot_form(r, cot_requires_input=True)]
    assert cot == [r for r in rows if r["input"]]


def test_dolly_limit_and_the_eval_split(dolly_dir):
    part = read_jsonl(dolly_dir / "dev.jsonl", "train", limit=25)
    assert len(part.rows) == 25 and part.rows[-1]["id"] == "train-000025"
    if (dolly_dir / "valid.jsonl").is_file():
        valid = read_jsonl(dolly_dir / "valid.jsonl", "eval", limit=5)
        assert [r["id"] for r in valid.rows] == [f"eval-{i:06d}" for i in range(1, 6)]


def test_random_dolly_rows_survive_a_round_trip(dolly_dev, tmp_path):
    """Property: any sample of valid rows, written back as jsonl, reads back to the same rows
    (ids given explicitly are kept)."""
    rng = random.Random(0)
    for trial in range(5):
        sample = rng.sample(dolly_dev.rows, 20)
        path = write_lines(tmp_path / f"s{trial}.jsonl", sample)
        assert read_jsonl(path, "train").rows == sample


# --------------------------------------------------------------------------- bad rows
def test_invalid_rows_name_the_file_the_lines_and_the_fix(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [
        GOOD,
        {"instruction": "x", "input": ""},                      # 2: no output
        {"instruction": "x", "output": "   "},                  # 3: empty output
        {"instruction": "x", "output": 7},                      # 4: not a string
        '{"instruction": "x", "output": ',                     # 5: invalid JSON
        GOOD | {"input": ["a"]},                                # 6: input not a string
        {"instruction": "", "output": "y"},                     # 7: empty instruction
        {"instruction": "x", "output": None},                   # 8: null output
        "[1, 2]",                                               # 9: not an object
    ])
    with pytest.raises(DataError) as info:
        read_jsonl(path, "train")
    msg = str(info.value)
    assert path in msg and "8 invalid row(s)" in msg
    assert "line 2: missing field(s) output" in msg
    assert "line 3: empty 'output'" in msg
    assert "line 4: field 'output' is int, expected a string" in msg
    assert "line 5: invalid JSON" in msg
    assert "line 6: field 'input' is list" in msg
    assert "line 7: empty 'instruction'" in msg
    assert "line 8: missing field(s) output" in msg
    assert "line 9: not a JSON object" in msg
    assert "line 1:" not in msg
    assert "data.on_invalid_rows: skip" in msg


def test_skip_leaves_bad_rows_out_and_reports_them(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [
        GOOD, {"instruction": "x"}, "not json", GOOD | {"output": "4"}, {"output": "y"},
    ])
    split = read_jsonl(path, "train", on_invalid="skip")
    assert [r["output"] for r in split.rows] == ["3", "4"]
    assert [r["id"] for r in split.rows] == ["train-000001", "train-000004"]  # line numbers
    assert len(split.skipped) == 3
    assert [s.split(":")[0] for s in split.skipped] == ["line 2", "line 3", "line 5"]
    assert "missing field(s) instruction" in split.skipped[2]


def test_duplicate_ids_are_invalid(tmp_path):
    path = write_lines(tmp_path / "dup.jsonl", [
        GOOD | {"id": "a"}, GOOD | {"id": "b"}, GOOD | {"id": "a", "output": "other"},
    ])
    with pytest.raises(DataError) as info:
        read_jsonl(path, "train")
    msg = str(info.value)
    assert "line 3: duplicate id 'a' (first on line 1)" in msg and path in msg
    assert "data.on_invalid_rows: skip" in msg
    split = read_jsonl(path, "train", on_invalid="skip")
    assert [(r["id"], r["output"]) for r in split.rows] == [("a", "3"), ("b", "3")]
    assert split.skipped == ["line 3: duplicate id 'a' (first on line 1)"]


def test_explicit_ids_are_kept_as_strings(tmp_path):
    path = write_lines(tmp_path / "ids.jsonl", [GOOD | {"id": 0}, GOOD | {"id": 12},
                                                GOOD | {"id": ""}, GOOD | {"id": None}])
    ids = [r["id"] for r in read_jsonl(path, "x").rows]
    assert ids == ["0", "12", "x-000003", "x-000004"]


def test_many_bad_rows_are_summarised(tmp_path):
    path = write_lines(tmp_path / "many.jsonl", [GOOD] + [{"instruction": "x"}] * 25)
    with pytest.raises(DataError) as info:
        read_jsonl(path, "train")
    msg = str(info.value)
    assert "25 invalid row(s)" in msg and "line 11:" in msg and "line 12:" not in msg
    assert "... and 15 more" in msg


def test_blank_lines(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD | {"output": "4"}) + "\n\n\n")
    with pytest.raises(DataError, match="line 2: blank line"):
        read_jsonl(path, "train")
    split = read_jsonl(path, "train", on_invalid="skip")  # trailing blank lines are not rows
    assert [r["id"] for r in split.rows] == ["train-000001", "train-000003"]
    assert split.skipped == ["line 2: blank line"]


def test_a_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match="line 2: not UTF-8"):
        read_jsonl(path, "train")


def test_a_utf8_bom_is_tolerated(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert read_jsonl(path, "train").rows[0]["output"] == "3"


def test_a_missing_file_names_the_config_keys(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl.*data.train_path"):
        read_jsonl(tmp_path / "nope.jsonl", "train")


def test_a_file_without_usable_rows(tmp_path):
    path = write_lines(tmp_path / "none.jsonl", [{"instruction": "x"}])
    with pytest.raises(DataError, match="no usable rows"):
        read_jsonl(path, "train", on_invalid="skip")


# --------------------------------------------------------------------------- rows in memory
def test_validate_rows_normalises_and_keeps_rationales():
    split = validate_rows([
        {"id": "q1", "instruction": " Q ", "input": None, "output": " A ", "rationale": " R "},
        {"instruction": "Q2", "output": "A2", "rationale": ""},
    ], "demo", "train")
    assert split.rows == [
        {"id": "q1", "instruction": "Q", "input": "", "output": "A", "rationale": "R"},
        {"id": "train-000002", "instruction": "Q2", "input": "", "output": "A2"},
    ]


def test_limit_counts_usable_rows():
    raws = [GOOD, {"instruction": "x"}, GOOD | {"output": "4"}, GOOD | {"output": "5"}]
    split = validate_rows(raws, "mem", "train", on_invalid="skip", limit=2)
    assert [r["output"] for r in split.rows] == ["3", "4"]
    assert split.skipped == ["line 2: missing field(s) output"]


def test_a_string_row_is_not_mistaken_for_a_parse_error():
    split = validate_rows(["<invalid JSON: made up>", GOOD], "mem", "train", on_invalid="skip")
    assert split.skipped == ["line 1: not a JSON object (a str)"]


@pytest.mark.parametrize("row, requires, expected", [
    ({"input": "context"}, True, True),
    ({"input": ""}, True, False),
    ({"input": "  \n"}, True, False),
    ({"input": None}, True, False),
    ({}, True, False),
    ({"input": ""}, False, True),
    ({}, False, True),
])
def test_has_cot_form(row, requires, expected):
    assert has_cot_form(row, cot_requires_input=requires) is expected
