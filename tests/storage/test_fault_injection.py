"""Fault injection on real files and real processes: nothing damaged is used silently, and
nothing needed is lost (issue 12's cases that live in the storage layer).

Each test breaks a small store the way a disk, a person or a crash would (flipped bytes,
truncation, hand-edited manifests, SIGKILL at the commit, a foreign or live lock, a full
disk, a read-only mount, gc beside live or killed runs) and checks what the store does.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from storage.errors import (ArtifactLockedError, CorruptDataError, ManifestError, StoreError,
                            StoreWriteError)
from storage.store import ArtifactStore, fingerprint, open_artifact
from storage.teacher_cache import TeacherCacheReader, TeacherCacheWriter
from tests.storage.conftest import add_row, cache_row, rationale_table
from tests.storage.test_inspect import run_cli
from tests.storage.test_store import PARAMS, write_parts

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
SHARDS = ["part-00000", "part-00001", "part-00002"]


def flip(path: Path, at: int | None = None) -> None:
    """Flip all bits of the byte at offset ``at`` (default: the middle of the last column
    chunk's pages, so the footer stays readable)."""
    if at is None:
        meta = pq.ParquetFile(path).metadata
        column = meta.row_group(0).column(meta.num_columns - 1)
        at = column.data_page_offset + column.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def shard_bytes(art) -> dict[str, bytes]:
    return {s.name: Path(art.shard_path(s.name)).read_bytes() for s in art.shards}


def start(code: str, *args: str) -> subprocess.Popen:
    """A real Python process running ``code`` (storage imports only: it starts fast)."""
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(marker: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{marker} did not appear"
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# ---------------------------------------------------------------------------------------
# Damaged shards: flipped, truncated


def test_flipped_shard_is_caught_on_read_and_by_verify_and_repair_recomputes_only_it(
        store, capsys):
    art = write_parts(store)
    reference = shard_bytes(art)
    flip(Path(art.shard_path("part-00001")))
    # The quick check sees sizes, footers and rows: a flipped data byte passes it...
    assert art.check_quick().ok
    # ...but every reader that streams the whole shard hashes it and refuses it.
    for read in (lambda: art.read_table("part-00001"), lambda: art.read_kind("part"),
                 lambda: list(art.iter_batches(kind="part"))):
        with pytest.raises(CorruptDataError) as e:
            read()
        msg = str(e.value)
        assert f"{art.path}/part-00001.parquet is damaged" in msg and "sha256" in msg
        assert f"cot2align verify --repair {art.path}" in msg
    assert art.read_table("part-00000").num_rows == 10
    assert run_cli("verify", str(art.path)) == 1
    assert "part-00001: sha256 differs" in capsys.readouterr().out

    assert run_cli("verify", "--repair", str(art.path)) == 0
    out = capsys.readouterr().out
    assert "dropped part-00001.parquet" in out and "recomputes only the dropped shards" in out
    written = []
    fixed = write_parts(store, fp=art.fingerprint, written=written)
    assert written == ["part-00001"]
    assert shard_bytes(fixed) == reference and fixed.verify().ok


def test_flipped_page_fails_its_crc_in_random_access_readers(store):
    rows = [cache_row(i, form, torch.float16) for i in range(12) for form in ("standard", "cot")]
    with store.writer("cache_teacher", "fp", params={}) as w:
        with TeacherCacheWriter(w, "cache-00000", row_group_bytes=4 << 10) as cache:
            for row in rows:
                add_row(cache, row)
    art = store.get("cache_teacher", "fp")
    assert len(TeacherCacheReader(art)) == 24
    flip(Path(art.shard_path("cache-00000")))
    with pytest.raises(CorruptDataError, match=r"cache-00000\.parquet is damaged: a page"):
        list(TeacherCacheReader(art))
    assert not art.verify().ok


def test_truncated_shard_is_a_clear_error_naming_the_file(store):
    art = write_parts(store)
    shard = Path(art.shard_path("part-00002"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    report = art.check_quick()
    assert report.action == "repair" and report.bad_shards == ["part-00002"]
    assert "truncated" in report.summary()
    with pytest.raises(CorruptDataError, match=r"part-00002\.parquet is damaged: truncated"):
        art.read_table("part-00002")
    with pytest.raises(CorruptDataError, match="Parquet footer is unreadable"):
        art.parquet_file("part-00002")


# ---------------------------------------------------------------------------------------
# Manifests that cannot lie


def _drop_two_shards(m):
    m["shards"] = m["shards"][:1]


def _edit_rows(m):
    m["shards"][0]["rows"] = 7
    m["rows"] -= 3


def _edit_params(m):
    m["params"]["n"] = 11


def _drop_digest(m):
    del m["digest"]


@pytest.mark.parametrize("edit", [_drop_two_shards, _edit_rows, _edit_params, _drop_digest])
def test_hand_edited_manifest_is_refused_then_recomputed(store, capsys, edit):
    art = write_parts(store)
    path = Path(art.path) / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))
    with pytest.raises(ManifestError) as e:
        store.get("generate", art.fingerprint)
    assert str(path) in str(e.value) and "verify --repair" in str(e.value)
    with pytest.raises(ManifestError):
        open_artifact(art.path)
    report = store.check("generate", art.fingerprint)
    assert report.status == "broken" and report.action == "recompute"
    with pytest.raises(ManifestError):                     # no silent overwrite either
        with store.writer("generate", art.fingerprint, params=PARAMS):
            pass
    assert run_cli("verify", str(art.path)) == 1
    assert run_cli("verify", "--repair", str(art.path)) == 0
    assert "recomputes it whole" in capsys.readouterr().out
    written = []
    fixed = write_parts(store, fp=art.fingerprint, written=written)
    assert written == SHARDS and fixed.verify().ok


def test_unreadable_manifest_is_broken(store):
    art = write_parts(store)
    (Path(art.path) / "manifest.json").write_text('{"status": "complete", "shards": [')
    with pytest.raises(ManifestError, match="not readable JSON"):
        store.get("generate", art.fingerprint)


def test_verify_store_reports_partial_and_broken_and_exits_non_zero(store, capsys):
    write_parts(store, fp=fingerprint("generate", {"v": 1}, {}, 1))
    with pytest.raises(RuntimeError):
        write_parts(store, fp=fingerprint("generate", {"v": 2}, {}, 1), fail_after=1)
    broken = write_parts(store, fp=fingerprint("generate", {"v": 3}, {}, 1))
    manifest = Path(broken.path) / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"rows": 27', '"rows": 30'))
    assert run_cli("verify", store.root) == 1
    captured = capsys.readouterr()
    assert "FAILED (partial)" in captured.out and "never finished" in captured.out
    assert "FAILED (broken)" in captured.out and "does not match its digest" in captured.out
    assert "2 of 3 artifacts FAILED" in captured.err


def test_artifact_being_written_is_noted_not_failed(store, capsys):
    write_parts(store)
    opened, release = threading.Event(), threading.Event()

    def hold():
        with store.writer("tokenize", "abc", params={}) as w:
            w.write_shard("student-00000", rationale_table(2))
            opened.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert opened.wait(10)
        assert run_cli("verify", store.root) == 0
        assert f"being written by {socket.gethostname()} pid {os.getpid()}" in \
            capsys.readouterr().out
    finally:
        release.set()
        t.join()


# ---------------------------------------------------------------------------------------
# Resume adopts only journaled, matching shards


def test_flipped_shard_under_a_partial_manifest_is_not_adopted(store, tmp_path):
    fp = fingerprint("generate", PARAMS, {}, 1)
    reference = shard_bytes(write_parts(ArtifactStore(tmp_path / "clean"), fp=fp))
    with pytest.raises(RuntimeError):
        write_parts(store, fp=fp, fail_after=2)                 # part-00000, -00001 journaled
    path = Path(store.path("generate", fp))
    flip(path / "part-00000.parquet")
    (path / "part-00002.parquet").write_bytes(reference["part-00002"])   # not journaled
    written = []
    art = write_parts(store, fp=fp, written=written)
    assert written == ["part-00000", "part-00002"]
    assert art.manifest["resumed"]["shards_reused"] == ["part-00001"]
    assert shard_bytes(art) == reference and art.verify().ok


# ---------------------------------------------------------------------------------------
# SIGKILL exactly at the commit

COMMIT_THEN_DIE = """
import os, signal, sys
import pyarrow as pa
from storage.store import ArtifactStore
from storage.writer import ArtifactWriter

ArtifactWriter._clean_after_commit = lambda self: os.kill(os.getpid(), signal.SIGKILL)
with ArtifactStore(sys.argv[1]).writer("generate", "fp", params={}) as w:
    w.write_shard("part-00000", pa.table({"x": list(range(10))}))
"""


def test_kill_exactly_at_commit_leaves_leftovers_that_the_next_open_removes(tmp_path):
    root = tmp_path / "store"
    proc = start(COMMIT_THEN_DIE, str(root))
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    path = root / "generate" / "fp"
    assert {"manifest.json", ".lock", "_progress"} <= set(os.listdir(path))
    art = ArtifactStore(root).get("generate", "fp")
    assert art is not None and art.check_quick().ok
    assert sorted(os.listdir(path)) == ["manifest.json", "part-00000.parquet"]


# ---------------------------------------------------------------------------------------
# Locks that expire by heartbeat

HOLD_LOCK = """
import sys, time
from pathlib import Path
from storage.store import ArtifactStore

store = ArtifactStore(sys.argv[1], lock_heartbeat_every=0.1)
with store.writer("generate", "fp", params={}) as w:
    Path(sys.argv[2]).touch()
    time.sleep(60)
"""


@pytest.mark.parametrize("holder", [
    {"pid": 1, "host": "container-before-restart"},         # another host
    {"pid": os.getpid(), "host": socket.gethostname()},     # this host, a live (reused) pid
])
def test_lock_with_an_old_heartbeat_is_taken_over_promptly_and_logged(store, caplog, holder):
    fp = fingerprint("generate", PARAMS, {}, 1)
    path = Path(store.path("generate", fp))
    path.mkdir(parents=True)
    old = time.time() - 3600
    (path / ".lock").write_text(json.dumps({**holder, "time": old, "heartbeat": old,
                                            "token": "x"}))
    os.utime(path / ".lock", (old, old))
    caplog.set_level(logging.INFO, logger="cot2align")
    t0 = time.monotonic()
    assert write_parts(store, fp=fp) is not None
    assert time.monotonic() - t0 < 5
    assert (f"took over stale lock held by {holder['host']} pid {holder['pid']} "
            "(last heartbeat 3600 s ago)") in caplog.text
    assert not (path / ".lock").exists()


def test_live_holder_keeps_its_lock_by_heartbeat_and_the_waiter_logs(tmp_path, caplog):
    root, marker = tmp_path / "store", tmp_path / "holding"
    proc = start(HOLD_LOCK, str(root), str(marker))
    try:
        wait_for(marker, proc)
        waiter = ArtifactStore(root, lock_stale_after=1.0, lock_log_every=0.3)
        caplog.set_level(logging.INFO, logger="cot2align")
        with pytest.raises(ArtifactLockedError, match=f"pid {proc.pid}"):
            with waiter.writer("generate", "fp", params={}, lock_timeout=2.0):
                pass
        waits = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
        assert len(waits) >= 4 and all(f"pid {proc.pid}" in m for m in waits)
        assert "took over" not in caplog.text        # heartbeats kept it fresh past 1 s
    finally:
        kill(proc)
    with waiter.writer("generate", "fp", params={}, lock_timeout=10) as w:
        w.write_shard("part-00000", rationale_table(2))
    assert "took over stale lock" in caplog.text


def test_a_writer_that_lost_its_lock_does_not_commit(tmp_path):
    store = ArtifactStore(tmp_path / "store", lock_stale_after=0.3, lock_heartbeat_every=60)
    with pytest.raises(StoreError, match="lost its lock"):
        with store.writer("generate", "fp", params={}) as stalled:
            stalled.write_shard("part-00000", rationale_table(3))
            time.sleep(0.5)                   # no heartbeat for longer than the bound
            with store.writer("generate", "fp", params={}) as other:
                other.write_shard("part-00000", rationale_table(3))
    assert store.get("generate", "fp").manifest["writer"]["pid"] == os.getpid()


# ---------------------------------------------------------------------------------------
# gc that cannot delete needed work


def _configs(tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "a" / "demo.yaml", tmp_path / "b" / "demo.yaml"
    for cfg in (a, b):
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text("name: demo\n")
    return a, b


def test_gc_keeps_every_config_with_the_same_name_variants_and_stage_runs(store, tmp_path,
                                                                          capsys):
    fps = {k: fingerprint("generate", {"v": k}, {}, 1) for k in ("a", "b", "set", "stage", "x")}
    for fp in fps.values():
        write_parts(store, fp=fp)
    cfg_a, cfg_b = _configs(tmp_path)
    store.begin_run(cfg_a, "demo", {"generate": fps["a"]}).finish()
    store.begin_run(cfg_b, "demo", {"generate": fps["b"]}).finish()
    store.begin_run(cfg_a, "demo", {"generate": fps["set"]},
                    overrides=["evaluate.max_tokens=40"]).finish()
    store.begin_run(cfg_a, "demo", {"generate": fps["stage"]}, scope="stage:generate").finish()
    assert run_cli("gc", store.root) == 0
    out = capsys.readouterr().out
    assert "would remove 1 artifacts" in out and fps["x"] in out
    assert not any(fps[k] in out for k in ("a", "b", "set", "stage"))
    assert run_cli("gc", store.root, "--yes") == 0
    left = {e.fingerprint for e in store.list_artifacts()}
    assert left == {fps[k] for k in ("a", "b", "set", "stage")}
    # The next plain run of config a replaces its own record, and only that one.
    store.begin_run(cfg_a, "demo", {"generate": fps["b"]}).finish()
    assert [e.fingerprint for e in store.garbage()] == [fps["a"]]


LIVE_RUN = """
import sys, time
from pathlib import Path
import pyarrow as pa
from storage.store import ArtifactStore

root, cfg, marker = sys.argv[1:4]
store = ArtifactStore(root)
with store.begin_run(cfg, "other", {"prepare": "p1", "tokenize": "t1", "distill": "d1"}):
    with store.writer("distill", "d1", params={}) as w, \\
            store.writer("cache_teacher", "unnamed", params={}) as w2:
        w.write_shard("part-00000", pa.table({"x": [1, 2]}))
        w2.write_shard("part-00000", pa.table({"x": [1, 2]}))
        Path(marker).touch()
        time.sleep(60)
"""


def test_gc_during_a_live_run_of_another_config_keeps_its_work(store, tmp_path, capsys):
    for stage, fp in (("prepare", "p1"), ("tokenize", "t1"), ("generate", "unused")):
        with store.writer(stage, fp, params={}) as w:
            w.write_shard("part-00000", rationale_table(3))
    cfg, _ = _configs(tmp_path)
    marker = tmp_path / "running"
    proc = start(LIVE_RUN, store.root, str(cfg), str(marker))
    try:
        wait_for(marker, proc)
        assert run_cli("gc", store.root, "--yes") == 0
        out = capsys.readouterr().out
        assert f"keeping cache_teacher/unnamed" in out and f"pid {proc.pid}" in out
        left = {(e.stage, e.fingerprint) for e in store.list_artifacts()}
        assert left == {("prepare", "p1"), ("tokenize", "t1"), ("distill", "d1"),
                        ("cache_teacher", "unnamed")}
        (run,) = store.runs().values()
        assert run["live"] and run["config_path"] == str(cfg)
    finally:
        kill(proc)


KILLED_RUN = """
import sys, time
from pathlib import Path
import pyarrow as pa
from storage.store import ArtifactStore

root, cfg, marker = sys.argv[1:4]
store = ArtifactStore(root)
store.begin_run(cfg, "demo", {"prepare": "p1", "teacher_sft": "s1"})
with store.writer("prepare", "p1", params={}) as w:
    w.write_shard("train", pa.table({"x": [1, 2, 3]}))
with store.writer("teacher_sft", "s1", params={}) as w:
    ckpt = w.file_path("checkpoints")
    ckpt.mkdir()
    (ckpt / "step-000000020.pt").write_bytes(b"weights" * 1000)
    Path(marker).touch()
    time.sleep(60)
"""


def test_gc_after_a_killed_run_keeps_its_work_and_checkpoints(store, tmp_path, capsys):
    cfg, _ = _configs(tmp_path)
    marker = tmp_path / "training"
    proc = start(KILLED_RUN, store.root, str(cfg), str(marker))
    wait_for(marker, proc)
    kill(proc)
    assert run_cli("gc", store.root, "--yes") == 0
    assert {e.fingerprint for e in store.list_artifacts()} == {"p1", "s1"}
    (run,) = store.runs().values()
    assert run["status"] == "running" and not run["live"]
    # The config's next run no longer names teacher_sft: its checkpoints are still kept.
    store.begin_run(cfg, "demo", {"prepare": "p1"}).finish()
    capsys.readouterr()
    assert run_cli("gc", store.root, "--yes") == 0
    assert "keeping teacher_sft/s1" in capsys.readouterr().out
    assert store.path("teacher_sft", "s1").exists()
    assert run_cli("gc", store.root, "--yes", "--include-partial") == 0
    assert not store.path("teacher_sft", "s1").exists() and store.get("prepare", "p1")


# ---------------------------------------------------------------------------------------
# --force that cannot lose the finished artifact


def test_force_replace_failing_midway_leaves_the_old_artifact_intact(store):
    art = write_parts(store)
    before, manifest = shard_bytes(art), art.manifest
    with pytest.raises(RuntimeError, match="model folder without tokenizer files"):
        with store.writer("generate", art.fingerprint, params=PARAMS, replace=True) as w:
            assert not w.complete
            w.write_shard("part-00000", rationale_table(4))
            raise RuntimeError("model folder without tokenizer files")
    again = store.get("generate", art.fingerprint)
    assert again.manifest == manifest and shard_bytes(again) == before and again.verify().ok

    with store.writer("generate", art.fingerprint, params=PARAMS, replace=True) as w:
        assert w.done_shards() == ["part-00000"]            # the failed attempt's, resumed
        w.write_file("side/new.json", b"{}")
    new = store.get("generate", art.fingerprint)
    assert [s.name for s in new.shards] == ["part-00000"] and new.rows == 4
    assert sorted(os.listdir(new.path)) == ["manifest.json", "part-00000.parquet", "side"]
    assert os.listdir(Path(new.path) / "side") == ["new.json"] and new.verify().ok


def test_replace_killed_during_the_swap_is_rolled_forward(store, monkeypatch):
    art = write_parts(store)
    calls = []
    real_replace = store.fs.replace

    def fail_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "Input/output error", dst)
        real_replace(src, dst)

    with pytest.raises(StoreWriteError, match="Input/output error"):
        with store.writer("generate", art.fingerprint, params=PARAMS, replace=True) as w:
            w.write_shard("part-00000", rationale_table(5))
            w.write_shard("part-00001", rationale_table(6))
            monkeypatch.setattr(store.fs, "replace", fail_second)
    monkeypatch.setattr(store.fs, "replace", real_replace)
    assert store.get("generate", art.fingerprint) is None     # half swapped: not trusted
    with store.writer("generate", art.fingerprint, params=PARAMS) as w:
        assert w.complete and [s.name for s in w.artifact.shards] == SHARDS[:2]
    assert store.get("generate", art.fingerprint).verify().ok


# ---------------------------------------------------------------------------------------
# Errors, not tracebacks: disk full, I/O error at the rename, read-only store


def _dev_full_at(target: Path) -> Path:
    """Make the writer's temporary file for ``target`` a link to /dev/full: its writes fail
    with a real ENOSPC from the kernel."""
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is not available to inject ENOSPC")
    tmp = Path(f"{target}.tmp-{os.getpid()}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    os.symlink("/dev/full", tmp)
    return tmp


def _no_temporaries(path: Path) -> bool:
    return not [p for p in path.rglob("*") if ".tmp-" in p.name]


def test_disk_full_while_writing_a_shard_a_side_file_or_the_manifest(store):
    fp = fingerprint("generate", PARAMS, {}, 1)
    path = Path(store.path("generate", fp))
    with pytest.raises(StoreWriteError) as e:
        with store.writer("generate", fp, params=PARAMS) as w:
            w.write_shard("part-00000", rationale_table(10))
            _dev_full_at(path / "part-00001.parquet")
            w.write_shard("part-00001", rationale_table(9))
    msg = str(e.value)
    assert "shard 'part-00001'" in msg and "No space left on device" in msg
    assert "the disk is full" in msg and "temporary file is removed" in msg
    assert _no_temporaries(path) and os.listdir(path / "_progress") == ["part-00000.json"]

    with pytest.raises(StoreWriteError, match="side file 'side/meta.json'.*disk is full"):
        with store.writer("generate", fp, params=PARAMS) as w:
            _dev_full_at(path / "side" / "meta.json")
            w.write_file("side/meta.json", b"{}")
    assert _no_temporaries(path)

    with pytest.raises(StoreWriteError, match="the manifest of generate/.*disk is full.*not "
                                              "committed"):
        with store.writer("generate", fp, params=PARAMS) as w:
            _dev_full_at(path / "manifest.json")
    assert _no_temporaries(path) and store.get("generate", fp) is None
    written = []
    art = write_parts(store, fp=fp, written=written)
    assert written == ["part-00001", "part-00002"] and art.verify().ok


def test_io_error_at_the_manifest_rename_is_a_clear_error(store):
    fp = fingerprint("generate", PARAMS, {}, 1)
    path = Path(store.path("generate", fp))
    with pytest.raises(StoreWriteError) as e:
        with store.writer("generate", fp, params=PARAMS) as w:
            w.write_shard("part-00000", rationale_table(10))
            (path / "manifest.json" / "blocker").mkdir(parents=True)   # rename target: a folder
    assert f"the manifest of generate/{fp} at {path}/manifest.json" in str(e.value)
    assert "Is a directory" in str(e.value) and _no_temporaries(path)
    shutil.rmtree(path / "manifest.json")
    written = []
    write_parts(store, fp=fp, written=written)
    assert written == ["part-00001", "part-00002"]


READ_ONLY_CHECKS = """
import sys
from storage.errors import StoreError
from storage.store import ArtifactStore

store = ArtifactStore(sys.argv[1])
report = store.check("generate", sys.argv[2])
assert report.ok, report.summary()
assert report.artifact.read_kind("part").num_rows == 27
for attempt in (lambda: store.writer("generate", "new", params={}).__enter__(),
                lambda: store.begin_run(None, "demo", {})):
    try:
        attempt()
        raise SystemExit("a write into the read-only store did not fail")
    except StoreError as e:
        msg = str(e)
        assert "--store" not in msg and "`store:`" in msg and "--set store=" in msg, msg
        print(msg)
print("READ-ONLY OK")
"""


def _run_read_only(root: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` with ``root`` read-only: a read-only bind mount in a private mount
    namespace when running as root (where chmod does not bite), else chmod."""
    if os.geteuid() == 0:
        probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {root} {root} && "
                                f"mount -o remount,bind,ro {root}"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"running as root and cannot mount read-only: {probe.stderr!r}")
        script = (f'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && '
                  f'exec {sys.executable} -c "$1" "$0" "${{@:2}}"')
        cmd = ["unshare", "-m", "bash", "-c", script, str(root), code, *args]
        return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True,
                              timeout=120)
    modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")] if p.is_dir()}
    for p in modes:
        p.chmod(0o555)
    try:
        return subprocess.run([sys.executable, "-c", code, str(root), *args], cwd=REPO,
                              env=ENV, capture_output=True, text=True, timeout=120)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def test_read_only_store_is_reused_and_writing_names_the_store_setting(store):
    art = write_parts(store)
    # A stale lock and journal left by a kill at the commit: a reader cannot remove them on a
    # read-only store, and must not need to.
    (Path(art.path) / ".lock").write_text(json.dumps({"pid": 1, "host": "gone", "time": 0}))
    (Path(art.path) / "_progress").mkdir()
    done = _run_read_only(Path(store.root), READ_ONLY_CHECKS, art.fingerprint)
    assert done.returncode == 0, done.stderr
    assert "READ-ONLY OK" in done.stdout and "not writable" in done.stdout


# ---------------------------------------------------------------------------------------
# Stale downstream after a repair; paths that do not exist


def _one_shard(store, stage: str, fp: str, rows: int, upstream: dict | None = None,
               replace: bool = False):
    with store.writer(stage, fp, params={}, upstream=upstream, replace=replace) as w:
        w.write_shard("part-00000", rationale_table(rows))
    return store.get(stage, fp)


def test_downstream_is_stale_when_its_upstream_is_recomputed_into_other_bytes(store):
    up = _one_shard(store, "generate", "gen", 10)
    down = _one_shard(store, "tokenize", "tok", 2, upstream={"generate": "gen"})
    assert down.manifest["upstream_digests"] == {"generate": up.content_digest}
    assert down.check_quick().ok and down.check_quick().upstreams_checked == 1
    _one_shard(store, "generate", "gen", 10, replace=True)       # --force, the same bytes
    assert down.check_quick().ok
    new = _one_shard(store, "generate", "gen", 8, replace=True)  # --force, other bytes
    report = down.check_quick()
    assert report.stale and report.action == "recompute"
    for text in ("upstream generate/gen", up.content_digest[:12], new.content_digest[:12]):
        assert text in report.summary()
    _one_shard(store, "tokenize", "tok", 2, upstream={"generate": "gen"}, replace=True)
    assert store.check("tokenize", "tok").ok


def test_repair_sets_aside_everything_built_from_the_repaired_artifact(store, capsys):
    up = write_parts(store)
    chain = {"generate": up.fingerprint}

    def build_downstream():
        _one_shard(store, "tokenize", "tok", 2, upstream=chain)
        _one_shard(store, "cache_teacher", "cache", 2, upstream={"tokenize": "tok"})

    build_downstream()
    flip(Path(up.shard_path("part-00000")))
    assert run_cli("verify", "--repair", str(up.path)) == 0
    out = capsys.readouterr().out
    assert "set aside too" in out and "tokenize/tok" in out and "cache_teacher/cache" in out
    for stage, fp in (("tokenize", "tok"), ("cache_teacher", "cache")):
        assert store.get(stage, fp) is None and store.check(stage, fp).status == "invalidated"
        assert os.listdir(store.path(stage, fp)) == ["manifest.invalid.json"]
    # A stage repairing itself (writer(invalidate=...)) sets aside the same way.
    write_parts(store, fp=up.fingerprint)
    build_downstream()
    with store.writer("generate", up.fingerprint, params=PARAMS, invalidate=["part-00001"]) as w:
        w.write_shard("part-00001", rationale_table(10).slice(0, 9), row_group_size=4,
                      info={"kept": 9})
    assert store.get("tokenize", "tok") is None and store.get("cache_teacher", "cache") is None


@pytest.mark.parametrize("command", ["verify", "inspect", "ls", "gc"])
def test_missing_or_wrong_paths_exit_non_zero(tmp_path, capsys, command):
    missing, a_file, not_a_store = tmp_path / "nope", tmp_path / "f.txt", tmp_path / "src"
    a_file.write_text("x")
    not_a_store.mkdir()
    (not_a_store / "main.py").write_text("")
    (not_a_store / "pkg").mkdir()
    for path, says in ((missing, "does not exist"), (a_file, "is a file"),
                       (not_a_store, "is not")):
        assert run_cli(command, str(path)) == 2
        err = capsys.readouterr().err
        assert str(path) in err and says in err
