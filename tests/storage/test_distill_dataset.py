import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from storage.distill_dataset import DistillDataset, EpochSampler
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


def test_dataloader_with_the_sampler(store):
    tok, cache, _ = build(store)
    ds = DistillDataset.from_artifacts(tok, cache)
    sampler = EpochSampler(len(ds), batch_size=4, seed=3)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=list)
    batches = [[item["id"] for item in b] for b in loader]
    assert [len(b) for b in batches] == [4, 4, 1]
    assert sorted(sum(batches, [])) == sorted(ds.ids)


def test_sampler_deterministic_per_seed_and_epoch():
    a, b = EpochSampler(100, 8, seed=1), EpochSampler(100, 8, seed=1)
    assert a.batches(0) == b.batches(0)
    assert a.batches(0) != a.batches(1)
    assert a.batches(0) != EpochSampler(100, 8, seed=2).batches(0)
    assert sorted(sum(a.batches(3), [])) == list(range(100))
    assert EpochSampler(10, 3, shuffle=False).batches(5) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert EpochSampler(10, 3, drop_last=True).steps_per_epoch() == 3


def test_sampler_resumes_mid_epoch():
    full = EpochSampler(50, 4, seed=7)
    full.set_epoch(2)
    everything = list(full)
    resumed = EpochSampler(50, 4, seed=7)
    resumed.load_state_dict({"epoch": 2, "start_step": 5, "seed": 7})
    assert list(resumed) == everything[5:] and len(resumed) == len(everything) - 5
    with pytest.raises(ValueError):
        resumed.load_state_dict({"epoch": 0, "seed": 8})


def test_sampler_ranks_and_blocks():
    ranks = [EpochSampler(23, 2, seed=0, rank=r, world_size=3) for r in range(3)]
    per_rank = [r.batches(1) for r in ranks]
    assert {len(b) for b in per_rank} == {4}                 # 12 batches -> 4 each, tail dropped
    flat = [i for b in per_rank for batch in b for i in batch]
    assert len(flat) == len(set(flat))
    assert all(len(r) == 4 for r in ranks)
    blocks = EpochSampler(40, 5, seed=4, block_size=10).epoch_order(0)
    assert sorted(blocks) == list(range(40))
    for k in range(4):                                       # each block stays together
        chunk = blocks[k * 10:(k + 1) * 10]
        assert len(set(np.asarray(chunk) // 10)) == 1
