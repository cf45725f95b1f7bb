"""One training loop for teacher SFT and student distillation, in plain sight.

    for step in range(start, total_steps):
        batch = collate(next batch of the epoch's shuffled order)
        loss, terms = loss_fn(model, batch)
        loss.backward(); clip grads; AdamW step; LR schedule step
        history.append({step, epoch, loss, *terms, lr, seconds})
        every `checkpoint_every` steps: save everything needed to continue

What a checkpoint holds: model and extra parameters (e.g. a projector), optimizer, scheduler,
the RNG states of python, numpy and torch, the sampler position (epoch, batch within the
epoch) and the history. It is written to a temporary file and renamed into place, so a kill
at any moment leaves either the previous checkpoint or the new one, never half of one.
`resume=True` continues from the newest one: on CPU a run killed (SIGKILL included) and
resumed ends with exactly the same weights as an uninterrupted run.

The data order depends only on (seed, epoch), not on global RNG state, so it is the same
whether or not the run was interrupted.
"""
from __future__ import annotations

import math
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^step_(\d+)\.pt$")


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
# Data order


class EpochShuffleSampler:
    """Batches of indices: a new permutation each epoch, fixed by (seed, epoch).

    The position (epoch, batch within the epoch) is the whole state, so a resumed run
    continues with the very batch an uninterrupted one would have taken.
    """

    def __init__(
        self, n: int, batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_last: bool = False
    ):
        if n <= 0 or batch_size <= 0:
            raise ValueError(f"need a non-empty dataset and batch_size > 0 (n={n}, batch_size={batch_size})")
        if drop_last and n < batch_size:
            raise ValueError(f"drop_last with {n} examples < batch_size {batch_size} leaves no batch")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.batch_in_epoch = 0, 0
        self._order_epoch, self._order = None, None

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            else:
                self._order = np.arange(self.n)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> tuple[int, list[int]]:
        """(epoch of the batch, its indices); advances the position."""
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        epoch, b = self.epoch, self.batch_in_epoch
        indices = self.order(epoch)[b * self.batch_size : (b + 1) * self.batch_size].tolist()
        self.batch_in_epoch += 1
        return epoch, indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: Mapping) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])


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


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in `checkpoint_dir`, oldest first."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: Mapping) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    """history: one dict per optimizer step: step (1-based), epoch, loss, each loss term,
    lr (of the first parameter group), seconds (wall time of the step)."""

    history: list[dict] = field(default_factory=list)
    total_steps: int = 0
    resumed_from: int | None = None
    last_checkpoint: Path | None = None

    @property
    def steps_done(self) -> int:
        return self.history[-1]["step"] if self.history else 0

    @property
    def final_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def move_to_device(batch, device):  # TEMP until the core-refactor branch lands
    import dataclasses

    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: move_to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch)
                                             if isinstance(getattr(batch, f.name), torch.Tensor)})
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
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
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    keep_last: int = 2,
    resume: bool = False,
    on_log: Callable[[dict], None] | None = None,
    log_every: int = 1,
) -> TrainResult:
    """Train `model` on `dataset` with AdamW, minimising `loss_fn(model, collate_fn(rows))`.

    Length: `steps` optimizer steps, or `epochs` passes over the data (may be fractional);
    the schedule spans that length. `max_steps` stops earlier without changing the schedule
    (a run cut short on purpose, e.g. in tests; resume continues it).
    loss_fn returns the loss tensor, or (loss, {"term": value, ...}) to log each term.
    extra_param_groups: AdamW groups beside the model's, each {"params": [...]} or
    {"module": nn.Module}, with optional "lr" and "weight_decay" (e.g. a projector with lr
    1e-3); their parameters are checkpointed with the model.
    Schedule: linear warmup over warmup_steps (default: warmup_ratio of the steps), then
    "cosine" decay to min_lr_ratio x lr, or "constant". Weight decay applies to weight
    matrices only (not to biases and norms). grad_clip: max global grad norm (None: off).
    Checkpoints: every `checkpoint_every` steps and at the last step run, into checkpoint_dir as
    step_XXXXXXX.pt, keeping the newest `keep_last`. resume: continue from the newest one
    (a fresh start when there is none). on_log(record) is called every `log_every` steps.
    The model is in train mode while training and in eval mode on return.
    """
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if checkpoint_every and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs a checkpoint_dir")
    if resume and checkpoint_dir is None:
        raise ValueError("resume needs a checkpoint_dir")
    collate_fn = collate_fn or (lambda rows: rows)
    sampler = EpochShuffleSampler(len(dataset), batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last)
    total_steps = steps if steps is not None else max(1, math.ceil(epochs * sampler.batches_per_epoch))
    if warmup_steps is None:
        warmup_steps = int(warmup_ratio * total_steps)
    stop_at = total_steps if max_steps is None else min(max_steps, total_steps)

    groups, extra_params = _param_groups(model, extra_param_groups, lr, weight_decay)
    all_params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, betas=betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            step, total_steps, warmup_steps=warmup_steps, schedule=schedule, min_lr_ratio=min_lr_ratio
        ),
    )
    # What must match for a checkpoint to be continued by this call.
    signature = {"total_steps": total_steps, "batch_size": batch_size, "n": len(dataset), "seed": seed}

    result = TrainResult(total_steps=total_steps)
    step = 0
    if resume:  # temporary files of a save that was killed half-way
        for tmp in Path(checkpoint_dir).glob(".step_*.pt.*.tmp"):
            tmp.unlink(missing_ok=True)
    if resume and (found := list_checkpoints(checkpoint_dir)):
        ckpt_step, path = found[-1]
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["signature"] != signature:
            raise ValueError(
                f"checkpoint {path} was written by a run with {state['signature']}, this run has "
                f"{signature}: use another checkpoint_dir or the same settings"
            )
        model.load_state_dict(state["model"])
        with torch.no_grad():
            for p, saved in zip(extra_params, state["extra_params"], strict=True):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"])
        result.history = list(state["history"])
        result.resumed_from = step = ckpt_step
        result.last_checkpoint = path
    else:
        torch.manual_seed(seed)  # dropout and anything else random in loss_fn
        random.seed(seed)
        np.random.seed(seed)

    def save_checkpoint() -> None:
        path = Path(checkpoint_dir) / f"step_{step:07d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(
            {
                "step": step,
                "signature": signature,
                "model": model.state_dict(),
                "extra_params": [p.detach().clone() for p in extra_params],
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler": sampler.state_dict(),
                "rng": _rng_state(),
                "history": result.history,
            },
            path,
        )
        result.last_checkpoint = path
        for _, old in list_checkpoints(checkpoint_dir)[: -max(keep_last, 1)]:
            old.unlink(missing_ok=True)

    device = next(model.parameters()).device
    model.train()
    while step < stop_at:
        t0 = time.perf_counter()
        epoch, indices = sampler.next_batch()
        batch = _to_device(collate_fn([dataset[i] for i in indices]), device)
        loss, terms = _split_loss(loss_fn(model, batch))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(all_params, grad_clip)
        current_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        step += 1
        record = {
            "step": step,
            "epoch": epoch,
            "loss": float(loss.detach()),
            **terms,
            "lr": current_lr,
            "seconds": time.perf_counter() - t0,
        }
        result.history.append(record)
        if on_log is not None and (step % log_every == 0 or step == stop_at):
            on_log(record)
        due = (checkpoint_every and step % checkpoint_every == 0) or step == stop_at
        if checkpoint_dir is not None and due:
            save_checkpoint()
    model.eval()
    return result
