"""Training checkpoints: atomic saves, the last N kept, RNG state included.

A checkpoint is one ``torch.save`` file ``step-<step, 9 digits>.pt`` holding whatever dict
the training loop gives (model / optimizer / scheduler state dicts, step, epoch, sampler
state...), plus ``"rng"`` from :func:`capture_rng_state` unless the dict has one. It is
written under a temporary name, flushed to disk and renamed, so a crash never leaves a
torn file under a checkpoint's name; older ones beyond ``keep_last`` are then removed.

Everything saved loads back with ``torch.load(weights_only=True)`` (the RNG states are
stored as tensors and plain values), so loading never runs pickled code.
"""
from __future__ import annotations

import io
import os
import random
import re
from typing import Any

import numpy as np
import torch

from storage.fs import filesystem_for, tmp_name
from storage.locks import pid_alive

_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step-{int(step):09d}.pt"


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states, as weights_only-loadable values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the states :func:`capture_rng_state` took."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": nps["key"].numpy().astype(np.uint32), "pos": nps["pos"]},
                         "has_gauss": nps["has_gauss"], "gauss": nps["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, str]]:
    """``(step, path)`` of every whole checkpoint in ``directory``, by step."""
    fs, path = filesystem_for(directory)
    found = []
    for name in fs.listdir(path):
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), fs.url(fs.join(path, name))))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> str | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict[str, Any], *,
                    keep_last: int | None = 3) -> str:
    """Save ``state`` as checkpoint ``step`` atomically; keep the last ``keep_last`` (None:
    all). Returns the checkpoint's path."""
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, not {keep_last}")
    fs, path = filesystem_for(directory)
    fs.makedirs(path)
    if "rng" not in state:
        state = {**state, "rng": capture_rng_state()}
    final = fs.join(path, checkpoint_name(step))
    if fs.is_local:
        tmp = tmp_name(final)
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            fs.remove(tmp)
            raise
    else:
        buf = io.BytesIO()
        torch.save(state, buf)
        fs.write_atomic(final, buf.getvalue())
    for name in fs.listdir(path):              # partial files of killed saves
        if name.startswith("step-") and ".pt.tmp-" in name and name != os.path.basename(final):
            pid = name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                fs.remove(fs.join(path, name))
    if keep_last is not None:
        for _, old in list_checkpoints(directory)[:-keep_last]:
            fs.remove(filesystem_for(old)[1])
    return fs.url(final)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    weights_only: bool = True) -> dict[str, Any]:
    """A checkpoint's dict (tensors on ``map_location``)."""
    fs, p = filesystem_for(path)
    if fs.is_local:
        return torch.load(p, map_location=map_location, weights_only=weights_only)
    return torch.load(io.BytesIO(fs.read_bytes(p)), map_location=map_location,
                      weights_only=weights_only)
