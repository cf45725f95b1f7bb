"""One training loop for teacher SFT and student distillation, in plain sight.

    setup: data order (:class:`~cot2align_core.sampling.EpochSampler`), AdamW, LR schedule;
           continue from the checkpointer's newest checkpoint, if any
    for step in range(start, total_steps):
        batch = collate(next batch of the epoch's order)
        loss, terms = loss_fn(model, batch)
        loss.backward(); clip grads; AdamW step; LR schedule step
        history.append({step, epoch, loss, *terms, lr, seconds})
        every `eval_every` steps and at the last: eval_fn(model, step) -> metrics, merged into
            that step's record; the best state by `select_metric` saved as "best"
        every `checkpoint_every` steps and at the last step run: save everything to continue

What a checkpoint holds: model and extra parameters (e.g. a projector), optimizer, scheduler,
the sampler position (epoch, batch within the epoch), the history and the best metric so far,
and (added by the checkpointer) the RNG states of python, numpy and torch. Checkpoints go
through a :class:`Checkpointer` (the store's is ``storage.checkpoints.CheckpointDir``): atomic
saves, the newest few kept, loading that never runs pickled code. ``resume=True`` continues
from the newest one: on CPU a run killed (SIGKILL included) and resumed ends with exactly the
same weights, history and best state as an uninterrupted run. The loop never deletes its
checkpoints at the end: the final one stays until the caller has committed the result and
calls :meth:`Checkpointer.remove_all`, so a kill in between loses no training.

The data order depends only on (seed, epoch), not on global RNG state, so it is the same
whether or not the run was interrupted; evaluation runs with the global RNG states forked and
restored, so a run with evaluation hooks trains exactly the weights of a run without.

The same loop runs on N ranks (``train(dist=...)``, :mod:`cot2align_core.distributed`): the
global batch stays ``batch_size``, each rank takes its slice, DDP (or FSDP2) all-reduces the
gradients, rank 0 checkpoints, and every rank resumes from the same checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from cot2align_core import distributed as dd
from cot2align_core.distributed import DistContext
from cot2align_core.sampling import EpochSampler

SELECT_MODES = ("max", "min")
# Keys of a history record that evaluation metrics may not overwrite.
_RECORD_KEYS = ("step", "epoch", "loss", "lr", "seconds")


# ---------------------------------------------------------------------------------------------
# SFT batches and loss


def collate_sft(rows: Sequence[Mapping], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of SFT examples.

    rows: dicts with "input_ids" (list of ints: prompt then response) and "prompt_len".
    Returns input_ids [B, T] (padded with pad_id), attention_mask [B, T] (1 on real tokens)
    and response_mask [B, T] (1 on response tokens, the only ones the loss sees).
    """
    if not rows:
        raise ValueError("collate_sft got an empty batch")
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids = row["input_ids"]
        n, p = len(ids), int(row["prompt_len"])
        if not 0 <= p <= n:
            raise ValueError(f"prompt_len {p} outside 0..{n} in example {row.get('id', i)!r}")
        input_ids[i, :n] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        response_mask[i, p:n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def sft_loss(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean token cross-entropy over response tokens (prompt and padding are masked).

    labels = input_ids with every non-response position set to -100; the model shifts them
    (position t predicts token t+1), so the first response token is predicted from the last
    prompt token.
    """
    labels = batch["input_ids"].masked_fill(batch["response_mask"] == 0, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    return out.loss


# ---------------------------------------------------------------------------------------------
# Schedule


def lr_multiplier(
    step: int,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> float:
    """Factor on the base learning rate before optimizer step `step` (0-based).

    Linear warmup from 1/warmup_steps to 1 over `warmup_steps`, then "cosine" decay to
    min_lr_ratio at the last step, or "constant".
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}: expected 'cosine' or 'constant'")
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Checkpoints


class Checkpointer(Protocol):
    """Where the training loop keeps its checkpoints (``storage.checkpoints.CheckpointDir``).

    The states are dicts of tensors, numbers, strings, lists, tuples, dicts and None: an
    implementation must store them so that loading them back runs no pickled code (e.g.
    ``torch.load(weights_only=True)``) and refuse, with a clear error, a file that needs it.
    """

    def save(self, step: int, state: Mapping[str, Any]) -> str:
        """Save ``state`` with the global RNG states (python, numpy, torch, CUDA) as
        checkpoint ``step``, atomically (a crash leaves the previous checkpoint or this one);
        drop old ones beyond the implementation's ``keep_last``. Returns where it went."""
        ...

    def restore(self) -> tuple[int, dict[str, Any]] | None:
        """Load the newest checkpoint and put back the RNG states saved with it:
        ``(step, state)``, or None when there is none."""
        ...

    def save_best(self, step: int, state: Mapping[str, Any]) -> str:
        """Replace the best state by ``state`` (reached at ``step``), atomically. Not rotated."""
        ...

    def load_best(self) -> tuple[int, dict[str, Any]] | None:
        """``(step, state)`` of the best state, or None when none was saved."""
        ...

    def remove_all(self) -> None:
        """Delete every checkpoint and the best state."""
        ...


def _checkpoint_state(run: _Run) -> dict[str, Any]:
    """Everything the loop needs to continue after ``run.step`` (the RNG states are added by
    the checkpointer). Full state dicts: with FSDP every rank must call (they are gathered)."""
    r = run.result
    return {
        "step": run.step,
        "signature": run.signature,
        "model": dd.model_state(run.model, run.dist),
        "extra_params": [p.detach().clone() for p in run.extra_params],
        "optimizer": dd.optimizer_state(run.optimizer, run.dist),
        "scheduler": run.scheduler.state_dict(),
        "sampler": run.sampler.state_dict(),
        "history": r.history,
        "best": {"step": r.best_step, "metric": r.best_metric},
    }


def _load_checkpoint(run: _Run, step: int, state: Mapping[str, Any], where: Checkpointer) -> None:
    """Put ``run`` where checkpoint ``step`` left it (the RNG states are already restored)."""
    if state["signature"] != run.signature:
        raise ValueError(
            f"the newest checkpoint in {where!r} (step {step}) was written by a run with "
            f"{state['signature']}, this run has {run.signature}: use another checkpoint "
            "directory or the same settings")
    _load_weights(run, state)
    dd.load_optimizer_state(run.optimizer, state["optimizer"], run.dist)
    run.scheduler.load_state_dict(state["scheduler"])
    run.sampler.load_state_dict(state["sampler"])
    run.result.history = list(state["history"])
    run.result.best_step, run.result.best_metric = state["best"]["step"], state["best"]["metric"]
    run.result.resumed_from = run.step = step


def _load_weights(run: _Run, state: Mapping[str, Any]) -> None:
    dd.load_model_state(run.model, state["model"], run.dist)
    with torch.no_grad():
        for p, saved in zip(run.extra_params, state["extra_params"], strict=True):
            p.copy_(saved)


# ---------------------------------------------------------------------------------------------
# Evaluation and best-state selection


@contextmanager
def forked_rng() -> Iterator[None]:
    """Run a block without moving the global RNG streams (python, numpy, torch CPU and CUDA):
    their states are put back on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _evaluate(model: torch.nn.Module, eval_fn: Callable, step: int,
              record: Mapping[str, Any]) -> dict[str, float]:
    """``eval_fn(model, step)`` in eval mode, without gradients, with the RNG forked; its
    metrics checked to be numbers under names that are not already in the step's record."""
    model.eval()
    try:
        with torch.no_grad(), forked_rng():
            metrics = eval_fn(model, step)
    finally:
        model.train()
    if not isinstance(metrics, Mapping):
        raise TypeError(f"eval_fn must return a dict of metric name -> number, got "
                        f"{type(metrics).__name__} at step {step}")
    out = {}
    for key, value in metrics.items():
        if key in _RECORD_KEYS or key in record:
            raise ValueError(f"eval_fn returned the metric {key!r}, which the training record "
                             f"already has: rename it (e.g. 'dev/{key}')")
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"eval_fn returned {key!r} = {value!r} at step {step}: metrics "
                            "must be numbers") from None
    return out


