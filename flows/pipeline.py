"""The pipeline flow and one flow per stage, each runnable and deployable on its own.

    prepare -> teacher_sft? -> generate -> tokenize -> cache_teacher -> distill[...] -> evaluate

Everything here derives from the stage registry (:mod:`tasks.registry`): the order, the
instances (one ``distill`` per student and training seed), the upstream artifacts each one
reads, and the flows (``cot2align-<stage>``). Flows take a config path (plus ``key.path=value``
overrides and a shared ``store``) so that deployments carry only JSON-able parameters; the
config's fingerprints decide what is reused and what is recomputed.

What the flows add to each stage's task (:func:`stage_task`): the run is named by its instance
(``distill[sft,seed=0]``), tagged (``cot2align``, ``stage:<name>``, and ``gpu`` for stages that
run models, which a tag concurrency limit counts), retried on crash-type errors (a retry
resumes from the artifact's finished shards and checkpoints), bounded by a timeout, and shown
as ``Cached`` when the artifact already existed. Retries and timeouts come from environment
variables (job variables of a deployment), read when a flow runs:

- ``COT2ALIGN_STAGE_RETRIES`` (2): retries of a stage after a crash-type error;
- ``COT2ALIGN_STAGE_RETRY_DELAY_S`` (30): seconds between them;
- ``COT2ALIGN_STAGE_TIMEOUT_H`` (24): hours one stage instance may run;
- ``COT2ALIGN_FLOW_TIMEOUT_H`` (72): hours one flow run may run (read when this module loads).

A crashed flow run (its process killed) is not retried by Prefect; the ``cot2align-rerun-crashed``
automation (:mod:`flows.deployments`) reschedules it.
"""
from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import Task, flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.states import Completed, State

from cot2align_core.config import ConfigError, PipelineConfig, load_config
from storage.errors import CorruptDataError, StoreError
from tasks import cluster
from tasks.common import StageError, StageRef, logger, preflight, upstream_refs
from tasks.registry import STAGES, StageKey, StageSpec, instances, plan, spec, upstream_keys
from tasks.stage import open_store

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The default config of every flow and deployment: the embedded demo, CPU only, relative to
#: the repository root (a deployment's working directory is its clone of the repository).
DEMO_CONFIG = "configs/demo.yaml"


