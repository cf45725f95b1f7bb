import pytest
import torch

from storage.distill_dataset import DistillDataset
from storage.schemas import PARQUET_OPTIONS
from storage.teacher_cache import MissingTeacherRowError, TeacherCacheWriter
from tests.storage.conftest import add_row, cache_row, student_table



def build(store, n=9, drop=None):
    """A tokenize artifact (student side) and a teacher cache for ids 0..n-1."""
    forms_of = lambda i: ("standard", "cot") if i % 3 else ("standard",)  # noqa: E731
    with store.writer("tokenize", "tok", params={}) as w:
        w.write_shard("student-00000", student_table(n, forms_of=forms_of),
                      **PARQUET_OPTIONS["tokenized"])
    rows = {}
    with store.writer("cache_teacher", "cache", params={}) as w:
        with TeacherCacheWriter(w, "cache-00000", row_group_bytes=4096) as cache:
            for i in range(n):
                for form in forms_of(i):
                    if (i, form) == drop:
                        continue
                    rows[(f"ex{i:04d}", form)] = r = cache_row(i, form, torch.bfloat16, topk=2)
                    add_row(cache, r)
    return store.get("tokenize", "tok"), store.get("cache_teacher", "cache"), rows


def test_join_by_id_and_form(store):
    tok, cache, rows = build(store)
    ds = DistillDataset.from_artifacts(tok, cache, include_text=True)
    assert len(ds) == 9 and ds.ids[0] == "ex0000" and ds.index_of("ex0004") == 4
    item = ds[0]
    assert item["id"] == "ex0000" and item["cot"] is None
    std = item["standard"]
    assert std["input_ids"].dtype == torch.int64 and std["response_mask"].dtype == torch.bool
    assert std["input_ids"].tolist() == list(range(100, 105)) and std["prompt_tokens"] == 2
    assert std["mined_alignment"].tolist() == [0, 1, 2] and std["text"].startswith("prompt 0")
    want = rows[("ex0000", "standard")]
    assert torch.equal(std["teacher_hidden"].view(torch.int16), want["hidden"].view(torch.int16))
    assert std["teacher_layers"] == (-2, -1)
    assert torch.equal(std["teacher_positions"], want["positions"].int())
    assert std["teacher_topk_ids"].shape == (std["teacher_hidden"].shape[1], 2)
    item = ds[5]
    assert item["cot"] is not None and item["standard"]["mined_alignment"] is None
    assert torch.equal(item["cot"]["teacher_target_ids"], rows[("ex0005", "cot")]["target_ids"].int())
    # Only some forms; no teacher at all.
    assert DistillDataset.from_artifacts(tok, cache, forms=("cot",))[0]["standard"] is None
    assert len(DistillDataset.from_artifacts(tok, cache, forms=("cot",))) == 6
    plain = DistillDataset.from_artifacts(tok, None)[1]["cot"]
    assert "teacher_hidden" not in plain and "input_ids" in plain


def test_missing_teacher_row_is_named(store):
    tok, cache, _ = build(store, drop=(5, "cot"))
    with pytest.raises(MissingTeacherRowError) as e:
        DistillDataset.from_artifacts(tok, cache)
    assert "'ex0005'/cot" in str(e.value) and "rerun cache_teacher" in str(e.value)
