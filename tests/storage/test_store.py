import json
import os
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import ArtifactCompleteError, ArtifactLockedError, StoreError
from storage.store import ArtifactStore, fingerprint, open_artifact, verify
from tests.storage.conftest import rationale_table

PARAMS = {"n": 10, "model": "tiny"}


def write_parts(store, stage="generate", fp=None, n_shards=3, rows=10, fail_after=None,
                written=None):
    fp = fp or fingerprint(stage, PARAMS, {}, 1)
    with store.writer(stage, fp, params=PARAMS, upstream={}, version=1) as w:
        if w.complete:
            return w.artifact
        for s in range(n_shards):
            name = f"part-{s:05d}"
            if name in w.done_shards():
                continue
            if fail_after is not None and s == fail_after:
                raise RuntimeError("boom")
            w.write_shard(name, rationale_table(rows).slice(0, rows - s), row_group_size=4,
                          info={"kept": rows - s})
            if written is not None:
                written.append(name)
        if not w.has_file("side/meta.json"):
            w.write_file("side/meta.json", b'{"a": 1}')
        w.info["kept"] = 27
    return store.get(stage, fp)


def test_write_read_manifest(store):
    art = write_parts(store)
    assert art is not None and art.path == store.path("generate", art.fingerprint)
    m = art.manifest
    assert m["status"] == "complete" and m["stage"] == "generate" and m["version"] == 1
    assert m["params"] == PARAMS and m["upstream"] == {}
    assert [s["name"] for s in m["shards"]] == ["part-00000", "part-00001", "part-00002"]
    assert [s["rows"] for s in m["shards"]] == [10, 9, 8] and m["rows"] == 27
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in m["shards"])
    assert m["shards"][1]["info"] == {"kept": 9}
    assert m["files"][0]["path"] == "side/meta.json" and m["files"][0]["bytes"] == 8
    assert "rationale: string not null" in m["schemas"]["part"]["string"]
    assert {"python", "pyarrow", "torch"} <= set(m["libraries"])
    assert m["timings"]["seconds"] >= 0 and m["info"] == {"kept": 27}
    assert art.read_table("part-00001").num_rows == 9
    assert sum(b.num_rows for b in art.iter_batches(batch_size=4)) == 27
    assert art.read_kind("part").num_rows == 27
    assert art.read_file("side/meta.json") == b'{"a": 1}'
    assert pq.ParquetFile(art.shard_path("part-00000")).metadata.num_row_groups == 3
    assert open_artifact(art.path).fingerprint == art.fingerprint
    assert verify(art.path).ok
    # Nothing temporary is left behind.
    names = os.listdir(art.path)
    assert not [n for n in names if ".tmp-" in n] and "_progress" not in names
    assert ".lock" not in names


def test_get_is_none_until_complete_and_resume_after_exception(store):
    fp = fingerprint("generate", PARAMS, {}, 1)
    with pytest.raises(RuntimeError, match="boom"):
        write_parts(store, fp=fp, fail_after=2)
    assert store.get("generate", fp) is None
    assert not os.path.exists(os.path.join(store.path("generate", fp), "manifest.json"))
    written = []
    art = write_parts(store, fp=fp, written=written)
    assert written == ["part-00002"]              # the whole shards were kept
    assert art.manifest["resumed"]["shards_reused"] == ["part-00000", "part-00001"]
    assert art.manifest["shards"][0]["info"] == {"kept": 10}   # info kept from _progress
    assert verify(art.path).ok


def test_unreadable_shard_is_dropped_on_resume(store):
    fp = fingerprint("generate", PARAMS, {}, 1)
    with pytest.raises(RuntimeError):
        write_parts(store, fp=fp, fail_after=2)
    path = store.path("generate", fp)
    with open(path / "part-00001.parquet", "r+b") as f:     # footer destroyed
        f.truncate(100)
    (path / "part-00002.parquet.tmp-999999").write_bytes(b"partial")
    written = []
    write_parts(store, fp=fp, written=written)
    assert written == ["part-00001", "part-00002"]
    assert not (path / "part-00002.parquet.tmp-999999").exists()


def test_second_writer_finds_it_complete(store):
    art = write_parts(store)
    with store.writer("generate", art.fingerprint, params=PARAMS, version=1) as w:
        assert w.complete and w.artifact.fingerprint == art.fingerprint
        assert w.done_shards() == ["part-00000", "part-00001", "part-00002"]
        with pytest.raises(ArtifactCompleteError):
            w.write_shard("part-00003", rationale_table(2))
    assert store.get("generate", art.fingerprint).manifest == art.manifest


