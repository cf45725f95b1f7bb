"""The benchmarks that read a pipeline's artifacts run against the session's tiny pipeline
store, so that a change of the stages' API cannot break them unnoticed (their numbers are not
checked here: they are measured side by side in one run, see README.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.flows.conftest import REPO


def _bench(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("deeper,trained", [(None, False), (8, False), (None, True)],
                         ids=["trained-teacher", "deeper-teacher", "trained-student"])
def test_distill_step_benchmark_times_the_three_steps(tiny_run, tmp_path, deeper, trained):
    config, _, _ = tiny_run
    out = tmp_path / "distill_step.json"
    proc = _bench(["benchmarks/distill_step.py", str(config), "--steps", "2", "--warmup", "1",
                   "--out", str(out)] + (["--teacher-layers", str(deeper)] if deeper else [])
                  + (["--trained"] if trained else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cached / live teacher" in proc.stdout and "CoT2Align / dskd alone" in proc.stdout
    got = json.loads(out.read_text())
    assert set(got["median_s"]) == {"cached", "live", "kd_base"}
    assert all(v > 0 for v in got["median_s"].values())
    assert got["teacher_params"] > got["student_params"]
    if deeper:  # 8 layers instead of the tiny config's 4, same width
        assert got["teacher_layers"] == 8 and got["teacher_params"] > 1.5 * 868_000
    assert got["trained"] is trained
    assert ("student trained (main student, seed 0)" in proc.stdout) is trained


def test_method_study_trains_and_scores_students(tiny_run, tmp_path):
    config, _, _ = tiny_run
    out = tmp_path / "study.jsonl"
    proc = _bench(["benchmarks/method_study.py", str(config), "--variants", "sft", "cot2align",
                   "--seeds", "0", "--steps", "2", "--jobs", "1", "--split", "test",
                   "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["variant"] for r in records} == {"sft", "cot2align"}
    assert all(r["steps"] == 2 and 0 <= r["greedy/standard"] <= 100 for r in records)
    assert next(r for r in records if r["variant"] == "cot2align")["max_ratio"] is not None
