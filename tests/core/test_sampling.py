"""The training loop's sampler: seeded order, resume, blocks, rank slices of a global batch."""
from __future__ import annotations

import numpy as np
import pytest

from cot2align_core.sampling import EpochSampler


def walk(sampler: EpochSampler, steps: int) -> list[tuple[int, list[int]]]:
    return [sampler.next_batch() for _ in range(steps)]


def test_order_is_the_pcg64_permutation_of_seed_and_epoch():
    batches = walk(EpochSampler(10, 4, seed=3), 7)  # 3 batches per epoch: 4, 4, 2
    expected = []
    for epoch in range(3):
        order = np.random.Generator(np.random.PCG64(np.random.SeedSequence([3, epoch]))).permutation(10)
        expected += [(epoch, order[i:i + 4].tolist()) for i in (0, 4, 8)]
    assert batches == expected[:7]
    assert [b for e, b in batches if e == 0] != [b for e, b in batches if e == 1]
    assert EpochSampler(10, 4, seed=4).next_batch() != batches[0]
    assert EpochSampler(10, 4, drop_last=True).batches_per_epoch == 2
    assert walk(EpochSampler(10, 3, shuffle=False), 5) == [
        (0, [0, 1, 2]), (0, [3, 4, 5]), (0, [6, 7, 8]), (0, [9]), (1, [0, 1, 2])]
    assert [len(b) for _, b in walk(EpochSampler(10, 3, drop_last=True), 4)] == [3, 3, 3, 3]


def test_resumes_mid_epoch_from_its_state():
    full = walk(EpochSampler(50, 4, seed=7), 30)  # 13 batches per epoch
    probe = EpochSampler(50, 4, seed=7)
    walk(probe, 17)
    resumed = EpochSampler(50, 4, seed=7)
    resumed.load_state_dict(probe.state_dict())
    assert walk(resumed, 13) == full[17:]
    with pytest.raises(ValueError, match="seed"):
        EpochSampler(50, 4, seed=8).load_state_dict(probe.state_dict())


def test_block_shuffle_keeps_blocks_together():
    s = EpochSampler(40, 5, seed=4, block_size=10)
    order = s.epoch_order(0)
    assert sorted(order) == list(range(40))
    for k in range(4):  # each block of 10 consecutive ids is visited whole
        assert len(set(order[k * 10:(k + 1) * 10] // 10)) == 1
    assert not np.array_equal(order, np.sort(order))
    assert not np.array_equal(order, EpochSampler(40, 5, seed=4, block_size=10).epoch_order(1))
    assert np.array_equal(order, EpochSampler(40, 5, seed=4, block_size=10).epoch_order(0))
    ragged = EpochSampler(23, 5, seed=1, block_size=10).epoch_order(0)
    assert sorted(ragged) == list(range(23))  # a last block of 3
    assert np.array_equal(EpochSampler(9, 2, seed=2, block_size=1).epoch_order(0),
                          EpochSampler(9, 2, seed=2).epoch_order(0))


@pytest.mark.parametrize("n, batch_size, world_size, drop_last", [
    (23, 8, 2, False),   # per-rank 4; a tail of 7 split 3 + 4
    (23, 10, 4, False),  # 10 does not divide by 4: slices 2, 3, 2, 3; tail of 3 leaves rank 0 empty
    (40, 6, 3, True),
    (17, 4, 1, False),
])
def test_rank_slices_make_up_the_single_rank_batches(n, batch_size, world_size, drop_last):
    single = walk(EpochSampler(n, batch_size, seed=5, drop_last=drop_last), 12)
    ranks = [walk(EpochSampler(n, batch_size, seed=5, drop_last=drop_last, rank=r,
                               world_size=world_size), 12) for r in range(world_size)]
    for step, (epoch, batch) in enumerate(single):
        parts = [ranks[r][step] for r in range(world_size)]
        assert {e for e, _ in parts} == {epoch}  # every rank walks the same global batches
        assert sum((p for _, p in parts), []) == batch  # their slices, in rank order, are it
        sizes = [len(p) for _, p in parts]
        assert max(sizes) - min(sizes) <= 1
        if len(batch) % world_size == 0:
            assert sizes == [len(batch) // world_size] * world_size


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="non-empty"):
        EpochSampler(0, 4)
    with pytest.raises(ValueError, match="drop_last"):
        EpochSampler(3, 4, drop_last=True)
    with pytest.raises(ValueError, match="block_size"):
        EpochSampler(10, 4, block_size=0)
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(10, 4, rank=2, world_size=2)
