"""Real processes: killed with SIGKILL mid-shard and resumed; two writers at once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from storage.store import ArtifactStore, verify
from storage.teacher_cache import TeacherCacheReader, TeacherCacheWriter
from tests.storage.conftest import add_row, cache_row

REPO = Path(__file__).resolve().parents[2]
FP = "0123456789abcdef"
SHARDS, ROWS = 3, 24
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def write_cache(root: str, pause_marker: str | None = None, shard_sleep: float = 0.0,
                lock_timeout: float = 60.0) -> str:
    """Write a 3-shard teacher cache; with ``pause_marker``, stop for good in the middle of
    the second shard (after some of its row groups are written) and touch the marker."""
    store = ArtifactStore(root)
    with store.writer("cache_teacher", FP, params={"rows": ROWS}, version=1,
                      lock_timeout=lock_timeout) as w:
        if w.complete:
            return "complete"
        for s in range(SHARDS):
            name = f"cache-{s:05d}"
            if name in w.done_shards():
                continue
            with TeacherCacheWriter(w, name, row_group_bytes=24 << 10) as cache:
                for i in range(ROWS):
                    for form in ("standard", "cot"):
                        add_row(cache, cache_row(s * ROWS + i, form, torch.bfloat16, topk=4))
                    if pause_marker and s == 1 and i == ROWS // 2:
                        assert cache.row_groups >= 1
                        Path(pause_marker).touch()
                        time.sleep(600)
            time.sleep(shard_sleep)
        w.info["rows"] = SHARDS * ROWS * 2
    return "wrote"


def _start(*args: str) -> subprocess.Popen:
    code = ("import sys; from tests.storage.test_crash_resume import write_cache; "
            "print(write_cache(*sys.argv[1:2], **eval(sys.argv[2])), flush=True)")
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _shard_bytes(root: Path) -> dict[str, bytes]:
    art = ArtifactStore(root).get("cache_teacher", FP)
    return {s.name: Path(art.shard_path(s.name)).read_bytes() for s in art.shards}


def test_sigkill_mid_shard_then_resume_equals_uninterrupted(tmp_path):
    marker = tmp_path / "paused"
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    proc = _start(str(crashed), repr({"pause_marker": str(marker)}))
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "writer did not reach the middle of shard 2"
            time.sleep(0.05)
        art_dir = crashed / "cache_teacher" / FP
        names = os.listdir(art_dir)
        assert "cache-00000.parquet" in names
        assert f"cache-00001.parquet.tmp-{proc.pid}" in names       # shard 2 in progress
        assert (art_dir / f"cache-00001.parquet.tmp-{proc.pid}").stat().st_size > 0
        assert "manifest.json" not in names and ".lock" in names
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert ArtifactStore(crashed).get("cache_teacher", FP) is None

    assert write_cache(str(crashed)) == "wrote"       # takes over the dead writer's lock
    assert write_cache(str(clean)) == "wrote"
    art = ArtifactStore(crashed).get("cache_teacher", FP)
    assert art.manifest["resumed"]["shards_reused"] == ["cache-00000"]
    assert not [n for n in os.listdir(art.path) if ".tmp-" in n or n == ".lock"]
    resumed, reference = _shard_bytes(crashed), _shard_bytes(clean)
    assert list(resumed) == ["cache-00000", "cache-00001", "cache-00002"]
    assert resumed == reference                        # byte for byte
    clean_art = ArtifactStore(clean).get("cache_teacher", FP)
    assert art.manifest["shards"] == clean_art.manifest["shards"]
    assert verify(art.path).ok
    reader = TeacherCacheReader(art)
    assert len(reader) == SHARDS * ROWS * 2
    row = reader.get("ex0030", "cot")
    want = cache_row(30, "cot", torch.bfloat16, topk=4)
    assert torch.equal(row.hidden.view(torch.int16), want["hidden"].view(torch.int16))


def test_two_writers_at_once_end_with_one_intact_artifact(tmp_path):
    root = tmp_path / "store"
    procs = [_start(str(root), repr({"shard_sleep": 0.15})) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out.strip())
    assert sorted(outs) == ["complete", "wrote"]
    art = ArtifactStore(root).get("cache_teacher", FP)
    assert art is not None and verify(art.path).ok
    assert "resumed" not in art.manifest and len(art.shards) == SHARDS
