r"""Training on several processes with ``torch.distributed``: the process group, the model's
wrapping (DDP or FSDP2), and the collective steps the training loop takes.

A launcher starts one process per rank: ``torchrun``, or Ray Train's ``TorchTrainer`` (which
also creates the process group). :func:`init_distributed` joins that group (or creates it
from ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``, gloo on CPUs, NCCL on
GPUs) and returns the :class:`DistContext` that ``cot2align_core.training.train(dist=...)``
runs with. One process without those variables is world size 1, and the loop is unchanged.

What each rank does, with a fixed global batch of :math:`n` examples, :math:`n_r` of them on
rank :math:`r` of :math:`W` (:class:`~cot2align_core.sampling.EpochSampler`'s rank slices):

- **Gradients.** Rank :math:`r` back-propagates :math:`W \frac{n_r}{n} L_r`, where
  :math:`L_r` is the loss of its slice; the all-reduce averages, so every rank holds

  .. math:: \frac{1}{W} \sum_r W \frac{n_r}{n} \nabla L_r = \sum_r \frac{n_r}{n} \nabla L_r,

  the gradient of the global batch's loss when the loss is a mean over examples (exactly,
  uneven slices included). A loss that is a mean over *tokens* of the batch (the CE and KD
  terms here) gets each slice's token mean weighted by its share of the examples: the
  single-process gradient exactly when the slices hold equally many loss tokens, and the
  usual data-parallel approximation otherwise.
- **Model.** DDP (:func:`wrap_model`: bucketed all-reduce overlapping the backward pass) or
  FSDP2 (``fully_shard`` on each transformer block, then the root: parameters, gradients and
  optimizer state sharded over the ranks).
- **Extra parameters** (the objective's projector and cross-model attention, outside the
  model): :func:`average_grads`, one flat all-reduce after the backward pass, with a flag per
  parameter so that one no rank gave a gradient keeps ``grad = None`` as in one process.
- **Randomness** (dropout): each step draws from ``torch.manual_seed(f(seed, rank, step))``
  (:func:`seed_step`), so a resumed rank draws what an uninterrupted one would have.
- **Checkpoints**: full (unsharded) state dicts, saved by rank 0 and read by every rank.

References: PyTorch DistributedDataParallel; Zhao et al., "PyTorch FSDP: Experiences on
Scaling Fully Sharded Data Parallel" (VLDB 2023); the FSDP2 ``fully_shard`` API.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["STRATEGIES", "DistContext", "init_distributed", "wrap_model", "broadcast_params",
           "average_grads", "combine_step", "clip_grad_norm", "seed_step", "model_state",
           "load_model_state", "optimizer_state", "load_optimizer_state", "broadcast_object",
           "agree", "barrier"]

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: rank, world size, local rank, device, strategy."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        return self.distributed and self.strategy == "fsdp"


def _device(name: str | torch.device, local_rank: int) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)


def init_distributed(device: str | torch.device = "auto", strategy: str = "ddp",
                     timeout_s: float = 1800.0) -> DistContext:
    """Join (or create, from the launcher's environment variables) the default process group.

    ``device``: ``"auto"`` is ``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU.
    Without ``WORLD_SIZE`` > 1 and without a group, this is a single process (world size 1).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device, local_rank)
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {missing} are not "
                               "set: launch with torchrun or Ray Train, which set them")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                timeout=timedelta(seconds=timeout_s))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        return DistContext(device=dev, strategy=strategy)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, strategy)


class _DDP(nn.parallel.DistributedDataParallel):
    """DDP that lets attribute lookups through to the model (``get_input_embeddings()``,
    ``config``...), so a loss function written for the bare model takes the wrapped one."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The module the training step calls: the model itself in one process; DDP around it;
    or, for ``fsdp``, the model sharded in place (each transformer block, named by the
    model's ``_no_split_modules``, then the root). Make the optimizer after this call."""
    if not ctx.distributed:
        return model
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        blocks = set(getattr(model, "_no_split_modules", None) or ())
        for module in list(model.modules()):
            if module is not model and type(module).__name__ in blocks:
                fully_shard(module)
        fully_shard(model)
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return _DDP(model, device_ids=ids)


def broadcast_params(params: Iterable[torch.Tensor], ctx: DistContext) -> None:
    """Copy rank 0's values of ``params`` (plain tensors) to every rank."""
    if ctx.distributed:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


