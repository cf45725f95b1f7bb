import numpy as np
import pyarrow as pa
import pytest
import torch

from storage.errors import StoreError
from storage.schemas import (PARQUET_OPTIONS, RATIONALES_SCHEMA, TEACHER_CACHE_SCHEMA,
                             TOKENIZED_SCHEMAS, detect_kind, read_rationales, read_tokenized,
                             tokenized_table)
from tests.storage.conftest import rationale_rows, rationale_table, student_rows


def test_rationales_round_trip_through_a_shard(store):
    with store.writer("generate", "fp", params={}) as w:
        w.write_shard("rationales-00000", rationale_table(7), **PARQUET_OPTIONS["rationales"])
    art = store.get("generate", "fp")
    table = art.read_table("rationales-00000")
    assert table.schema.equals(RATIONALES_SCHEMA)
    got = read_rationales(table)
    want = rationale_rows(7)
    assert got == want
    assert got[0]["filter_reason"] == "wrong_answer" and got[0]["prediction"] == ""
    assert detect_kind(table.schema) == "rationales"


def test_rationales_validation():
    row = rationale_rows(1)[0]
    with pytest.raises(StoreError, match="lacks.*answer"):
        from storage.schemas import rationales_table
        rationales_table([{k: v for k, v in row.items() if k != "answer"}])
    with pytest.raises(StoreError, match="unknown fields"):
        rationales_table([{**row, "extra": 1}])


@pytest.mark.parametrize("side", ["teacher", "student"])
def test_tokenized_round_trip(store, side):
    rows = student_rows(5, forms_of=lambda i: ("standard", "cot") if i % 2 else ("cot",))
    if side == "teacher":
        rows = [{k: v for k, v in r.items() if k != "mined_alignment"} for r in rows]
    rows[0]["input_ids"] = torch.tensor(rows[0]["input_ids"])      # tensors are accepted
    rows[1]["input_ids"] = np.asarray(rows[1]["input_ids"])
    table = tokenized_table(rows, side)
    assert table.schema.equals(TOKENIZED_SCHEMAS[side]) and detect_kind(table.schema) == "tokenized"
    with store.writer("tokenize", "fp", params={}) as w:
        w.write_shard(f"{side}-00000", table, **PARQUET_OPTIONS["tokenized"])
    back = store.get("tokenize", "fp").read_kind(side)
    got = read_tokenized(back)
    assert [(r["id"], r["form"]) for r in got] == [(r["id"], r["form"]) for r in rows]
    for want, row in zip(rows, got):
        assert row["input_ids"].dtype == torch.int64
        assert row["input_ids"].tolist() == list(np.asarray(want["input_ids"]))
        assert row["response_mask"].dtype == torch.bool
        assert row["response_mask"].tolist() == [bool(x) for x in want["response_mask"]]
        assert row["offsets_end"].tolist() == want["offsets_end"]
        assert row["text"] == want["text"] and row["prompt_tokens"] == 2
        if side == "student":
            ma = want["mined_alignment"]
            assert (row["mined_alignment"] is None) == (ma is None)
            if ma is not None:
                assert row["mined_alignment"].tolist() == ma
    as_numpy = read_tokenized(back, as_torch=False)
    assert isinstance(as_numpy[0]["input_ids"], np.ndarray)


def test_tokenized_validation():
    row = student_rows(1)[0]
    with pytest.raises(StoreError, match="same length"):
        tokenized_table([{**row, "response_mask": [1]}], "student")
    with pytest.raises(StoreError, match="form"):
        tokenized_table([{**row, "form": "other"}], "student")
    with pytest.raises(StoreError, match="side"):
        tokenized_table([row], "assistant")


def test_options_compress_text_not_tensors(store):
    from tests.storage.conftest import add_row, cache_row
    from storage.teacher_cache import TeacherCacheWriter

    with store.writer("cache_teacher", "fp", params={}) as w:
        with TeacherCacheWriter(w, "cache-00000") as c:
            add_row(c, cache_row(0, "cot", topk=3))
    md = store.get("cache_teacher", "fp").parquet_file("cache-00000").metadata.row_group(0)
    codecs = {md.column(i).path_in_schema: md.column(i).compression
              for i in range(md.num_columns)}
    assert codecs["hidden"] == "UNCOMPRESSED" and codecs["topk_logits"] == "UNCOMPRESSED"
    assert codecs["input_ids.list.element"] == "ZSTD" and codecs["id"] == "ZSTD"
    assert detect_kind(TEACHER_CACHE_SCHEMA) == "teacher_cache"
    assert detect_kind(pa.schema([("x", pa.int8())])) is None
