"""Faults injected into a finished pipeline store, then the user's commands run again: nothing
damaged is used silently, damaged work is repaired by recomputing only what it must, nothing
finished is lost. Each case works on its own copy of the session's tiny store, with real files
and real processes (flipped bytes, hand-edited manifests, SIGKILL, a failing --force)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from storage.store import open_artifact
from tests.flows.conftest import run_cli, tiny_config_dict, write_config

pytestmark = pytest.mark.slow

MAIN, SFT = "distill[cot2align,seed=0]", "distill[sft,seed=0]"


@pytest.fixture
def store_copy(tiny_run, tmp_path):
    """(config path, results, store) of a private copy of the session's finished store."""
    config, results, store = tiny_run
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    moved = {k: {**r, "path": str(copy / Path(r["path"]).relative_to(store))}
             for k, r in results.items()}
    return write_config(tmp_path / "tiny.yaml", tiny_config_dict(copy)), moved, copy


def weights(ref) -> dict[str, torch.Tensor]:
    return load_file(Path(ref["path"]) / "model" / "model.safetensors")


def flip(path: Path, offset: int, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_cache_shard_is_found_repaired_and_never_trained_on(store_copy, tiny_run):
    """Case 1: bytes flipped inside a teacher-cache shard (sizes and footer intact, so the
    quick check passes), the student deleted: the run finds the damage when it reads the
    page, drops that shard, recomputes it, and trains exactly the reference weights."""
    from flows.pipeline import pipeline_flow

    config, results, store = store_copy
    cache = Path(results["cache_teacher"]["path"])
    shard = sorted(cache.glob("cache-*.parquet"))[0]
    original = shard.read_bytes()
    flip(shard, len(original) // 2)
    shutil.rmtree(results[MAIN]["path"])
    again = pipeline_flow(str(config))
    assert shard.read_bytes() == original  # recomputed, byte for byte
    ref = weights(tiny_run[1][MAIN])
    new = weights(again[MAIN])
    assert all(torch.equal(ref[k], new[k]) for k in ref)
    assert open_artifact(again["evaluate"]["path"]).verify().ok


def test_a_manifest_edited_by_hand_is_not_trusted(store_copy):
    """Case 4: two shard entries dropped from tokenize's manifest: its digest no longer
    matches, so tokenize is recomputed (to the same bytes) instead of training on a subset;
    what was built from those bytes stays valid."""
    from flows.pipeline import pipeline_flow

    config, results, store = store_copy
    path = Path(results["tokenize"]["path"]) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"] = manifest["shards"][:-2]
    manifest["rows"] = sum(s["rows"] for s in manifest["shards"])
    path.write_text(json.dumps(manifest, indent=2))
    again = pipeline_flow(str(config))
    assert not again["tokenize"]["reused"]
    tok = open_artifact(again["tokenize"]["path"])
    assert tok.rows == json.loads((Path(results["prepare"]["path"]) / "manifest.json")
                                  .read_text())["rows"] or tok.rows > manifest["rows"]
    assert len(tok.shards) == len(manifest["shards"]) + 2
    assert again[MAIN]["reused"] and again["evaluate"]["reused"]


def test_a_kill_after_training_before_the_commit_loses_no_training(store_copy, prefect_api_url):
    """Case 8: SIGKILL once the student is trained and saved but before its manifest is
    committed; the rerun resumes at the last step (no step is trained again) and commits."""
    config, results, store = store_copy
    shutil.rmtree(results[MAIN]["path"])
    args = ["stage", "distill", str(config), "--student", "cot2align"]
    killed = run_cli(args, prefect_api_url, env={"COT2ALIGN_KILL_AT": "distill:trained:6"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    partial = Path(results[MAIN]["path"])
    assert not (partial / "manifest.json").exists() and any((partial / "checkpoints").iterdir())
    resumed = run_cli(args, prefect_api_url)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint step 6 of 6" in resumed.stderr + resumed.stdout
    assert not (partial / "checkpoints").exists()  # removed only after the commit
    art = open_artifact(partial)
    assert [h["step"] for h in art.read_table("history").to_pylist()] == list(range(1, 7))


def test_a_failing_force_keeps_the_finished_artifact(store_copy, prefect_api_url):
    """--force on a stage that then fails (its tokenizer folder is damaged) leaves the old,
    complete artifact in place and says what is wrong."""
    config, results, store = store_copy
    tok_file = Path(results["prepare"]["path"]) / "tokenizers" / "student" / "tokenizer.json"
    flip(tok_file, 10, 4)
    before = (Path(results["tokenize"]["path"]) / "manifest.json").read_bytes()
    proc = run_cli(["stage", "tokenize", str(config), "--force"], prefect_api_url)
    assert proc.returncode != 0
    assert "tokenizer.json is damaged" in proc.stderr + proc.stdout
    assert (Path(results["tokenize"]["path"]) / "manifest.json").read_bytes() == before
    assert open_artifact(results["tokenize"]["path"]).verify().ok


def test_a_killed_command_leaves_no_prefect_server_behind(store_copy):
    """Without PREFECT_API_URL a command starts a temporary Prefect server; SIGKILL to the
    command (here from inside a training step) takes that server down with it."""
    import os
    import re
    import socket
    import subprocess
    import sys
    import time

    from tests.flows.conftest import REPO

    config, results, store = store_copy
    shutil.rmtree(results[MAIN]["path"])
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(COT2ALIGN_KILL_AT="distill:step:2", OMP_NUM_THREADS="1",
               PREFECT_HOME=str(store.parent / "prefect-home"))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "distill", str(config),
                           "--student", "cot2align"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert "starting a temporary Prefect server" in proc.stderr
    port = int(re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)",
                         proc.stderr).group(1))
    deadline = time.time() + 15
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.5)
    else:
        pytest.fail(f"the temporary Prefect server on port {port} outlived its killed command")
