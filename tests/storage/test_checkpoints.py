import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from storage.checkpoints import (capture_rng_state, latest_checkpoint, list_checkpoints,
                                 load_checkpoint, restore_rng_state, save_checkpoint)


def training_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_save_keep_last_load(tmp_path):
    model, opt, sched = training_state()
    for step in (10, 20, 30, 40):
        path = save_checkpoint(tmp_path, step, {"model": model.state_dict(),
                                                "optimizer": opt.state_dict(),
                                                "scheduler": sched.state_dict(), "step": step},
                               keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert latest_checkpoint(tmp_path) == path and path.endswith("step-000000040.pt")
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    state = load_checkpoint(path)                       # weights_only=True
    assert state["step"] == 40
    fresh, fresh_opt, fresh_sched = training_state()
    fresh.load_state_dict(state["model"])
    fresh_opt.load_state_dict(state["optimizer"])
    fresh_sched.load_state_dict(state["scheduler"])
    assert fresh_sched.last_epoch == sched.last_epoch
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, 50, {}, keep_last=0)


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = save_checkpoint(tmp_path, 1, {"step": 1})
    expected = draws()
    draws()
    restore_rng_state(load_checkpoint(path)["rng"])
    assert draws() == expected
    state = capture_rng_state()
    expected = draws()
    restore_rng_state(state)
    assert draws() == expected


def test_partial_file_of_a_dead_saver_is_cleaned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    junk = tmp_path / f"step-000000005.pt.tmp-{dead.pid}"
    junk.write_bytes(b"torn")
    save_checkpoint(tmp_path, 6, {"step": 6})
    assert not junk.exists() and [s for s, _ in list_checkpoints(tmp_path)] == [6]


def test_memory_checkpoints():
    root = "memory://ckpt-test/run"
    for step in range(3):
        save_checkpoint(root, step, {"w": torch.full((2,), float(step))}, keep_last=2)
    assert [s for s, _ in list_checkpoints(root)] == [1, 2]
    assert torch.equal(load_checkpoint(latest_checkpoint(root))["w"], torch.full((2,), 2.0))