def env_number(name: str, default: float) -> float:
    """A positive number from the environment variable ``name`` (``default`` when unset)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not a number") from None
    if value < 0:
        raise ConfigError(f"environment variable {name}={raw!r} must be >= 0")
    return value


# ------------------------------------------------------------------------ stage tasks
#: Errors a retry cannot fix: bad inputs (configs, data, tokenizers, a missing upstream, an
#: unusable store) and programming errors. Everything else of the crash kind is retried.
_NOT_RETRIED = (StageError, StoreError, FileNotFoundError, NotImplementedError, RecursionError)
_RETRIED = (OSError, RuntimeError, MemoryError)


def retry_crash_types(task: Task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry I/O, runtime (CUDA, vLLM engine, lost worker
    process) and memory errors and timeouts; fail at once on input and programming errors."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, _RETRIED) and not isinstance(exc, _NOT_RETRIED)


def stage_tags(stage: StageSpec) -> list[str]:
    return ["cot2align", f"stage:{stage.name}"] + (["gpu"] if stage.gpu else [])


def stage_task(stage: StageSpec) -> Task:
    """The stage's Prefect task as the flows run it (see the module docstring).

    It calls the function of the stage's task module (``StageSpec.task``) and returns its
    :class:`~tasks.common.StageRef`; a reused artifact comes back as a ``Completed`` state
    named ``Cached`` whose result is that same StageRef, so the caller sees no difference.
    """
    run = stage.load_task().fn

    def run_instance(cfg: PipelineConfig, key: StageKey, fp: str,
                     upstream: dict[str, StageRef], force: bool = False):
        ref = run(cfg, key, fp, upstream, force)
        if ref.reused:
            return Completed(name="Cached", data=ref, message=f"reused {ref.path}")
        return ref

    run_instance.__doc__ = stage.description
    return task(run_instance, name=stage.name, task_run_name="{key}", tags=stage_tags(stage),
                cache_policy=NONE, retries=int(env_number("COT2ALIGN_STAGE_RETRIES", 2)),
                retry_delay_seconds=env_number("COT2ALIGN_STAGE_RETRY_DELAY_S", 30),
                retry_condition_fn=retry_crash_types,
                timeout_seconds=3600 * env_number("COT2ALIGN_STAGE_TIMEOUT_H", 24))


def _forced(key: StageKey, force: set[str]) -> bool:
    return key.stage in force or str(key) in force


def _run_instances(cfg: PipelineConfig, stage: StageSpec, keys: list[StageKey],
                   fps: dict[StageKey, str], ups: dict[StageKey, dict[str, StageRef]],
                   force: set[str]) -> dict[str, StageRef]:
    """Run the given instances of one stage: one after another, or, for students with
    ``distill.parallel > 1``, that many at a time, each in its own process."""
    run = stage_task(stage)
    calls = [dict(cfg=cfg, key=k, fp=fps[k], upstream=ups[k], force=_forced(k, force))
             for k in keys]
    if not (stage.per_student and cfg.distill.parallel > 1 and len(calls) > 1):
        return {str(c["key"]): _stage_ref(run(**c)) for c in calls}
    from prefect.task_runners import ProcessPoolTaskRunner

    with ProcessPoolTaskRunner(max_workers=min(cfg.distill.parallel, len(calls))) as runner:
        futures = [runner.submit(run, c) for c in calls]
        return {str(c["key"]): _stage_ref(f.result()) for c, f in zip(calls, futures)}


def _stage_ref(returned: StageRef | State) -> StageRef:
    # prefect 3.7.7 hands a task's returned State (the Cached one) back to its caller as is.
    return returned.result() if isinstance(returned, State) else returned


# ------------------------------------------------------------------------ config of a run
def _code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "not a git checkout"
    except (OSError, subprocess.SubprocessError):
        return "git not available"


def _in_deployment() -> bool:
    from prefect.runtime import deployment

    return deployment.id is not None


def load_run_config(config_path: str, overrides: list[str] | None,
                    store: str | None) -> PipelineConfig:
    """The config of a flow run: ``config_path`` with its overrides, and ``store`` (when
    given) in place of the config's ``store:``. Logs which code runs it, and warns when a
    deployment would write into a folder the worker deletes after the run."""
    sets = list(overrides or [])
    if store:
        sets.append(f"store={json.dumps(store)}")
    cfg = load_config(config_path, sets or None)
    log = logger()
    log.info("cot2align code at %s (git %s), config %s, store %s", REPO_ROOT, _code_version(),
             config_path, cfg.store)
    local = "://" not in cfg.store or cfg.store.startswith("file://")
    if _in_deployment() and local and not Path(cfg.store.removeprefix("file://")).is_absolute():
        log.warning("store %r is relative to this run's working directory %s, which a process "
                    "worker deletes after the run, and no other worker sees it: pass the "
                    "`store` parameter (a folder or fsspec URL every worker shares)",
                    cfg.store, os.getcwd())
    return cfg


# ------------------------------------------------------------------------ flows
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
    try:
        record = store.begin_run(config_path, cfg.name, {str(k): fp for k, fp in fps.items()},
                                 scope=scope, overrides=overrides or [])
    except StoreError as err:
        logger().warning("run not recorded in the store (%s)", err)
        yield None
        return
    with record:
        yield record


FLOW_TIMEOUT_S = 3600 * env_number("COT2ALIGN_FLOW_TIMEOUT_H", 72)


@flow(name="cot2align-pipeline", log_prints=True, timeout_seconds=FLOW_TIMEOUT_S,
      description="The whole CoT2Align pipeline of a config; finished stages are reused.")
def pipeline_flow(config_path: str = DEMO_CONFIG, overrides: list[str] | None = None,
                  force: list[str] | None = None, store: str | None = None) -> dict[str, dict]:
    """Run every stage of the config in order; finished stages are reused, not recomputed.

    Args:
        config_path: YAML config, relative to the repository root (a deployment's working
            directory) or absolute. The default is the embedded demo, which runs on a CPU.
        overrides: `key.path=value` settings applied on top of the config, e.g.
            `distill.training.steps=100`.
        force: stages (`generate`) or student instances (`distill[sft,seed=0]`) to
            recompute even when their artifact exists.
        store: folder or fsspec URL of the artifact store, in place of the config's
            `store:`; every worker of a deployment must see the same one.
    """
    cfg = load_run_config(config_path, overrides, store)
    preflight(cfg)
    store_ = open_store(cfg)
    fps = plan(cfg)
    forced = set(force or [])
    refs: dict[str, StageRef] = {}
    with recorded_run(store_, config_path, cfg, fps, "run", overrides), cluster.session(cfg):
        for attempt in range(MAX_REPAIRS + 1):
            try:
                refs = _run_all(cfg, fps, forced if attempt == 0 else set())
                break
            except CorruptDataError as err:
                if attempt == MAX_REPAIRS:
                    raise
                repair(store_, err)
    create_markdown_artifact(_summary_markdown(cfg, refs), key="cot2align-run-summary",
                             description=f"cot2align pipeline run of {cfg.name}")
    return {k: r.to_dict() for k, r in refs.items()}


def run_single_stage(stage: str, config_path: str, overrides: list[str] | None = None,
                     force: bool = False, only: str | None = None,
                     store: str | None = None) -> dict:
    """Run one stage (every instance of it, or the one named by ``only``) against the existing
    upstream artifacts of the config."""
    cfg = load_run_config(config_path, overrides, store)
    store_ = open_store(cfg)
    fps = plan(cfg)
    keys = instances(cfg, spec(stage))
    if only is not None:
        keys = [k for k in keys if str(k) == only or k.label == only]
        if not keys:
            known = [str(k) for k in instances(cfg, spec(stage))]
            raise ConfigError(f"{only!r} is not an instance of stage {stage} in this config: "
                              f"{known}")
    preflight(cfg, keys)
    ups = {k: upstream_refs(store_, cfg, k, fps) for k in keys}
    needed = {k: fps[k] for k in keys} | {u: fps[u] for k in keys for u in upstream_keys(cfg, k)}
    with recorded_run(store_, config_path, cfg, needed, f"stage:{stage}", overrides), \
            cluster.session(cfg):
        refs = _run_instances(cfg, spec(stage), keys, fps, ups, {stage} if force else set())
    for key, ref in refs.items():
        logger().info("stage %s: %s", key, ref.path)
    return {k: r.to_dict() for k, r in refs.items()}


def _stage_flow(stage: StageSpec):
    def stage_flow(config_path: str = DEMO_CONFIG, overrides: list[str] | None = None,
                   force: bool = False, store: str | None = None,
                   student: str | None = None) -> dict[str, Any]:
        """Run one stage against the existing upstream artifacts of the config.

        Args:
            config_path: YAML config, relative to the repository root (a deployment's working
                directory) or absolute. The default is the embedded demo, which runs on a CPU.
            overrides: `key.path=value` settings applied on top of the config, e.g.
                `distill.training.steps=100`.
            force: recompute the stage even when its artifact exists.
            store: folder or fsspec URL of the artifact store, in place of the config's
                `store:`; it must hold the upstream artifacts (every worker sees it).
            student: distill only: train this student alone (a label, or an instance such
                as `distill[sft,seed=1]`) instead of all of them.
        """
        return run_single_stage(stage.name, config_path, overrides, force, only=student,
                                store=store)

    return flow(stage_flow, name=f"cot2align-{stage.name}", log_prints=True,
                timeout_seconds=FLOW_TIMEOUT_S,
                description=f"{stage.description} Runs alone, against the existing upstream "
                            "artifacts.")


STAGE_FLOWS = {s.name: _stage_flow(s) for s in STAGES}
# Deployment entrypoints are module attributes: flows/pipeline.py:<stage>_flow.
globals().update({f"{name}_flow": f for name, f in STAGE_FLOWS.items()})