def average_grads(params: list[torch.Tensor], ctx: DistContext) -> None:
    r"""Average the gradients of ``params`` (plain tensors outside the wrapped model) over the
    ranks in one flat all-reduce. A rank without a gradient for a parameter adds zeros; a
    parameter no rank gave a gradient keeps ``grad = None``."""
    if not ctx.distributed or not params:
        return
    grads = [p.grad.detach().reshape(-1).float() if p.grad is not None
             else torch.zeros(p.numel(), device=p.device) for p in params]
    flags = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat(grads + [flags])
    dist.all_reduce(flat)
    flat[:-len(params)] /= ctx.world_size
    offset = 0
    for p, has in zip(params, flat[-len(params):].tolist()):
        part = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        p.grad = part.clone() if has else None


def combine_step(ctx: DistContext, n_items: int, loss: float,
                 terms: Mapping[str, float]) -> tuple[int, float, dict[str, float]]:
    """``(n, loss, terms)`` of the global batch from every rank's ``(n_r, loss_r, terms_r)``:
    ``n = sum n_r``; the loss and each term are means weighted by ``n_r`` (over the ranks
    that report the term)."""
    if not ctx.distributed:
        return n_items, loss, dict(terms)
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, (n_items, loss, dict(terms)))
    n = sum(p[0] for p in parts)
    total = sum(p[0] * p[1] for p in parts) / n
    keys = sorted({k for p in parts for k in p[2]})
    combined = {}
    for k in keys:
        have = [(p[0], p[2][k]) for p in parts if k in p[2]]
        combined[k] = sum(m * v for m, v in have) / sum(m for m, _ in have)
    return n, total, combined


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, ctx: DistContext) -> None:
    """Scale the gradients so that their global 2-norm is at most ``max_norm``:
    ``torch.nn.utils.clip_grad_norm_`` unless sharded; for FSDP the norm of the sharded
    gradients is reduced over the ranks (DTensor) and combined with the plain ones."""
    if not ctx.sharded:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    sq = 0.0
    if sharded:
        sq += float(torch.nn.utils.get_total_norm(sharded).full_tensor()) ** 2
    if plain:
        sq += float(torch.nn.utils.get_total_norm(plain)) ** 2
    coef = min(1.0, max_norm / (math.sqrt(sq) + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed torch's generators (CPU and CUDA) for one step of one rank from
    ``SeedSequence([seed, rank, step])``."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0]
    torch.manual_seed(int(state))


def model_state(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The model's full state dict. Sharded: gathered (every rank must call), on the CPU of
    rank 0 (other ranks get an empty dict)."""
    if not ctx.sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor],
                     ctx: DistContext) -> None:
    """Load a full state dict (every rank passes the same one)."""
    if not ctx.sharded:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))


def optimizer_state(optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole (every rank
    must call when sharded): the layout a single-process optimizer loads."""
    state = optimizer.state_dict()
    if not ctx.sharded:
        return state
    from torch.distributed.tensor import DTensor

    state["state"] = {i: {k: (v.full_tensor().cpu() if isinstance(v, DTensor) else v)
                          for k, v in s.items()} for i, s in sorted(state["state"].items())}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any],
                         ctx: DistContext) -> None:
    """Load an optimizer state saved by :func:`optimizer_state` (full tensors); sharded, each
    rank keeps its shard of each state tensor of a sharded parameter."""
    if not ctx.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    shards = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        shards[i] = {k: (distribute_tensor(v.to(ctx.device), p.device_mesh, p.placements,
                                           src_data_rank=None)
                         if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape
                         else v) for k, v in s.items()}
    optimizer.load_state_dict({**state, "state": shards})


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(value: Any, ctx: DistContext, what: str) -> None:
    """Raise on every rank unless all ranks hold the same ``value`` (e.g. the checkpoint step
    each found: ranks that see different files do not share the checkpoint folder)."""
    if not ctx.distributed:
        return
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, value)
    if any(p != parts[0] for p in parts):
        raise RuntimeError(f"the ranks disagree on {what}: {dict(enumerate(parts))}; every rank "
                           "must see the same checkpoint folder (a store on a filesystem or "
                           "object store shared by all nodes)")


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
