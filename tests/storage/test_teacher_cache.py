import pickle

import pyarrow.parquet as pq
import pytest
import torch

from storage.errors import StoreError
from storage.teacher_cache import (MissingTeacherRowError, TeacherCacheReader,
                                   TeacherCacheWriter, decode_rows)
from storage.teacher_embeddings import (TEACHER_EMBEDDINGS, load_teacher_embeddings,
                                        save_teacher_embeddings)
from tests.storage.conftest import add_row, cache_row

INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def write_cache(store, rows, fp="fp", shard="cache-00000", **kw):
    with store.writer("cache_teacher", fp, params={}) as w:
        with TeacherCacheWriter(w, shard, **kw) as cache:
            for row in rows:
                add_row(cache, row)
    return store.get("cache_teacher", fp), cache


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_bit_for_bit(store, dtype):
    rows = [cache_row(i, f, dtype, topk=5 if i % 2 else 0) for i in range(12)
            for f in ("standard", "cot")]
    rows[3]["hidden"].view(-1)[:3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    art, cache = write_cache(store, rows, row_group_bytes=4096)
    assert cache.row_groups > 1
    reader = TeacherCacheReader(art)
    assert len(reader) == len(rows) and reader.keys()[0] == ("ex0000", "standard")
    streamed = list(reader)
    for want, got in zip(rows, streamed):
        assert (got.id, got.form) == (want["id"], want["form"])
        assert bits_equal(got.hidden, want["hidden"])
        assert got.layers == tuple(want["layers"])
        assert torch.equal(got.input_ids, want["input_ids"].int())
        assert torch.equal(got.positions, want["positions"].int())
        assert torch.equal(got.target_ids, want["target_ids"].int())
        if "topk_ids" in want:
            assert torch.equal(got.topk_ids, want["topk_ids"].int())
            assert bits_equal(got.topk_logits, want["topk_logits"])
        else:
            assert got.topk_ids is None and got.topk_logits is None
    got = reader.get("ex0007", "cot")                  # random access
    assert bits_equal(got.hidden, rows[15]["hidden"])
    assert bits_equal(got.layer(-1), rows[15]["hidden"][1])
    with pytest.raises(StoreError, match="layer 5"):
        got.layer(5)


def test_tensors_share_the_arrow_buffer(store):
    rows = [cache_row(i, "cot", torch.bfloat16) for i in range(4)]
    art, _ = write_cache(store, rows)
    table = pq.ParquetFile(art.shard_path("cache-00000")).read_row_group(0)
    buf = table.column("hidden").chunk(0).buffers()[2]
    decoded = decode_rows(table)
    for row in decoded:
        assert buf.address <= row.hidden.data_ptr() < buf.address + buf.size
    del table, buf
    # The tensors keep the Arrow memory alive after the table is gone.
    assert bits_equal(decoded[2].hidden, rows[2]["hidden"])


def test_row_groups_cut_by_bytes(store):
    rows = [cache_row(i, "standard", torch.float32, n_layers=1, width=64) for i in range(10)]
    sizes = [r["hidden"].numel() * 4 for r in rows]
    budget = sum(sizes[:3])
    art, cache = write_cache(store, rows, row_group_bytes=budget)
    # A row group is written as soon as the buffer reaches the budget.
    expected, acc = 0, 0
    for s in sizes:
        acc += s
        if acc >= budget:
            expected, acc = expected + 1, 0
    expected += acc > 0
    assert pq.ParquetFile(art.shard_path("cache-00000")).metadata.num_row_groups == expected
    assert cache.row_groups == expected


def test_mixed_dtypes_and_unaligned_rows(store):
    rows = [cache_row(0, "standard", torch.float16, n_layers=1, width=3),
            cache_row(1, "standard", torch.float32, n_layers=1, width=3),
            cache_row(2, "standard", torch.bfloat16, n_layers=1, width=3)]
    rows[0]["hidden"] = rows[0]["hidden"][:, :1]        # 6 bytes: the next row is unaligned
    rows[0]["positions"], rows[0]["target_ids"] = rows[0]["positions"][:1], rows[0]["target_ids"][:1]
    art, _ = write_cache(store, rows)
    reader = TeacherCacheReader(art)
    for row in rows:
        assert bits_equal(reader.get(row["id"], "standard").hidden, row["hidden"])


def test_empty_row_and_validation(store):
    row = cache_row(0, "cot", n_layers=1)
    row["hidden"] = row["hidden"][:, :0]
    row["positions"], row["target_ids"] = [], []
    art, _ = write_cache(store, [row])
    got = TeacherCacheReader(art).get("ex0000", "cot")
    assert got.hidden.shape == (1, 0, 32) and got.n_tokens == 0

    with store.writer("cache_teacher", "bad", params={}) as w:
        with TeacherCacheWriter(w, "cache-00000") as cache:
            ok = cache_row(1, "cot")
            for change, match in [({"form": "long"}, "form"),
                                  ({"layers": [-1]}, "layer ids"),
                                  ({"positions": [1, 2]}, "positions"),
                                  ({"hidden": ok["hidden"].double()}, "dtype"),
                                  ({"hidden": ok["hidden"][0]}, r"\[n_layers"),
                                  ({"topk_ids": torch.zeros(2, 2)}, "topk")]:
                with pytest.raises((StoreError, TypeError), match=match):
                    add_row(cache, {**ok, **change})
            add_row(cache, ok)


def test_missing_row_and_duplicates(store):
    art, _ = write_cache(store, [cache_row(0, "cot")])
    reader = TeacherCacheReader(art)
    with pytest.raises(MissingTeacherRowError, match="ex0000.*standard"):
        reader.get("ex0000", "standard")
    art2, _ = write_cache(store, [cache_row(0, "cot"), cache_row(0, "cot")], fp="dup")
    with pytest.raises(StoreError, match="two rows"):
        TeacherCacheReader(art2)


def test_several_shards_cache_limit_and_pickle(store):
    rows = {}
    with store.writer("cache_teacher", "multi", params={}) as w:
        for s in range(3):
            with TeacherCacheWriter(w, f"cache-{s:05d}", row_group_bytes=2048) as cache:
                for i in range(s * 5, s * 5 + 5):
                    rows[i] = cache_row(i, "standard")
                    add_row(cache, rows[i])
        w.write_shard("other-00000", decode_schema_free_table())
    art = store.get("cache_teacher", "multi")
    reader = TeacherCacheReader(art, cache_bytes=1)   # keeps only the last row group
    assert reader.shard_names == ["cache-00000", "cache-00001", "cache-00002"]
    for i in (14, 0, 7, 14):
        assert bits_equal(reader.get(f"ex{i:04d}", "standard").hidden, rows[i]["hidden"])
    assert len(reader._cache) == 1
    clone = pickle.loads(pickle.dumps(reader))
    assert not clone._cache and not clone._files
    assert bits_equal(clone.get("ex0003", "standard").hidden, rows[3]["hidden"])


def decode_schema_free_table():
    import pyarrow as pa

    return pa.table({"x": [1]})


def test_memory_store_cache(memory_store):
    rows = [cache_row(i, "cot", torch.bfloat16) for i in range(3)]
    art, _ = write_cache(memory_store, rows)
    reader = TeacherCacheReader(art)
    assert bits_equal(reader.get("ex0001", "cot").hidden, rows[1]["hidden"])


@pytest.mark.parametrize("tied", [False, True])
def test_teacher_embeddings_side_file(store, memory_store, tied):
    embed = torch.randn(50, 8, dtype=torch.bfloat16)
    head = embed if tied else torch.randn(50, 8, dtype=torch.bfloat16)
    for s in (store, memory_store):
        with s.writer("cache_teacher", "emb", params={}) as w:
            save_teacher_embeddings(w, embed, head)
        art = s.get("cache_teacher", "emb")
        assert art.has_file(TEACHER_EMBEDDINGS)
        loaded = load_teacher_embeddings(art)
        assert bits_equal(loaded["embed"], embed) and bits_equal(loaded["lm_head"], head)
        assert (loaded["lm_head"] is loaded["embed"]) == tied
    only = load_teacher_embeddings(store.get("cache_teacher", "emb").file_path(TEACHER_EMBEDDINGS))
    assert bits_equal(only["embed"], embed)
    with store.writer("cache_teacher", "emb2", params={}) as w:
        save_teacher_embeddings(w, embed)
    assert set(load_teacher_embeddings(store.get("cache_teacher", "emb2"))) == {"embed"}

