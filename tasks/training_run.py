"""A training run inside a stage: build the model from the config (seeded), train it with
checkpoints inside the artifact, and save what users load (shared by teacher_sft and distill).

A stage describes its run as a :data:`JobBuilder`, ``build(device) -> TrainingJob``: a
module-level function with its arguments bound, so that the same run can be built again
elsewhere. With the local engine it is built once and trained here. With the Ray engine
(``cluster.engine: ray``) every rank builds it on its own device and trains its share of each
global batch (:func:`train_rank`, launched by Ray Train with ``cluster.workers`` ranks); rank 0
leaves its checkpoints in the artifact, and the stage's own copy of the job loads the final
one, then is saved exactly as a local run's.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa
import torch

from cot2align_core.config import PipelineConfig, TrainingConfig
from tasks import cluster
from tasks.common import StageError, logger, resolve_device
from tasks.registry import StageKey
from tasks.stage import kill_point


@dataclass
class TrainingJob:
    """Everything one training run needs, built by its stage for one device.

    ``objective``: the learned part of the loss (distill's projector...), saved by the stage;
    ``info``: values the stage's summary reports (e.g. how many examples were cut to fit).
    """

    model: torch.nn.Module
    tokenizer: Any
    loss_fn: Callable
    data: Any
    collate_fn: Callable
    training: TrainingConfig
    seed: int
    lora: bool
    extra_param_groups: list[dict[str, Any]] = field(default_factory=list)
    objective: torch.nn.Module | None = None
    info: dict[str, Any] = field(default_factory=dict)
    evaluation: "Evaluation | None" = None


@dataclass
class Evaluation:
    """What the training loop measures every ``every`` steps (and at the last step):
    ``fn(model, step) -> {metric: value}``, merged into that step's history record. With
    ``select``, the step with the best (highest) ``select`` metric is the one whose weights are
    saved (the paper keeps the best checkpoint on the dev split)."""

    every: int
    fn: Callable[[torch.nn.Module, int], dict[str, float]]
    select: str | None = None


#: ``build(device) -> TrainingJob``; picklable (e.g. ``functools.partial`` of a module-level
#: function), since every rank of a distributed run builds its own.
JobBuilder = Callable[[str], TrainingJob]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Initialise from the config's seed, not from whatever the process's global RNG went
    through before: a pipeline run and a single-stage run must train the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_model_for(cfg: PipelineConfig, side: str, tokenizer, device: str, seed: int):
    """A scratch model built from the config (initialised from ``seed``), or the pretrained
    one (with LoRA if set)."""
    from cot2align_core.modeling import build_model, load_model

    model_cfg = cfg.teacher if side == "teacher" else cfg.student
    if model_cfg.scratch is not None:
        s = model_cfg.scratch
        model = build_model(s.arch, tokenizer, hidden_size=s.hidden_size, num_layers=s.num_layers,
                            num_heads=s.num_heads, intermediate_size=s.intermediate_size,
                            max_position_embeddings=s.max_position_embeddings, seed=seed)
        model = model.to(device)
    else:
        model = load_model(model_cfg.pretrained, model_cfg.dtype, device)
    if model_cfg.lora_rank:
        from cot2align_core.lora import apply_lora

        apply_lora(model, rank=model_cfg.lora_rank)
    return model


def train_kwargs(job: TrainingJob) -> dict:
    """The training loop's arguments for ``job`` (the same on every rank and on resume)."""
    t, e = job.training, job.evaluation
    evaluation = {} if e is None else dict(
        eval_every=e.every, eval_fn=e.fn, select_metric=e.select, select_mode="max",
        restore_best=e.select is not None)
    return dict(batch_size=t.batch_size, lr=t.lr, steps=t.steps, epochs=t.epochs,
                weight_decay=t.weight_decay, grad_clip=t.grad_clip, schedule=t.schedule,
                warmup_steps=t.warmup_steps, seed=job.seed, checkpoint_every=t.checkpoint_every,
                resume=True, **evaluation)


def log_every_n(label: str, n: int = 50):
    log = logger()

    def on_log(rec: dict) -> None:
        if rec["step"] % n == 0 or rec["step"] == 1:
            # Top-level terms only; the per-form, per-pair breakdown is in the loss history.
            terms = " ".join(f"{k}={v:.4f}" for k, v in rec.items()
                             if k not in ("step", "epoch", "seconds", "lr") and "/" not in k
                             and isinstance(v, float))
            log.info("%s step %d epoch %d lr %.2e %s", label, rec["step"], rec["epoch"], rec["lr"], terms)

    return on_log


def checkpoint_folder(w, on_ray: bool) -> str:
    """Where a run's checkpoints go: ``checkpoints/`` inside the unfinished artifact (removed
    when it commits). A remote store's writer gives a staging folder of this machine, which
    ranks on other nodes cannot reach: they write to the store's URL instead."""
    from storage.shards import CHECKPOINTS_DIR

    if on_ray and not w.fs.is_local:
        return w.fs.url(w.fs.join(w.dir, CHECKPOINTS_DIR))
    return str(w.file_path(CHECKPOINTS_DIR))


def _train_here(job: TrainingJob, checkpointer, label: str):
    """Train the job in this process, with a progress bar and the crash-test hooks."""
    from cot2align_core.training import train
    from tasks.stage import Progress, stop_at_step_boundary

    t = job.training
    total = t.steps or math.ceil(t.epochs * math.ceil(len(job.data) / t.batch_size))
    log = log_every_n(label)
    if steps := checkpointer.steps():
        logger().info("%s: resumed from checkpoint step %d of %d", label, steps[-1], total)
    with Progress(total, f"{label}: training steps") as bar, stop_at_step_boundary() as check:
        stage = StageKey.parse(label).stage

        def on_log(rec: dict) -> None:
            kill_point(stage, "step", rec["step"])
            log(rec)
            bar.update(rec["step"] - bar.done)  # a resumed run starts past step 0
            check()  # SIGTERM: stop here, between two steps

        return train(job.model, job.loss_fn, job.data, collate_fn=job.collate_fn,
                     extra_param_groups=job.extra_param_groups, checkpointer=checkpointer,
                     on_log=on_log, **train_kwargs(job))


def _train_on_ranks(cfg: PipelineConfig, build: JobBuilder, job: TrainingJob, folder: str,
                    checkpointer, label: str):
    """Train on the Ray cluster's ranks, then load their final checkpoint into ``job``."""
    from cot2align_core.config import ConfigError
    from cot2align_core.training import check_world_size, train

    try:  # here, not in the ranks: a clear error rather than failed ranks restarting
        check_world_size(len(job.data), job.training.batch_size, False, cfg.cluster.workers)
    except ValueError as err:
        raise ConfigError(f"{label}: cluster.workers {cfg.cluster.workers}: {err}") from None
    cluster.train_on_ray(cfg, train_rank, {"build": build, "checkpoints": folder,
                                           "label": label, "strategy": cfg.cluster.strategy,
                                           "threads": cfg.threads,
                                           "env": cluster.task_env(cfg)}, label=label)
    result = train(job.model, job.loss_fn, job.data, collate_fn=job.collate_fn,
                   extra_param_groups=job.extra_param_groups, checkpointer=checkpointer,
                   max_steps=0, **train_kwargs(job))
    if result.steps_done < result.total_steps:
        raise StageError(f"{label}: the distributed run ended at step {result.steps_done} of "
                         f"{result.total_steps} (no final checkpoint in {folder}); rerun to "
                         "resume it")
    logger().info("%s: trained on %d ranks; loaded their final checkpoint (step %d)", label,
                  cfg.cluster.workers, result.steps_done)
    return result


def train_and_save(w, cfg: PipelineConfig, build: JobBuilder, *, training: TrainingConfig,
                   label: str):
    """Build the job and train it (resuming from the artifact's checkpoints): here, or on the
    Ray cluster's ranks; then write ``model/`` (save_pretrained, LoRA merged in) and the
    ``history`` shard. The checkpoints stay until the artifact commits. Returns
    ``(TrainResult, TrainingJob)``."""
    from storage.checkpoints import CheckpointDir

    on_ray = cluster.uses_ray(cfg)
    # On Ray the ranks train; this copy only receives the result (kept off the GPUs).
    job = build("cpu" if on_ray else resolve_device(training.device))
    folder = checkpoint_folder(w, on_ray)
    checkpointer = CheckpointDir(folder, keep_last=training.keep_last)
    if on_ray:
        result = _train_on_ranks(cfg, build, job, folder, checkpointer, label)
    else:
        result = _train_here(job, checkpointer, label)
    if job.lora:
        from cot2align_core.lora import merge_lora

        merge_lora(job.model)
    out = w.file_path("model")
    job.model.save_pretrained(out)
    job.tokenizer.save_pretrained(out)
    w.add_file("model")
    w.write_shard("history", history_table(result.history), kind="history")
    kill_point(StageKey.parse(label).stage, "trained", result.steps_done)  # crash tests
    # The checkpoints stay until the artifact commits (the store removes them then): a kill
    # from here to the commit resumes at the last step instead of training again.
    return result, job


def history_table(history: list[dict[str, Any]]) -> pa.Table:
    """One row per step, one column per key any step has (evaluation metrics appear only at
    the steps that measured them: null elsewhere)."""
    keys = list(dict.fromkeys(k for rec in history for k in rec))
    return pa.Table.from_pylist([{k: rec.get(k) for k in keys} for rec in history])


def train_rank(config: dict[str, Any]) -> None:
    """One rank of a distributed run (Ray Train's ``train_loop_per_worker``): build the job
    on this rank's device, join the process group, train this rank's share; rank 0 writes
    the checkpoints to ``config["checkpoints"]`` (resumed from after a restart) and logs.
    The crash-test hook ``<stage>:step:N`` kills rank 0 after step N (use it with
    ``COT2ALIGN_KILL_ONCE``: the restarted ranks reach step N again)."""
    import os

    import ray.train.torch

    from cot2align_core.distributed import init_distributed
    from cot2align_core.training import train
    from storage.checkpoints import CheckpointDir

    os.environ.update(config["env"])
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    ctx = init_distributed(ray.train.torch.get_device(), strategy=config["strategy"])
    job = config["build"](str(ctx.device))
    t = job.training
    stage, log = StageKey.parse(config["label"]).stage, log_every_n(config["label"])

    def on_log(rec: dict) -> None:  # rank 0 only
        kill_point(stage, "step", rec["step"])
        log(rec)

    train(job.model, job.loss_fn, job.data, collate_fn=job.collate_fn,
          extra_param_groups=job.extra_param_groups,
          checkpointer=CheckpointDir(config["checkpoints"], keep_last=t.keep_last),
          on_log=on_log, dist=ctx, **train_kwargs(job))
