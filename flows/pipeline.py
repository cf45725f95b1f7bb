"""The pipeline flow and one flow per stage, each runnable and deployable on its own.

    prepare -> teacher_sft? -> generate -> tokenize -> cache_teacher -> distill[...] -> evaluate

Everything here derives from the stage registry (:mod:`tasks.registry`): the order, the
instances (one ``distill`` per student and training seed), the upstream artifacts each one
reads, and the flows (``cot2align-<stage>``). Flows take a config path (plus ``key.path=value``
overrides) so that deployments carry only JSON-able parameters; the config's fingerprints
decide what is reused and what is recomputed.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from cot2align_core.config import ConfigError, PipelineConfig, load_config
from storage.errors import CorruptDataError
from tasks import cluster
from tasks.common import StageRef, logger, preflight, upstream_refs
from tasks.registry import STAGES, StageKey, StageSpec, instances, plan, spec, upstream_keys
from tasks.stage import open_store


def _forced(key: StageKey, force: set[str]) -> bool:
    return key.stage in force or str(key) in force


def _run_instances(cfg: PipelineConfig, stage: StageSpec, keys: list[StageKey],
                   fps: dict[StageKey, str], ups: dict[StageKey, dict[str, StageRef]],
                   force: set[str]) -> dict[str, StageRef]:
    """Run the given instances of one stage: one after another, or, for students with
    ``distill.parallel > 1``, that many at a time, each in its own process."""
    task = stage.load_task()
    calls = [dict(cfg=cfg, key=k, fp=fps[k], upstream=ups[k], force=_forced(k, force))
             for k in keys]
    if not (stage.per_student and cfg.distill.parallel > 1 and len(calls) > 1):
        return {str(c["key"]): task(**c) for c in calls}
    from prefect.task_runners import ProcessPoolTaskRunner

    with ProcessPoolTaskRunner(max_workers=min(cfg.distill.parallel, len(calls))) as runner:
        futures = [runner.submit(task, c) for c in calls]
        return {str(c["key"]): f.result() for c, f in zip(calls, futures)}


def _summary_markdown(cfg: PipelineConfig, refs: dict[str, StageRef]) -> str:
    lines = [f"# cot2align run `{cfg.name}`", "", "| stage | status | seconds | artifact |",
             "|---|---|---:|---|"]
    for key, ref in refs.items():
        status = "reused" if ref.reused else "computed"
        lines.append(f"| {key} | {status} | {ref.seconds:.1f} | `{ref.path}` |")
    return "\n".join(lines)


def _run_all(cfg: PipelineConfig, fps: dict[StageKey, str], forced: set[str]) -> dict[str, StageRef]:
    refs: dict[str, StageRef] = {}
    for stage in STAGES:
        keys = instances(cfg, stage)
        if not keys:
            continue
        ups = {k: {u: refs[u] for u in map(str, upstream_keys(cfg, k))} for k in keys}
        refs.update(_run_instances(cfg, stage, keys, fps, ups, forced))
    return refs


#: Damaged files a run repairs by itself before it gives up.
MAX_REPAIRS = 3


def repair(store, err: CorruptDataError) -> None:
    """Drop the damaged shard (or side file) that a stage found while reading, so that the
    rerun of the stage loop recomputes exactly that (and sets aside what was built from it);
    nothing read from it was used."""
    stage, fp = Path(err.artifact).parts[-2:]
    name = err.relpath[: -len(".parquet")] if err.relpath.endswith(".parquet") else err.relpath
    logger().warning("%s; repairing: %s/%s loses %s and the stages from it run again",
                     err.reason, stage, fp, name)
    store.invalidate_shards(stage, fp, [name])


@contextmanager
def recorded_run(store, config_path: str, cfg: PipelineConfig, fps: dict[StageKey, str],
                 scope: str, overrides: list[str] | None):
    """A run record in the store from the start to the end of a run: ``gc`` keeps every
    artifact a record names, and a live run's heartbeat keeps even unfinished ones. A
    read-only store (a finished store reused as it is) gets no record."""
    from storage.errors import StoreError

    try:
        record = store.begin_run(config_path, cfg.name, {str(k): fp for k, fp in fps.items()},
                                 scope=scope, overrides=overrides or [])
    except StoreError as err:
        logger().warning("run not recorded in the store (%s)", err)
        yield None
        return
    with record:
        yield record


@flow(name="cot2align-pipeline", log_prints=True)
def pipeline_flow(config_path: str, overrides: list[str] | None = None,
                  force: list[str] | None = None) -> dict[str, dict]:
    """Run every stage of the config in order; finished stages are reused, not recomputed."""
    cfg = load_config(config_path, overrides)
    preflight(cfg)
    store = open_store(cfg)
    fps = plan(cfg)
    forced = set(force or [])
    refs: dict[str, StageRef] = {}
    with recorded_run(store, config_path, cfg, fps, "run", overrides), cluster.session(cfg):
        for attempt in range(MAX_REPAIRS + 1):
            try:
                refs = _run_all(cfg, fps, forced if attempt == 0 else set())
                break
            except CorruptDataError as err:
                if attempt == MAX_REPAIRS:
                    raise
                repair(store, err)
    create_markdown_artifact(_summary_markdown(cfg, refs), key="cot2align-run-summary",
                             description=f"cot2align pipeline run of {cfg.name}")
    return {k: r.to_dict() for k, r in refs.items()}


def run_single_stage(stage: str, config_path: str, overrides: list[str] | None = None,
                     force: bool = False, only: str | None = None) -> dict:
    """Run one stage (every instance of it, or the one named by ``only``) against the existing
    upstream artifacts of the config."""
    cfg = load_config(config_path, overrides)
    store = open_store(cfg)
    fps = plan(cfg)
    keys = instances(cfg, spec(stage))
    if only is not None:
        keys = [k for k in keys if str(k) == only or k.label == only]
        if not keys:
            known = [str(k) for k in instances(cfg, spec(stage))]
            raise ConfigError(f"{only!r} is not an instance of stage {stage} in this config: "
                              f"{known}")
    preflight(cfg, keys)
    ups = {k: upstream_refs(store, cfg, k, fps) for k in keys}
    needed = {k: fps[k] for k in keys} | {u: fps[u] for k in keys for u in upstream_keys(cfg, k)}
    with recorded_run(store, config_path, cfg, needed, f"stage:{stage}", overrides), \
            cluster.session(cfg):
        refs = _run_instances(cfg, spec(stage), keys, fps, ups, {stage} if force else set())
    for key, ref in refs.items():
        logger().info("stage %s: %s", key, ref.path)
    return {k: r.to_dict() for k, r in refs.items()}


def _stage_flow(stage: StageSpec):
    @flow(name=f"cot2align-{stage.name}", log_prints=True, description=stage.description)
    def stage_flow(config_path: str, overrides: list[str] | None = None,
                   force: bool = False) -> dict:
        return run_single_stage(stage.name, config_path, overrides, force)

    stage_flow.__doc__ = f"{stage.description} Runs alone, against the existing upstream artifacts."
    return stage_flow


STAGE_FLOWS = {s.name: _stage_flow(s) for s in STAGES}
# Deployment entrypoints are module attributes: flows/pipeline.py:<stage>_flow.
globals().update({f"{name}_flow": f for name, f in STAGE_FLOWS.items()})
