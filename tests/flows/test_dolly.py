"""The shipped ``configs/dolly_tiny.yaml`` at its real sizes, as a user runs it: the paper's
Dolly rows (DSKD jsonl) at their natural lengths through every stage, the teacher's rationales
written by the real vLLM CPU build at the config's shard size (128 prompts, well over the 4096
prompt tokens that crashed its seeded chunked prefill), long prompts fitted by cutting the
input. Only the store (a temporary folder) and the data folder (found by the shared fixtures)
are set. Skips when ../shared is absent. About 5 minutes on 2 cores."""
from __future__ import annotations

import pytest
import yaml

from storage.store import open_artifact, verify
from tests.flows.conftest import REPO, write_config

pytestmark = pytest.mark.slow


def test_the_shipped_dolly_config_runs_end_to_end(dolly_dir, prefect_api_url, tmp_path):
    from flows.pipeline import pipeline_flow

    cfg = yaml.safe_load((REPO / "configs" / "dolly_tiny.yaml").read_text())
    shipped = yaml.safe_load((REPO / "configs" / "dolly_tiny.yaml").read_text())
    cfg["store"] = str(tmp_path / "store")
    cfg["data"].update(train_path=str(dolly_dir / "dev.jsonl"),
                       eval_path=str(dolly_dir / "valid.jsonl"))
    assert {k: v for k, v in cfg.items() if k not in ("store", "data")} == \
        {k: v for k, v in shipped.items() if k not in ("store", "data")}  # real sizes
    results = pipeline_flow(str(write_config(tmp_path / "dolly.yaml", cfg)))

    assert all(verify(r["path"]).ok for r in results.values())
    rows = open_artifact(results["prepare"]["path"]).read_table("train").to_pylist()
    assert len(rows) == shipped["data"]["max_train_rows"] and rows[0]["id"] == "train-000001"
    with_input = {r["id"] for r in rows if r["input"]}
    gen = open_artifact(results["generate"]["path"])
    assert gen.info["summary"]["backend"] == "VLLMBackend"  # vLLM's CPU build, for real
    assert len(gen.shards) >= 1 and shipped["generate"]["shard_size"] == 128
    rationales = gen.read_kind("rationales").to_pylist()
    assert {g["id"] for g in rationales} <= with_input  # the paper: CoT only with an input
    fit = gen.info["fit"]
    assert fit["kept"] + sum(fit["dropped"].values()) == len(with_input)
    assert fit["input_truncated"] > 0  # long Dolly inputs are cut, never the instruction
    assert all("### Instruction:" in g["prompt"] for g in rationales)
    tok = open_artifact(results["tokenize"]["path"])
    assert tok.info["summary"]["inputs_cut"] > 0
    student = tok.read_kind("student").to_pylist()
    teacher = tok.read_kind("teacher").to_pylist()
    assert [(r["id"], r["form"]) for r in student] == [(r["id"], r["form"]) for r in teacher]
    assert all(s["text"] == t["text"] for s, t in zip(student, teacher))  # one text, both sides
    assert {r["id"] for r in student if r["form"] == "cot"} <= with_input
    metrics = open_artifact(results["evaluate"]["path"]).read_table("metrics").to_pylist()
    assert {m["metric"] for m in metrics} == {"rougeL"}  # free-form answers: no exact match
