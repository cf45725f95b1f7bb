"""Where the stages run: in this process (engine ``local``) or on a Ray cluster (``ray``).

The engine is the config's ``cluster`` section (:class:`cot2align_core.config.ClusterConfig`),
set on the command line with ``--engine ray``. It is no part of any fingerprint: both engines
write the same bytes, so either reuses the other's artifacts.

On Ray:

- a run connects once (:func:`session`): to ``cluster.address``, or to a cluster it starts on
  this machine when the address is null (stopped when the run ends);
- shard stages submit their shards as Prefect tasks through ``prefect_ray.RayTaskRunner``
  (:func:`run_shards`), each with a resource request (``num_gpus`` per model engine). A worker
  gets a :class:`storage.writer.ShardSink` of the open artifact and writes its shards into
  the store by URL; the stage's writer adopts each reported shard only after re-hashing it
  against its journal record. Ray reruns a shard whose worker died (``worker_retries``); the
  shard's Prefect task retries the exceptions it raises;
- distill and teacher_sft train on ``cluster.workers`` ranks launched by Ray Train's
  ``TorchTrainer`` (:func:`train_on_ray`; gloo on CPUs, NCCL on GPUs).

Workers need the project importable (installed on every node, or ``cluster.runtime_env``
with a ``working_dir``), the store reachable at the same path or URL (a shared filesystem or
an object store), and the Prefect API: the run's own (``PREFECT_API_URL``, or the temporary
server of a run on one machine) is passed to every shard task.
"""
from __future__ import annotations

import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from cot2align_core.config import PipelineConfig
from tasks.common import StageError, logger
from tasks.stage import Progress, kill_point

__all__ = ["uses_ray", "session", "connect", "shard_gpus", "task_env", "ShardCall",
           "run_shards", "train_on_ray"]

RAY_NAMESPACE = "cot2align"


def uses_ray(cfg: PipelineConfig) -> bool:
    return cfg.cluster.engine == "ray"


def connect(cfg: PipelineConfig) -> bool:
    """Connect this process to the config's Ray cluster: ``cluster.address``, else
    ``RAY_ADDRESS`` when set, else a cluster started here with ``cluster.num_cpus`` /
    ``num_gpus``. False when this process was connected already."""
    import ray

    if ray.is_initialized():
        return False
    c = cfg.cluster
    common = {"namespace": RAY_NAMESPACE, "runtime_env": c.runtime_env, "log_to_driver": True}
    if c.address is None and not os.environ.get("RAY_ADDRESS"):
        store = None if c.object_store_gib is None else int(c.object_store_gib * 2**30)
        ray.init(num_cpus=c.num_cpus, num_gpus=c.num_gpus, object_store_memory=store, **common)
        logger().info("ray: started a local cluster (%s)", _resources_line())
    else:
        ray.init(address=c.address, **common)
        logger().info("ray: joined the cluster at %s (%s)",
                      c.address or os.environ["RAY_ADDRESS"], _resources_line())
    return True


def _resources_line() -> str:
    import ray

    res = ray.cluster_resources()
    return f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs, {len(ray.nodes())} nodes"


@contextmanager
def session(cfg: PipelineConfig) -> Iterator[None]:
    """One Ray connection for a whole run (nothing with the local engine). A cluster started
    here is named in ``RAY_ADDRESS`` for the run's child processes (students trained in
    parallel) and stopped at the end."""
    if not uses_ray(cfg):
        yield
        return
    import ray

    started = connect(cfg)
    saved = os.environ.get("RAY_ADDRESS")
    if started and cfg.cluster.address is None:
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    try:
        yield
    finally:
        if started:
            ray.shutdown()
            if saved is None:
                os.environ.pop("RAY_ADDRESS", None)
            else:
                os.environ["RAY_ADDRESS"] = saved


