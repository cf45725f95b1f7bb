import errno
import io
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import storage.checkpoints as checkpoints
from storage.checkpoints import (CheckpointDir, CheckpointWriteError, UnsafeCheckpointError,
                                 capture_rng_state, latest_checkpoint, list_checkpoints,
                                 load_checkpoint, restore_rng_state, save_checkpoint)
from storage.errors import StoreError


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
    ckpts = CheckpointDir(root)
    ckpts.save_best(1, {"w": torch.ones(2)})
    assert ckpts.restore()[0] == 2 and ckpts.load_best()[0] == 1
    ckpts.remove_all()
    assert ckpts.restore() is None and ckpts.load_best() is None


class RunsCode:
    """Unpickling this object creates ``marker`` (through os.system): a stand-in for code
    planted in a checkpoint by someone who can write to the store."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    ckpts = CheckpointDir(tmp_path / "ckpt")
    ckpts.save(5, {"w": torch.ones(2)})
    marker = tmp_path / "pwned"
    planted = tmp_path / "ckpt" / "step-000000009.pt"
    torch.save({"step": 9, "payload": RunsCode(marker)}, planted)
    torch.load(planted, weights_only=False)          # the plant is live: the unsafe way runs it
    assert marker.exists()
    marker.unlink()
    for load in (ckpts.restore, lambda: load_checkpoint(planted)):
        with pytest.raises(UnsafeCheckpointError) as err:
            load()
        msg = str(err.value)
        assert str(planted) in msg and "delete it" in msg and "posix.system" in msg
        assert "weights_only=False" in msg                      # ... as a warning, not advice
    assert not marker.exists()
    (tmp_path / "best.pt").write_bytes(planted.read_bytes())  # the best state is checked too
    with pytest.raises(UnsafeCheckpointError):
        CheckpointDir(tmp_path).load_best()
    assert not marker.exists()


def test_a_damaged_checkpoint_is_named(tmp_path):
    path = save_checkpoint(tmp_path, 3, {"w": torch.ones(1000)})
    Path(path).write_bytes(Path(path).read_bytes()[:200])
    with pytest.raises(StoreError, match="damaged") as err:
        load_checkpoint(path)
    assert path in str(err.value)


class FullDisk(io.FileIO):
    """A file on a disk that fills up after ``room`` bytes: the next write raises ENOSPC."""

    room = 4096

    def write(self, data):
        if self.tell() + len(data) > self.room:
            super().write(bytes(data)[: max(self.room - self.tell(), 0)])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_disk_full_at_a_save_removes_the_temporary_file_and_names_the_fix(tmp_path, monkeypatch):
    ckpts = CheckpointDir(tmp_path, keep_last=2)
    ckpts.save(1, {"w": torch.zeros(8)})
    monkeypatch.setattr(checkpoints, "open", lambda path, mode: FullDisk(path, mode), raising=False)
    for save in (lambda: ckpts.save(2, {"w": torch.randn(100_000)}),
                 lambda: ckpts.save_best(2, {"w": torch.randn(100_000)})):
        with pytest.raises(CheckpointWriteError) as err:
            save()
        msg = str(err.value)
        assert str(tmp_path) in msg and "No space left on device" in msg and "Free space" in msg
        assert sorted(os.listdir(tmp_path)) == ["step-000000001.pt"]   # no .tmp left behind
    monkeypatch.undo()
    step, state = ckpts.restore()                       # the previous checkpoint is intact
    assert step == 1 and torch.equal(state["w"], torch.zeros(8))


def test_checkpoint_dir_restores_rng_keeps_the_best_state_and_removes_all(tmp_path):
    ckpts = CheckpointDir(tmp_path / "run", keep_last=1)
    assert ckpts.restore() is None and ckpts.load_best() is None
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ckpts.save(1, {"w": torch.ones(1)})
    ckpts.save_best(1, {"w": torch.full((1,), 7.0), "metric": 0.5})
    ckpts.save(2, {"w": torch.ones(1)})
    expected = draws()
    draws()
    step, state = ckpts.restore()                       # the RNG states of step 2's save
    assert step == 2 and ckpts.steps() == [2] and draws() == expected
    best_step, best = ckpts.load_best()                 # not rotated away by keep_last
    assert best_step == 1 and best["metric"] == 0.5 and float(best["w"]) == 7.0
    ckpts.remove_all()
    assert not (tmp_path / "run").exists() and ckpts.restore() is None
    with pytest.raises(ValueError):
        CheckpointDir(tmp_path, keep_last=0)