def _evaluate_run(run: _Run, eval_fn: Callable, record: Mapping[str, Any]) -> dict[str, float]:
    """:func:`_evaluate` on the bare model; in a distributed run on rank 0 (on every rank when
    sharded: the forward pass is collective), and rank 0's metrics given to every rank, so
    that all ranks agree on the best state."""
    metrics = None
    if run.dist.is_main or run.dist.sharded:
        metrics = _evaluate(run.model, eval_fn, run.step, record)
    return dd.broadcast_object(metrics, run.dist)


def _update_best(run: _Run, metrics: Mapping[str, float], metric: str, mode: str,
                 checkpointer: Checkpointer) -> None:
    """Save the model (and extra parameters) as the best state when ``metric`` improves
    strictly (a tie keeps the earlier step; NaN never improves)."""
    if metric not in metrics:
        raise ValueError(f"select_metric {metric!r} is not among the metrics eval_fn returned "
                       f"({sorted(metrics)}) at step {run.step}")
    value, best = metrics[metric], run.result.best_metric
    if math.isnan(value):
        return
    if best is not None and not (value > best if mode == "max" else value < best):
        return
    state = {"model": dd.model_state(run.model, run.dist),
             "extra_params": [p.detach().clone() for p in run.extra_params], "metric": value}
    if run.dist.is_main:
        checkpointer.save_best(run.step, state)
    run.result.best_step, run.result.best_metric = run.step, value


