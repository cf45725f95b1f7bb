"""The whole pipeline under Prefect's real temporary server, on a tiny config.

Covers: every stage runs and writes a verifiable artifact; a rerun recomputes nothing; a
changed parameter invalidates exactly the stages that read it and their dependents; a single
stage reruns against the existing upstream artifacts without touching them; and a real SIGKILL
during generate, cache_teacher and distill, then a resumed run, ends with what an uninterrupted
run wrote (data shards byte for byte, distilled weights exactly, on CPU).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cot2align_core.config import load_config
from storage.store import ArtifactStore, open_artifact, verify
from tasks.registry import plan
from tests.flows.conftest import run_cli, tiny_config_dict, write_config

pytestmark = pytest.mark.slow

MAIN, SFT = "distill[cot2align,seed=0]", "distill[sft,seed=0]"
ALL = ["prepare", "teacher_sft", "generate", "tokenize", "cache_teacher", MAIN, SFT, "evaluate"]


def manifest_mtimes(results: dict) -> dict[str, float]:
    return {k: (Path(r["path"]) / "manifest.json").stat().st_mtime_ns for k, r in results.items()}


def test_every_stage_writes_a_complete_verifiable_artifact(tiny_run):
    config, results, store = tiny_run
    assert list(results) == ALL
    assert not any(r["reused"] for r in results.values())
    for key, ref in results.items():
        report = verify(ref["path"])
        assert report.ok, (key, report.summary())
    gen = open_artifact(results["generate"]["path"])
    assert gen.info["summary"]["backend"] == "VLLMBackend"  # vLLM's CPU build, for real
    assert gen.info["summary"]["rationales"] == 48
    tok = open_artifact(results["tokenize"]["path"])
    assert set(tok.kinds()) == {"teacher", "student"}
    assert tok.read_kind("student").num_rows == tok.read_kind("teacher").num_rows >= 48
    cache = open_artifact(results["cache_teacher"]["path"])
    assert cache.has_file("teacher_embeddings.safetensors")
    assert cache.rows == tok.read_kind("teacher").num_rows
    ev = open_artifact(results["evaluate"]["path"])
    metrics = ev.read_table("metrics").to_pylist()
    assert {(m["model"], m["form"], m["decoding"]) for m in metrics} == {
        (model, form, dec) for model in ("cot2align", "sft", "teacher")
        for form in ("standard", "cot") for dec in ("greedy", "sampled")}
    assert all(m["n_seeds"] == 1 for m in metrics)  # one training seed
    diffs = ev.read_table("differences").to_pylist()
    assert {(d["model"], d["reference"]) for d in diffs} == {("cot2align", "sft")}
    report = Path(results["evaluate"]["summary"]["report"])
    text = report.read_text()
    for png in ("loss_curves.png", "metrics.png", "transport_plan.png", "differences.png"):
        assert (report.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in text
    # The distilled student is a plain transformers checkpoint.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(Path(results[MAIN]["path"]) / "model")


def test_prefect_records_the_run_and_its_artifacts(tiny_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["cot2align-metrics", "cot2align-run-summary",
                                        "stage-distill-cot2align-seed-0", "stage-generate"])))
        assert {a.key for a in arts} >= {"cot2align-metrics", "cot2align-run-summary",
                                         "stage-distill-cot2align-seed-0", "stage-generate"}
        runs = client.read_flow_runs()
        assert any(r.state.is_completed() for r in runs)


def test_rerun_recomputes_nothing(tiny_run):
    from flows.pipeline import pipeline_flow

    config, results, store = tiny_run
    before = manifest_mtimes(results)
    again = pipeline_flow(str(config))
    assert all(r["reused"] for r in again.values())
    assert {k: r["path"] for k, r in again.items()} == {k: r["path"] for k, r in results.items()}
    assert manifest_mtimes(again) == before


@pytest.mark.parametrize("override, changed", [
    ("evaluate.seeds=[3]", {"evaluate"}),
    ("distill.training.lr=0.001", {MAIN, SFT, "evaluate"}),
    ("distill.objective.alpha=0.3", {MAIN, "evaluate"}),
    ("generate.temperature=0.7", {"generate", "tokenize", "cache_teacher", MAIN, SFT,
                                  "evaluate"}),
    ("cache_teacher.dtype=bfloat16", {"cache_teacher", MAIN, SFT, "evaluate"}),
    ("teacher_sft.training.steps=31", set(ALL) - {"prepare"}),
])
def test_a_parameter_change_invalidates_exactly_the_downstream_stages(tiny_run, override, changed):
    config = tiny_run[0]
    base = plan(load_config(config))
    new = plan(load_config(config, [override]))
    assert {str(k) for k in base if base[k] != new[k]} == changed


def test_one_stage_rerun_touches_nothing_else(tiny_run, prefect_api_url):
    config, results, store = tiny_run
    before = manifest_mtimes(results)
    shards = {s.name: s.sha256 for s in open_artifact(results["tokenize"]["path"]).shards}
    proc = run_cli(["stage", "tokenize", str(config), "--force"], prefect_api_url)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = manifest_mtimes(results)
    assert after["tokenize"] != before["tokenize"]  # recomputed...
    assert {s.name: s.sha256 for s in open_artifact(results["tokenize"]["path"]).shards} == shards
    assert {k: v for k, v in after.items() if k != "tokenize"} == \
           {k: v for k, v in before.items() if k != "tokenize"}  # ...and nothing else


def test_a_stage_without_its_upstream_says_what_to_run(tmp_path, tiny_run, capsys):
    from flows.cli import main

    cfg = tiny_config_dict(tmp_path / "empty-store")
    config = write_config(tmp_path / "c.yaml", cfg)
    assert main(["stage", "distill", str(config), "--student", "cot2align"]) == 2
    err = capsys.readouterr().err
    assert "needs the 'prepare' artifact" in err and "cot2align stage prepare" in err


UPSTREAM = {
    "generate": ["prepare", "teacher_sft"],
    "cache_teacher": ["prepare", "teacher_sft", "generate", "tokenize"],
    MAIN: ["prepare", "teacher_sft", "generate", "tokenize", "cache_teacher"],
}


@pytest.mark.parametrize("stage, kill_at", [
    ("generate", "generate:shard:1"),
    ("cache_teacher", "cache_teacher:shard:1"),
    (MAIN, "distill:step:5"),
])
def test_sigkill_mid_stage_then_resume_equals_uninterrupted(tiny_run, prefect_api_url, tmp_path,
                                                            stage, kill_at):
    config, results, store_a = tiny_run
    store_b = tmp_path / "store"
    for up in UPSTREAM[stage]:
        src = Path(results[up]["path"])
        shutil.copytree(src, store_b / src.parent.name / src.name)
    config_b = write_config(tmp_path / "tiny.yaml", tiny_config_dict(store_b))
    name = stage.split("[")[0]
    args = ["stage", name, str(config_b)]
    if name == "distill":
        args += ["--student", "cot2align"]  # the main student only
    killed = run_cli(args, prefect_api_url, env={"COT2ALIGN_KILL_AT": kill_at})
    assert killed.returncode == -9, killed.stderr[-3000:]
    fp = results[stage]["fingerprint"]
    partial = store_b / name / fp
    assert partial.is_dir() and not (partial / "manifest.json").exists()
    if name == "distill":
        assert sorted(p.name for p in (partial / "checkpoints").iterdir())  # steps 2 and 4 kept
    else:
        assert len(list(partial.glob("*.parquet"))) == 1

    resumed = run_cli(args, prefect_api_url)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = open_artifact(results[stage]["path"]), open_artifact(partial)
    if name != "distill":
        assert len(b.manifest["resumed"]["shards_reused"]) == 1  # the shard written before the kill
    if name == "distill":
        wa = load_file(Path(a.path) / "model" / "model.safetensors")
        wb = load_file(Path(b.path) / "model" / "model.safetensors")
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        ha, hb = a.read_table("history").to_pylist(), b.read_table("history").to_pylist()
        assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    else:
        names = sorted(s.name for s in a.shards)
        assert names == sorted(s.name for s in b.shards)
        for name in names:
            assert (Path(a.path) / f"{name}.parquet").read_bytes() == \
                   (Path(b.path) / f"{name}.parquet").read_bytes(), name


def test_cli_inspects_verifies_and_lists_pipeline_artifacts(tiny_run, capsys):
    from flows.cli import main

    config, results, store = tiny_run
    assert main(["inspect", results["tokenize"]["path"], "--json", "--rows", "2"]) == 0
    info = json.loads(capsys.readouterr().out)
    text = json.dumps(info)
    assert "Ġ" in text or "▁" in text or "<s>" in text  # ids decoded by the stage's tokenizers
    assert main(["inspect", results["cache_teacher"]["path"]]) == 0
    out = capsys.readouterr().out
    assert "kind 'cache'" in out and "std" in out and "finite" in out  # per-layer stats
    assert main(["verify", results[MAIN]["path"]]) == 0
    assert main(["ls", str(store)]) == 0
    listing = capsys.readouterr().out
    assert all(r["fingerprint"] in listing for r in results.values())
    assert main(["plan", str(config)]) == 0
    assert all(line.endswith("complete") for line in capsys.readouterr().out.strip().splitlines())