def test_live_lock_times_out_with_a_clear_error(store):
    fp = fingerprint("generate", PARAMS, {}, 1)
    with store.writer("generate", fp, params=PARAMS):
        t0 = time.monotonic()
        with pytest.raises(ArtifactLockedError) as e:
            with store.writer("generate", fp, params=PARAMS, lock_timeout=0.3):
                pass
        assert time.monotonic() - t0 >= 0.3
        msg = str(e.value)
        assert f"generate/{fp}" in msg and f"pid {os.getpid()}" in msg and ".lock" in msg


def test_waiting_writer_gets_the_lock_when_released(store):
    fp = fingerprint("generate", PARAMS, {}, 1)
    release = threading.Event()

    def hold():
        with store.writer("generate", fp, params=PARAMS) as w:
            w.write_shard("part-00000", rationale_table(3))
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    time.sleep(0.2)
    threading.Timer(0.3, release.set).start()
    with store.writer("generate", fp, params=PARAMS, lock_timeout=10) as w:
        assert w.complete                        # the holder finished it
    t.join()


def test_stale_lock_of_a_dead_process_is_taken_over(store):
    fp = fingerprint("generate", PARAMS, {}, 1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = store.path("generate", fp)
    path.mkdir(parents=True)
    (path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                            "time": time.time(), "token": "x"}))
    art = write_parts(store, fp=fp)
    assert art is not None and not (path / ".lock").exists()


def test_fresh_lock_of_another_host_is_waited_for(store):
    fp = fingerprint("generate", PARAMS, {}, 1)
    path = store.path("generate", fp)
    path.mkdir(parents=True)
    (path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": time.time(),
                                            "token": "x"}))
    with pytest.raises(ArtifactLockedError, match="elsewhere pid 1 .last heartbeat 0 s ago"):
        with store.writer("generate", fp, params=PARAMS, lock_timeout=0.2):
            pass