def _adopt_saved_best(run: _Run, checkpointer: Checkpointer) -> None:
    """After a resume: a best state saved after the checkpoint (the run was killed between an
    improvement and its next checkpoint) is the best so far. With a deterministic eval_fn the
    replayed steps reach it again; with a non-deterministic one (sampled generation) this keeps
    the best state on disk and the one the loop tracks the same."""
    found = checkpointer.load_best()
    if found is not None and found[0] != run.result.best_step:
        run.result.best_step, run.result.best_metric = found[0], float(found[1]["metric"])


def _restore_best(run: _Run, checkpointer: Checkpointer) -> None:
    """Load the best state back into the model and extra parameters (no-op without one)."""
    if run.result.best_step is None:
        return
    dd.barrier(run.dist)  # rank 0 may still be saving it
    found = checkpointer.load_best()
    if found is None or found[0] != run.result.best_step:
        raise RuntimeError(
            f"the best state of step {run.result.best_step} is not in {checkpointer!r} "
            f"(found: {None if found is None else f'step {found[0]}'}); it was removed or "
            "replaced while the run was stopped: remove the checkpoints and train again")
    _load_weights(run, found[1])


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    """history: one dict per optimizer step: step (1-based), epoch, loss, each loss term,
    lr (of the first parameter group), seconds (wall time of the step), and at the evaluated
    steps each metric eval_fn returned. best_step / best_metric: where select_metric was best
    (None without selection, or when no evaluation gave a number)."""

    history: list[dict] = field(default_factory=list)
    total_steps: int = 0
    resumed_from: int | None = None
    best_step: int | None = None
    best_metric: float | None = None

    @property
    def steps_done(self) -> int:
        return self.history[-1]["step"] if self.history else 0

    @property
    def final_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None


@dataclass
class _Run:
    """What a training run holds between steps (and what a checkpoint saves). ``model`` is the
    bare model; ``step_model`` what the step calls (DDP around it in a distributed run)."""

    model: torch.nn.Module
    step_model: torch.nn.Module
    dist: DistContext
    extra_params: list[torch.nn.Parameter]
    all_params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: EpochSampler
    signature: dict[str, Any]
    result: TrainResult
    step: int = 0


def move_to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor in it moved to ``device``: tensors, mappings (as dicts),
    lists and tuples (same type), dataclass instances (a copy with each field moved); anything
    else is returned as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{
            f.name: move_to_device(getattr(batch, f.name), device)
            for f in dataclasses.fields(batch) if f.init
        })
    return batch