def _largest_node_gpus() -> float:
    import ray

    return max((n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")),
               default=0.0)


def shard_gpus(cfg: PipelineConfig, devices: int = 1) -> float:
    """GPUs one shard task of a model stage asks for: ``cluster.num_gpus_per_shard`` (default
    1 when the cluster has GPUs, else 0) times ``devices`` (a vLLM engine's
    ``tensor_parallel_size``). A request no node can meet is an error, not a task that waits
    forever."""
    connect(cfg)
    largest = _largest_node_gpus()
    per = cfg.cluster.num_gpus_per_shard
    per = (1.0 if largest > 0 else 0.0) if per is None else per
    need = per * devices
    if need > largest:
        raise StageError(f"a shard needs {need:g} GPUs on one node (cluster.num_gpus_per_shard "
                         f"{per:g} x {devices} engine devices) but the largest node of the Ray "
                         f"cluster has {largest:g}; lower generate.tensor_parallel_size or "
                         "cluster.num_gpus_per_shard, or add a larger node")
    return need


def _prefect_api_url() -> str | None:
    """The Prefect API this process reports to: the configured one, or the temporary server a
    run without PREFECT_API_URL started (workers on this machine reach it too)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        return url
    from prefect.server.api.server import SubprocessASGIServer

    running = [s for s in SubprocessASGIServer._instances.values() if s.server_process]
    return running[0].api_url if running else None


def task_env(cfg: PipelineConfig) -> dict[str, str]:
    """Environment of a task or rank on the cluster: the run's Prefect API, the project's
    variables (``COT2ALIGN_*``, e.g. the crash-test hooks), and the run's torch threads."""
    env = {k: v for k, v in os.environ.items() if k.startswith("COT2ALIGN_")}
    url = _prefect_api_url()
    if url:
        env["PREFECT_API_URL"] = url
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    return env


@dataclass(frozen=True)
class ShardCall:
    """One shard task: its keyword arguments (all but ``writer``) and the names of the shards
    it writes (adopted when it returns)."""

    shards: tuple[str, ...]
    kwargs: dict[str, Any]


def run_shards(cfg: PipelineConfig, writer, shard_task, calls: list[ShardCall], *,
               num_gpus: float, desc: str, stage: str) -> list[Any]:
    """Run ``shard_task`` once per call on the Ray cluster, all submitted at once (Ray runs as
    many at a time as the resources allow); returns their results in call order.

    Each task gets ``writer=<ShardSink>``; the shards a finished task names are adopted by
    ``writer`` (re-hashed against the journal). A failed task does not stop the others: every
    finished shard is adopted (a rerun keeps it), then the first error is raised.
    """
    import ray
    from prefect_ray import RayTaskRunner
    from prefect_ray.context import remote_options

    connect(cfg)
    sink = writer.shard_sink()
    options = dict(num_cpus=cfg.cluster.num_cpus_per_shard, num_gpus=num_gpus,
                   max_retries=cfg.cluster.worker_retries,
                   runtime_env={"env_vars": task_env(cfg)})
    results: dict[int, Any] = {}
    errors: list[tuple[ShardCall, BaseException]] = []
    with RayTaskRunner() as runner, remote_options(**options), Progress(len(calls), desc) as bar:
        futures = [runner.submit(shard_task, {**c.kwargs, "writer": sink}) for c in calls]
        pending = {f.wrapped_future: i for i, f in enumerate(futures)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                results[i] = futures[i].result()
            except Exception as err:  # noqa: BLE001 - raised below, after the others finish
                errors.append((calls[i], err))
                continue
            for name in calls[i].shards:
                writer.adopt_shard(name)
            bar.update()
            kill_point(stage, "shard", len(writer.done_shards()))
    if errors:
        for call, err in errors[1:]:
            logger().error("%s: shard task for %s failed too: %s", stage, call.shards, err)
        raise errors[0][1]
    return [results[i] for i in range(len(calls))]


def train_on_ray(cfg: PipelineConfig, train_fn: Callable[[dict], None], config: dict, *,
                 label: str) -> None:
    """Run ``train_fn(config)`` on ``cluster.workers`` ranks with Ray Train's TorchTrainer
    (process group: NCCL with one GPU per rank when the cluster has GPUs, else gloo). A failed
    rank restarts the group up to ``cluster.max_failures`` times; ``train_fn`` resumes from its
    own checkpoints (Ray Train keeps only its run records, in its default storage path)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    connect(cfg)
    c = cfg.cluster
    use_gpu = _largest_node_gpus() > 0
    resources = {"CPU": c.num_cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") + "-" + uuid.uuid4().hex[:8]
    logger().info("%s: training on %d ranks (%s, %s) with Ray Train", label, c.workers,
                  "NCCL on GPUs" if use_gpu else "gloo on CPUs", c.strategy)
    trainer = TorchTrainer(
        train_fn, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=c.workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name,
                             failure_config=FailureConfig(max_failures=c.max_failures)))
    trainer.fit()
