"""Fixtures of the core tests."""
from __future__ import annotations

import os
import random

import pytest
import torch


@pytest.fixture
def g() -> torch.Generator:
    """A generator on a fresh random seed per test (printed; ``COT2ALIGN_TEST_SEED`` replays)."""
    env = os.environ.get("COT2ALIGN_TEST_SEED")
    seed = int(env) if env else random.SystemRandom().randrange(2**31)
    print(f"seed={seed} (replay with COT2ALIGN_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)