def test_verify_names_truncated_and_altered_shards_then_recompute_alone(store):
    art = write_parts(store)
    reference = {s.name: open(art.shard_path(s.name), "rb").read() for s in art.shards}
    path = art.path
    with open(path / "part-00000.parquet", "r+b") as f:
        f.truncate(len(reference["part-00000"]) - 10)
    data = bytearray(reference["part-00002"])
    data[len(data) // 3] ^= 0x01
    (path / "part-00002.parquet").write_bytes(bytes(data))
    report = verify(path)
    assert not report.ok
    assert report.bad_shards == ["part-00000", "part-00002"]
    reasons = {p.name: p.reason for p in report.problems}
    assert "truncated" in reasons["part-00000"] and "altered" in reasons["part-00002"]
    assert "part-00000" in report.summary() and "part-00002" in report.summary()

    store.invalidate_shards("generate", art.fingerprint, report.bad_shards)
    assert store.get("generate", art.fingerprint) is None
    assert (path / "manifest.invalid.json").exists()
    assert not verify(path).ok                          # not complete any more
    written = []
    fixed = write_parts(store, fp=art.fingerprint, written=written)
    assert written == ["part-00000", "part-00002"]
    assert verify(fixed.path).ok
    assert {s.name: open(fixed.shard_path(s.name), "rb").read() for s in fixed.shards} == reference
    assert not (path / "manifest.invalid.json").exists()
    assert fixed.manifest["resumed"]["files_reused"] == ["side/meta.json"]


def test_verify_names_a_bad_side_file_and_a_missing_shard(store):
    art = write_parts(store)
    (art.path / "side" / "meta.json").write_bytes(b'{"a": 2}')
    os.remove(art.path / "part-00001.parquet")
    report = verify(art.path)
    assert report.bad_shards == ["part-00001"] and report.bad_files == ["side/meta.json"]
    assert {p.reason for p in report.problems} >= {"missing"}


def test_writer_invalidate_option(store):
    art = write_parts(store)
    fp = art.fingerprint
    with store.writer("generate", fp, params=PARAMS, invalidate=["part-00001"]) as w:
        assert not w.complete and w.done_shards() == ["part-00000", "part-00002"]
        w.write_shard("part-00001", rationale_table(10).slice(0, 9), row_group_size=4,
                      info={"kept": 9})
    assert store.get("generate", fp).manifest["shards"] == art.manifest["shards"]


def test_side_files_and_folders(store):
    fp = fingerprint("distill", {}, {}, 1)
    with store.writer("distill", fp, params={}) as w:
        model_dir = w.file_path("model")
        model_dir.mkdir()
        (model_dir / "config.json").write_text("{}")
        (model_dir / "weights.bin").write_bytes(b"\0" * 100)
        records = w.add_file("model")
        assert sorted(r.path for r in records) == ["model/config.json", "model/weights.bin"]
        with pytest.raises(StoreError):
            w.write_file("../escape", b"x")
        with pytest.raises(StoreError):
            w.add_file("missing.bin")
    art = store.get("distill", fp)
    assert art.has_file("model") and art.file_path("model") == art.path / "model"
    assert art.rows == 0 and verify(art.path).ok


def test_bad_names_are_refused(store):
    with pytest.raises(StoreError):
        store.writer("_runs", "abc", params={})
    with pytest.raises(StoreError):
        store.writer("generate", "../x", params={})
    with pytest.raises(StoreError, match="params"):
        store.writer("generate", "abc", params={"p": object()})
    with store.writer("generate", "abc", params={}) as w:
        with pytest.raises(StoreError):
            w.write_shard("a/b", rationale_table(1))


def test_not_writable_store_is_a_clear_error(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError) as e:
        ArtifactStore(blocker).check_writable()
    assert str(blocker) in str(e.value) and "is a file" in str(e.value)
    with pytest.raises(StoreError) as e:
        ArtifactStore(blocker / "sub").check_writable()
    assert str(blocker / "sub") in str(e.value) and "store" in str(e.value)
    # The writer checks before doing anything.
    with pytest.raises(StoreError):
        with ArtifactStore(blocker).writer("generate", "abc", params={}):
            pass


def test_read_only_store_is_a_clear_error(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o500)
        try:
            with pytest.raises(StoreError, match="not writable"):
                ArtifactStore(ro).check_writable()
        finally:
            ro.chmod(0o700)
    # As root permissions do not bite: simulate the refused write.
    store = ArtifactStore(ro)

    def refuse(path, data):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(store.fs, "write_atomic", refuse)
    with pytest.raises(StoreError) as e:
        store.check_writable()
    assert str(ro) in str(e.value) and "not writable" in str(e.value)


def test_runs_list_garbage_remove(store):
    a = write_parts(store, fp=fingerprint("generate", {"v": 1}, {}, 1))
    b = write_parts(store, fp=fingerprint("generate", {"v": 2}, {}, 1))
    c = write_parts(store, stage="tokenize", fp=fingerprint("tokenize", {}, {}, 1))
    fp_partial = fingerprint("generate", {"v": 3}, {}, 1)
    with pytest.raises(RuntimeError):
        write_parts(store, fp=fp_partial, fail_after=1)
    store.record_run("demo", {"generate": a.fingerprint, "tokenize": c.fingerprint})
    store.record_run("paper/qwen", {"generate": b.fingerprint, "distill:sft": "zzz"})
    store.record_run("demo", {"generate": a.fingerprint})      # latest run of demo wins
    records = sorted(os.listdir(os.path.join(store.root_path, "_runs")))
    assert len(records) == 2 and records[1].startswith("paper_qwen-run-")
    entries = {(e.stage, e.fingerprint): e for e in store.list_artifacts()}
    assert len(entries) == 4
    ea = entries[("generate", a.fingerprint)]
    assert ea.status == "complete" and ea.rows == 27 and ea.bytes > 0 and ea.age_s >= 0
    assert ea.referenced_by == ["demo"]
    assert entries[("generate", b.fingerprint)].referenced_by == ["paper/qwen"]
    assert entries[("generate", fp_partial)].status == "partial"
    assert entries[("generate", fp_partial)].rows is None
    garbage = store.garbage()
    assert sorted((e.stage, e.fingerprint) for e in garbage) == sorted(
        [("tokenize", c.fingerprint), ("generate", fp_partial)])
    removed = store.remove(garbage)
    assert len(removed) == 2
    assert not os.path.exists(store.path("tokenize", c.fingerprint))
    assert not os.path.exists(os.path.join(store.root_path, "tokenize"))
    assert store.get("generate", a.fingerprint) is not None


def test_remove_refuses_an_artifact_being_written(store):
    fp = fingerprint("generate", {}, {}, 1)
    with store.writer("generate", fp, params={}) as w:
        w.write_shard("part-00000", rationale_table(2))
        (entry,) = store.list_artifacts()
        assert entry.locked_by is not None and store.garbage() == []
        with pytest.raises(StoreError, match="being written"):
            store.remove([entry])


def test_discard(store):
    art = write_parts(store)
    store.discard("generate", art.fingerprint)
    assert store.get("generate", art.fingerprint) is None
    assert not os.path.exists(art.path)
    assert write_parts(store, fp=art.fingerprint) is not None


def test_memory_store_write_read_verify(memory_store):
    art = write_parts(memory_store)
    assert isinstance(art.path, str) and art.path.startswith("memory://")
    assert art.read_table("part-00002").num_rows == 8
    assert art.read_file("side/meta.json") == b'{"a": 1}'
    assert verify(art.path).ok and memory_store.verify("generate", art.fingerprint).ok
    fs = memory_store.fs.fs
    shard = memory_store.artifact_dir("generate", art.fingerprint) + "/part-00001.parquet"
    data = bytearray(fs.cat(shard))
    data[len(data) // 2] ^= 0xFF
    fs.pipe(shard, bytes(data))
    assert verify(art.path).bad_shards == ["part-00001"]
    memory_store.invalidate_shards("generate", art.fingerprint, ["part-00001"])
    written = []
    write_parts(memory_store, fp=art.fingerprint, written=written)
    assert written == ["part-00001"] and verify(art.path).ok
    # Side folders through the local staging path.
    fp = fingerprint("distill", {}, {}, 1)
    with memory_store.writer("distill", fp, params={}) as w:
        d = w.file_path("model")
        d.mkdir()
        (d / "config.json").write_text("{}")
        w.add_file("model")
    assert memory_store.get("distill", fp).read_file("model/config.json") == b"{}"
    memory_store.record_run("demo", {"generate": art.fingerprint})
    assert {e.stage for e in memory_store.garbage()} == {"distill"}


def test_schema_per_kind_and_mismatch(store):
    with pytest.raises(StoreError, match="schema"):
        with store.writer("tokenize", "abc", params={}) as w:
            w.write_shard("student-00000", pa.table({"x": [1]}))
            w.write_shard("student-00001", pa.table({"y": ["a"]}))
    with store.writer("tokenize", "def", params={}) as w:
        w.write_shard("student-00000", pa.table({"x": [1]}))
        w.write_shard("teacher-00000", pa.table({"y": ["a"]}))
        w.write_shard("extra", pa.table({"y": ["a"]}), kind="teacher")
    art = store.get("tokenize", "def")
    assert set(art.manifest["schemas"]) == {"student", "teacher"}
    assert [s.name for s in art.shards_of("teacher")] == ["extra", "teacher-00000"]
    assert art.schema("student").names == ["x"]


def test_run_records_are_written_at_start_and_finished(store, tmp_path):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("name: demo\n")
    with store.begin_run(cfg, "demo", {"generate": "g1"}) as run:
        (rec,) = store.runs().values()
        assert rec["status"] == "running" and rec["live"] and rec["config_path"] == str(cfg)
        assert rec["artifacts"] == {"generate": "g1"} and rec["pid"] == os.getpid()
        run.set_artifacts({"generate": "g1", "tokenize": "t1"})
    (rec,) = store.runs().values()
    assert rec["status"] == "ok" and not rec["live"] and rec["finished"] >= rec["started"]
    assert rec["artifacts"] == {"generate": "g1", "tokenize": "t1"}
    with pytest.raises(ValueError):
        with store.begin_run(cfg, "demo", {"generate": "g2"}):
            raise ValueError("stage failed")
    (rec,) = store.runs().values()                   # same config, same key: replaced
    assert rec["status"] == "failed" and rec["artifacts"] == {"generate": "g2"}


def test_quick_check_report_and_actions(store):
    art = write_parts(store)
    report = store.check("generate", art.fingerprint)
    assert report.ok and report.action == "reuse" and report.artifact.digest == art.digest
    assert report.summary().startswith("checked: 3 shards, 1 side files, 0 upstream digests; "
                                       "sizes, rows, digest;")
    assert store.check("generate", "0" * 16).action == "compute"
    os.remove(art.path / "side" / "meta.json")
    report = store.check("generate", art.fingerprint)
    assert report.action == "repair" and report.bad_files == ["side/meta.json"]
    assert "file side/meta.json: missing" in report.summary()
