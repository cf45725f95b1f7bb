"""The pipeline flow and one flow per stage, each runnable and deployable on its own.

    prepare -> teacher_sft? -> generate -> tokenize -> cache_teacher -> distill -> evaluate

Flows take a config path (plus ``key.path=value`` overrides) so that deployments carry only
JSON-able parameters; the config's fingerprints decide what is reused and what is recomputed.
"""
from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from cot2align_core.config import STAGES, load_config
from tasks import STAGE_TASKS
from tasks.common import (StageRef, baseline_configs, logger, plan, preflight, upstream_of,
                          upstream_refs)
from tasks.stage import open_store


def _threads(cfg) -> None:
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)


def _summary_markdown(cfg, refs: dict[str, StageRef]) -> str:
    lines = [f"# cot2align run `{cfg.name}`", "", "| stage | status | seconds | artifact |",
             "|---|---|---:|---|"]
    for key, ref in refs.items():
        status = "reused" if ref.reused else "computed"
        lines.append(f"| {key} | {status} | {ref.seconds:.1f} | `{ref.path}` |")
    return "\n".join(lines)


@flow(name="cot2align-pipeline", log_prints=True)
def pipeline_flow(config_path: str, overrides: list[str] | None = None,
                  force: list[str] | None = None) -> dict[str, dict]:
    """Run every stage of the config in order; finished stages are reused, not recomputed."""
    cfg = load_config(config_path, overrides)
    preflight(cfg)
    _threads(cfg)
    store = open_store(cfg)
    fps = plan(cfg)
    force = set(force or [])
    refs: dict[str, StageRef] = {}
    for stage in STAGES:
        if stage == "teacher_sft" and not cfg.teacher_sft.enabled:
            continue
        if stage == "evaluate":
            for name, variant in baseline_configs(cfg).items():
                key = f"distill:{name}"
                refs[key] = STAGE_TASKS["distill"](
                    variant, fps[key], {u: refs[u] for u in upstream_of(variant, "distill")},
                    force="distill" in force, label=key)
        refs[stage] = STAGE_TASKS[stage](cfg, fps[stage],
                                         {u: refs[u] for u in upstream_of(cfg, stage)},
                                         force=stage in force)
    store.record_run(cfg.name, {k: r.fingerprint for k, r in refs.items()})
    create_markdown_artifact(_summary_markdown(cfg, refs), key="cot2align-run-summary",
                             description=f"cot2align pipeline run of {cfg.name}")
    return {k: r.to_dict() for k, r in refs.items()}


def run_single_stage(stage: str, config_path: str, overrides: list[str] | None = None,
                     force: bool = False) -> dict:
    """Run one stage against the existing upstream artifacts of the config."""
    cfg = load_config(config_path, overrides)
    preflight(cfg)
    _threads(cfg)
    store = open_store(cfg)
    fps = plan(cfg)
    ups = upstream_refs(store, cfg, stage, fps)
    refs: dict[str, StageRef] = {}
    if stage == "distill":
        for name, variant in baseline_configs(cfg).items():
            key = f"distill:{name}"
            refs[key] = STAGE_TASKS["distill"](variant, fps[key],
                                               upstream_refs(store, variant, "distill", fps),
                                               force=force, label=key)
    refs[stage] = STAGE_TASKS[stage](cfg, fps[stage], ups, force=force)
    logger().info("stage %s: %s", stage, refs[stage].path)
    return {k: r.to_dict() for k, r in refs.items()}


def _stage_flow(stage: str):
    @flow(name=f"cot2align-{stage}", log_prints=True)
    def stage_flow(config_path: str, overrides: list[str] | None = None,
                   force: bool = False) -> dict:
        return run_single_stage(stage, config_path, overrides, force)

    stage_flow.__doc__ = f"Run the {stage} stage alone, against the existing upstream artifacts."
    return stage_flow


prepare_flow = _stage_flow("prepare")
teacher_sft_flow = _stage_flow("teacher_sft")
generate_flow = _stage_flow("generate")
tokenize_flow = _stage_flow("tokenize")
cache_teacher_flow = _stage_flow("cache_teacher")
distill_flow = _stage_flow("distill")
evaluate_flow = _stage_flow("evaluate")
STAGE_FLOWS = {s: globals()[f"{s}_flow"] for s in STAGES}
