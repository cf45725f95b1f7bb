"""A training run inside a stage: build the model from the config (seeded), train it with
checkpoints inside the artifact, and save what users load (shared by teacher_sft and distill).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pyarrow as pa
import torch

from cot2align_core.config import PipelineConfig, TrainingConfig
from tasks.common import logger
from tasks.registry import StageKey
from tasks.stage import kill_point


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


def train_kwargs(t: TrainingConfig, seed: int) -> dict:
    return dict(batch_size=t.batch_size, lr=t.lr, steps=t.steps, epochs=t.epochs,
                weight_decay=t.weight_decay, grad_clip=t.grad_clip, schedule=t.schedule,
                warmup_steps=t.warmup_steps, seed=seed, checkpoint_every=t.checkpoint_every,
                resume=True)


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


def train_and_save(w, model, tokenizer, loss_fn: Callable, data, collate_fn: Callable, *,
                   t: TrainingConfig, seed: int, label: str, lora: bool,
                   extra_param_groups: list[dict[str, Any]] = ()):
    """Train ``model`` (resuming from the artifact's checkpoints), then write ``model/``
    (save_pretrained, LoRA merged in) and the ``history`` shard; the checkpoints (optimizer
    state) are removed once the result is saved. Returns the TrainResult."""
    from cot2align_core.training import train

    import math

    from storage.checkpoints import CheckpointDir
    from storage.shards import CHECKPOINTS_DIR
    from tasks.stage import Progress, stop_at_step_boundary

    checkpointer = CheckpointDir(w.file_path(CHECKPOINTS_DIR), keep_last=t.keep_last)
    total = t.steps or math.ceil(t.epochs * math.ceil(len(data) / t.batch_size))
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

        result = train(model, loss_fn, data, collate_fn=collate_fn,
                       extra_param_groups=extra_param_groups, checkpointer=checkpointer,
                       on_log=on_log, **train_kwargs(t, seed))
    if lora:
        from cot2align_core.lora import merge_lora

        merge_lora(model)
    out = w.file_path("model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    w.add_file("model")
    w.write_shard("history", pa.Table.from_pylist(result.history), kind="history")
    kill_point(StageKey.parse(label).stage, "trained", result.steps_done)  # crash tests
    # The checkpoints stay until the artifact commits (the store removes them then): a kill
    # from here to the commit resumes at the last step instead of training again.
    return result
