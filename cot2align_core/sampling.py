"""The order in which the training loop visits a dataset: one sampler, resumable and shardable.

Epoch ``e`` visits the items in an order fixed by ``(seed, e)`` alone (a permutation drawn from
``numpy.random.default_rng([seed, e])``, i.e. PCG64 seeded by ``SeedSequence([seed, e])``), cut
into global batches of ``batch_size``. The sampler's whole state is its position (epoch, batch
within the epoch), so a resumed run takes exactly the batch an uninterrupted one would have
taken, whatever the global RNG went through.

- **Block shuffle** (``block_size``): for datasets read from disk in chunks (a teacher cache
  larger than memory, read by row groups), the items are cut into blocks of ``block_size``
  consecutive indices; the order of the blocks is shuffled, then the items within each block.
  A batch then touches few blocks, so few row groups are decoded per batch.
- **Rank sharding** (``rank``, ``world_size``) for distributed data parallel with a fixed global
  batch: every rank walks the same global batches in the same order (the single-process ones)
  and takes its own contiguous slice of each. Rank ``r`` of ``W`` takes items
  ``[floor(r g / W), floor((r + 1) g / W))`` of a global batch of ``g`` items, so the slices of
  one step are disjoint, their union (in rank order) is the global batch, and their sizes
  differ by at most one. When ``batch_size`` is a multiple of ``W`` every full batch splits
  evenly (per-rank batch ``batch_size / W``). Otherwise, and for the short last batch of an
  epoch (``drop_last=False``), the slices are uneven: to reproduce the single-process gradient
  exactly, normalise each rank's summed loss by the global batch's length
  (:meth:`EpochSampler.global_batch`) rather than averaging over the rank's own items; a global
  batch shorter than ``W`` leaves some ranks an empty slice, which must still join the step
  (with a zero loss) or be avoided with ``drop_last=True``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["EpochSampler"]


class EpochSampler:
    """Batches of dataset indices, a new order each epoch, fixed by ``(seed, epoch)``.

    Parameters
    ----------
    n : int
        Number of items in the dataset (> 0).
    batch_size : int
        The global batch size (over all ranks).
    seed : int
        With the epoch, fixes the order.
    shuffle : bool
        False: every epoch visits ``0, 1, ..., n - 1`` in order.
    drop_last : bool
        Leave out the last batch of an epoch when it is shorter than ``batch_size``.
    block_size : int, optional
        Shuffle in blocks of this many consecutive indices (see the module docstring);
        None or 1: shuffle the items themselves.
    rank, world_size : int
        This process's rank and the number of ranks; each rank takes its slice of every
        global batch (see the module docstring).
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, block_size: int | None = None, rank: int = 0,
                 world_size: int = 1):
        if n <= 0 or batch_size <= 0:
            raise ValueError(
                f"need a non-empty dataset and batch_size > 0 (n={n}, batch_size={batch_size})")
        if drop_last and n < batch_size:
            raise ValueError(
                f"drop_last with {n} examples < batch_size {batch_size} leaves no batch: "
                "lower batch_size or set drop_last=False")
        if block_size is not None and (isinstance(block_size, bool) or block_size < 1):
            raise ValueError(f"block_size must be an int >= 1 or None, got {block_size!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last, self.block_size = shuffle, drop_last, block_size
        self.rank, self.world_size = rank, world_size
        self.epoch, self.batch_in_epoch = 0, 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Global batches (= optimizer steps) per epoch."""
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the items, ``[n]`` (cached per epoch)."""
        if self._order_epoch != epoch:
            self._order = self._draw_order(epoch)
            self._order_epoch = epoch
        return self._order

    def _draw_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        rng = np.random.default_rng([self.seed, epoch])
        if self.block_size is None or self.block_size == 1:
            return rng.permutation(self.n)
        starts = np.arange(0, self.n, self.block_size)
        blocks = [rng.permutation(np.arange(starts[b], min(starts[b] + self.block_size, self.n)))
                  for b in rng.permutation(len(starts))]
        return np.concatenate(blocks)

    def global_batch(self, epoch: int, b: int) -> list[int]:
        """Batch ``b`` of epoch ``epoch``, over all ranks."""
        return self.epoch_order(epoch)[b * self.batch_size:(b + 1) * self.batch_size].tolist()

    def rank_slice(self, batch: list[int]) -> list[int]:
        """This rank's contiguous part of a global batch (all of it for one rank)."""
        g, W, r = len(batch), self.world_size, self.rank
        return batch[r * g // W:(r + 1) * g // W]

    def next_batch(self) -> tuple[int, list[int]]:
        """``(epoch, this rank's indices)`` of the next batch; advances the position."""
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        epoch, b = self.epoch, self.batch_in_epoch
        self.batch_in_epoch += 1
        return epoch, self.rank_slice(self.global_batch(epoch, b))

    def state_dict(self) -> dict[str, int]:
        """The position (and the seed, checked on load): plain ints."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed}

    def load_state_dict(self, state: Mapping) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"sampler state has seed {state['seed']} but this sampler has seed {self.seed}: "
                "resume with the seed of the run that saved it")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