def _split_loss(out: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """loss_fn may return a scalar tensor, or (loss, {term: value}) with the loss terms."""
    if isinstance(out, torch.Tensor):
        return out, {}
    loss, terms = out
    return loss, {k: float(v.detach() if isinstance(v, torch.Tensor) else v) for k, v in terms.items()}


def _param_groups(
    model: torch.nn.Module, extra_param_groups: Iterable[Mapping], lr: float, weight_decay: float
) -> tuple[list[dict], list[torch.nn.Parameter]]:
    """AdamW groups: the model's weight matrices with weight decay, its biases, norms and
    other 1-d parameters without, then each extra group (its own lr / weight_decay)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    extra_params: list[torch.nn.Parameter] = []
    for g in extra_param_groups:
        g = dict(g)
        if "module" in g:
            g["params"] = list(g.pop("module").parameters())
        g["params"] = [p for p in g["params"] if p.requires_grad]
        g.setdefault("lr", lr)
        g.setdefault("weight_decay", weight_decay)
        g.pop("name", None)
        extra_params.extend(g["params"])
        groups.append(g)
    return [g for g in groups if g["params"]], extra_params


def _setup(model: torch.nn.Module, n: int, extra_param_groups: Iterable[Mapping], *,
           batch_size: int, lr: float, steps: int | None, epochs: float | None,
           weight_decay: float, betas: tuple[float, float], schedule: str,
           warmup_steps: int | None, warmup_ratio: float, min_lr_ratio: float, seed: int,
           shuffle: bool, drop_last: bool, block_size: int | None, also_match: Mapping,
           dist: DistContext) -> _Run:
    """Data order (this rank's slices), the model as the step calls it, AdamW over the model
    and the extra groups, the LR schedule."""
    check_world_size(n, batch_size, drop_last, dist.world_size)
    sampler = EpochSampler(n, batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
                           block_size=block_size, rank=dist.rank, world_size=dist.world_size)
    total_steps = steps if steps is not None else max(1, math.ceil(epochs * sampler.batches_per_epoch))
    if warmup_steps is None:
        warmup_steps = int(warmup_ratio * total_steps)
    step_model = dd.wrap_model(model, dist)  # before the optimizer: FSDP replaces parameters
    groups, extra_params = _param_groups(model, extra_param_groups, lr, weight_decay)
    dd.broadcast_params(extra_params, dist)
    optimizer = torch.optim.AdamW(groups, betas=betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            step, total_steps, warmup_steps=warmup_steps, schedule=schedule, min_lr_ratio=min_lr_ratio
        ),
    )
    # What must match for a checkpoint to be continued by this call.
    signature = {"total_steps": total_steps, "batch_size": batch_size, "n": n, "seed": seed,
                 "shuffle": shuffle, "drop_last": drop_last, "block_size": block_size,
                 **also_match}
    return _Run(model=model, step_model=step_model, dist=dist, extra_params=extra_params,
                all_params=[p for g in groups for p in g["params"]], optimizer=optimizer,
                scheduler=scheduler, sampler=sampler, signature=signature,
                result=TrainResult(total_steps=total_steps))


def check_world_size(n: int, batch_size: int, drop_last: bool, world_size: int) -> None:
    """Every global batch must give each rank at least one example (each rank takes part in
    every step's collectives)."""
    last = 0 if drop_last else n % batch_size
    if world_size > 1 and (batch_size < world_size or 0 < last < world_size):
        short = batch_size if batch_size < world_size else last
        raise ValueError(
            f"a global batch of {short} examples cannot give each of the {world_size} ranks one "
            f"(dataset {n}, batch_size {batch_size}): use a batch_size of at least "
            f"{world_size} whose last batch of the epoch is too, drop_last, or fewer ranks")


def _train_step(run: _Run, loss_fn: Callable, dataset: Sequence, collate_fn: Callable,
                grad_clip: float | None, device: torch.device) -> dict[str, Any]:
    """One optimizer step on the sampler's next batch (this rank's slice of it); returns the
    step's history record (the global batch's loss and terms)."""
    t0 = time.perf_counter()
    d = run.dist
    epoch, indices = run.sampler.next_batch()
    if d.distributed:
        dd.seed_step(run.signature["seed"], d.rank, run.step)
    batch = move_to_device(collate_fn([dataset[i] for i in indices]), device)
    loss, terms = _split_loss(loss_fn(run.step_model, batch))
    n_global, value, terms = dd.combine_step(d, len(indices), float(loss.detach()), terms)
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {run.step + 1}")
    if d.distributed:  # the all-reduce averages: see cot2align_core.distributed
        loss = loss * (d.world_size * len(indices) / n_global)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    dd.average_grads(run.extra_params, d)
    if grad_clip:
        dd.clip_grad_norm(run.all_params, grad_clip, d)
    current_lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    return {
        "step": run.step,
        "epoch": epoch,
        "loss": value,
        **terms,
        "lr": current_lr,
        "seconds": time.perf_counter() - t0,
    }


def _start(run: _Run, checkpointer: Checkpointer | None, resume: bool, selecting: bool,
           seed: int) -> None:
    """Continue from the newest checkpoint (every rank reads it; they must find the same), or
    start afresh: clear the checkpointer (rank 0) and seed the global generators."""
    found = checkpointer.restore() if resume else None
    dd.agree(None if found is None else found[0], run.dist, "the checkpoint to resume from")
    if found is not None:
        _load_checkpoint(run, *found, checkpointer)
        if selecting:
            _adopt_saved_best(run, checkpointer)
        return
    if checkpointer is not None and run.dist.is_main:
        checkpointer.remove_all()
    torch.manual_seed(seed)  # dropout and anything else random in loss_fn
    random.seed(seed)
    np.random.seed(seed)


def _check_train_args(steps, epochs, checkpointer, checkpoint_every, resume, eval_every,
                      eval_fn, select_metric, select_mode, restore_best) -> None:
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if checkpoint_every and checkpointer is None:
        raise ValueError("checkpoint_every needs a checkpointer (storage.checkpoints.CheckpointDir)")
    if resume and checkpointer is None:
        raise ValueError("resume needs a checkpointer (storage.checkpoints.CheckpointDir)")
    if eval_every < 0 or (eval_every and eval_fn is None):
        raise ValueError(f"eval_every={eval_every} needs an eval_fn and must be >= 0")
    if select_metric is not None and (eval_fn is None or checkpointer is None):
        raise ValueError(f"select_metric={select_metric!r} needs an eval_fn that returns it and "
                         "a checkpointer to keep the best state")
    if select_mode not in SELECT_MODES:
        raise ValueError(f"select_mode must be one of {SELECT_MODES}, got {select_mode!r}")
    if restore_best and select_metric is None:
        raise ValueError("restore_best needs a select_metric to choose the best state by")


def train(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], Any],
    dataset: Sequence,
    *,
    batch_size: int,
    lr: float,
    steps: int | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    collate_fn: Callable[[list], Any] | None = None,
    extra_param_groups: Iterable[Mapping] = (),
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.95),
    grad_clip: float | None = 1.0,
    schedule: str = "cosine",
    warmup_steps: int | None = None,
    warmup_ratio: float = 0.05,
    min_lr_ratio: float = 0.0,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    shuffle_block_size: int | None = None,
    checkpointer: Checkpointer | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    eval_every: int = 0,
    eval_fn: Callable[[torch.nn.Module, int], Mapping[str, float]] | None = None,
    select_metric: str | None = None,
    select_mode: str = "max",
    restore_best: bool = False,
    on_log: Callable[[dict], None] | None = None,
    log_every: int = 1,
    dist: DistContext | None = None,
) -> TrainResult:
    """Train `model` on `dataset` with AdamW, minimising `loss_fn(model, collate_fn(rows))`.

    Length: `steps` optimizer steps, or `epochs` passes over the data (may be fractional);
    the schedule spans that length. `max_steps` stops earlier without changing the schedule
    (a run cut short on purpose, e.g. in tests; resume continues it).
    loss_fn returns the loss tensor, or (loss, {"term": value, ...}) to log each term. The
    batch is moved to the model's device (:func:`move_to_device`).
    extra_param_groups: AdamW groups beside the model's, each {"params": [...]} or
    {"module": nn.Module}, with optional "lr" and "weight_decay" (e.g. a projector with lr
    1e-3); their parameters are checkpointed with the model.
    Schedule: linear warmup over warmup_steps (default: warmup_ratio of the steps), then
    "cosine" decay to min_lr_ratio x lr, or "constant". Weight decay applies to weight
    matrices only (not to biases and norms). grad_clip: max global grad norm (None: off).
    Data order: :class:`~cot2align_core.sampling.EpochSampler` (seed, shuffle, drop_last;
    shuffle_block_size: shuffle blocks of that many consecutive items, for datasets read
    from disk in chunks).
    Checkpoints (through `checkpointer`): every `checkpoint_every` steps and at the last step
    run. resume: continue from the newest one; a run that starts from step 0 (resume=False,
    or no checkpoint) first clears the checkpointer (stale best states included). The final
    checkpoint is kept: removing the checkpoints is the caller's job, after its result is
    safe (Checkpointer.remove_all).
    Evaluation: every `eval_every` steps and at the last step of the schedule (eval_every=0:
    at the last step only), `eval_fn(model, step)` runs under torch.no_grad, with the model in
    eval mode and the global RNG states forked (evaluation never changes the training
    trajectory); its {name: number} metrics are merged into that step's history record.
    select_metric / select_mode ("max" or "min"): when that metric improves strictly, the
    model and extra parameters are saved as the best state (Checkpointer.save_best; a tie
    keeps the earlier step; NaN never improves); restore_best: load it back at the end.
    on_log(record) is called every `log_every` steps and at the last step run.
    The model is in train mode while training and in eval mode on return.
    Distributed (`dist` from :func:`cot2align_core.distributed.init_distributed`, world size
    > 1; every rank calls `train` with the same arguments): `batch_size` stays the global
    batch and each rank takes its slice; the model is wrapped (DDP, or FSDP2 with strategy
    "fsdp") and the extra groups' gradients averaged; the history records the global
    batch's loss and terms; rank 0 alone saves checkpoints and best states and calls on_log;
    every rank resumes from the same checkpoint. See :mod:`cot2align_core.distributed`.
    """
    _check_train_args(steps, epochs, checkpointer, checkpoint_every, resume, eval_every,
                      eval_fn, select_metric, select_mode, restore_best)
    collate_fn = collate_fn or (lambda rows: rows)
    dist = dist or DistContext(device=next(model.parameters()).device)
    run = _setup(model, len(dataset), extra_param_groups, batch_size=batch_size, lr=lr,
                 steps=steps, epochs=epochs, weight_decay=weight_decay, betas=betas,
                 schedule=schedule, warmup_steps=warmup_steps, warmup_ratio=warmup_ratio,
                 min_lr_ratio=min_lr_ratio, seed=seed, shuffle=shuffle, drop_last=drop_last,
                 block_size=shuffle_block_size,
                 also_match={"eval_every": eval_every if eval_fn else 0,
                            "select_metric": select_metric, "select_mode": select_mode},
                 dist=dist)
    total_steps = run.result.total_steps
    stop_at = total_steps if max_steps is None else min(max_steps, total_steps)
    _start(run, checkpointer, resume, select_metric is not None, seed)

    device = dist.device if dist.distributed else next(model.parameters()).device
    model.train()
    while run.step < stop_at:
        record = _train_step(run, loss_fn, dataset, collate_fn, grad_clip, device)
        if eval_fn is not None and ((eval_every and run.step % eval_every == 0)
                                    or run.step == total_steps):
            metrics = _evaluate_run(run, eval_fn, record)
            record.update(metrics)
            if select_metric is not None:
                _update_best(run, metrics, select_metric, select_mode, checkpointer)
        run.result.history.append(record)
        if on_log is not None and dist.is_main and (run.step % log_every == 0
                                                    or run.step == stop_at):
            on_log(record)
        if checkpointer is not None and (
            (checkpoint_every and run.step % checkpoint_every == 0) or run.step == stop_at
        ):
            state = _checkpoint_state(run)
            if dist.is_main:
                checkpointer.save(run.step, state)
    if restore_best:
        _restore_best(run, checkpointer)
    model.eval()
    return run.result
