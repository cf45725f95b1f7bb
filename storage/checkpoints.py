"""Training checkpoints: atomic saves, the last N kept, a best state, loading that runs no code.

:class:`CheckpointDir` is the store's implementation of the training loop's checkpointer
(``cot2align_core.training.Checkpointer``). Its folder holds:

- ``step-<step, 9 digits>.pt``: one ``torch.save`` file per checkpoint, holding the dict the
  training loop gives (model / optimizer / scheduler state dicts, sampler position, history...)
  plus ``"rng"`` from :func:`capture_rng_state`; the newest ``keep_last`` are kept;
- ``best.pt``: the best state so far (e.g. the weights with the best dev metric), never rotated;
- ``<name>.tmp-<pid>``: a save in progress. Every file is written under such a temporary name,
  flushed to disk and renamed, so a crash never leaves a torn file under a checkpoint's name; a
  temporary file whose writer is dead is removed by the next save, and a failed save (disk
  full, I/O error) removes its own and raises :class:`CheckpointWriteError`.

Everything saved loads back with ``torch.load(weights_only=True)`` (the RNG states are stored
as tensors and plain values), and nothing is ever loaded otherwise: a file that needs pickled
code to load (a planted pickle, a file not written by cot2align) is refused with
:class:`UnsafeCheckpointError`, so a store that others can write to cannot make a resuming
machine run code.
"""
from __future__ import annotations

import io
import os
import pickle
import random
import re
from typing import Any, Mapping

import numpy as np
import torch

from storage.errors import StoreError
from storage.fs import LocalFS, filesystem_for, tmp_name
from storage.locks import pid_alive

_NAME = re.compile(r"^step-(\d+)\.pt$")
BEST_NAME = "best.pt"


class UnsafeCheckpointError(StoreError):
    """A checkpoint file that cannot be loaded without running pickled code."""


class CheckpointWriteError(StoreError):
    """A checkpoint could not be written (disk full, I/O error); its temporary file is gone."""


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


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write: torch reports a failed file write as a RuntimeError
    ("unexpected pos") whose context is the OSError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write(fs: LocalFS, final: str, state: Mapping[str, Any]) -> None:
    """``torch.save(state)`` to ``final`` through a temporary file and a rename.

    A write that fails with an I/O error (disk full...) removes the temporary file and raises
    :class:`CheckpointWriteError` naming the path and the fix.
    """
    tmp = tmp_name(final)
    try:
        if fs.is_local:
            with open(tmp, "wb") as f:
                torch.save(dict(state), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(os.path.dirname(final))
        else:
            buf = io.BytesIO()
            torch.save(dict(state), buf)
            fs.write_atomic(final, buf.getvalue())
    except BaseException as exc:
        fs.remove(tmp)
        cause = _os_error(exc)
        if cause is None:
            raise
        reason = cause.strerror or str(cause)
        raise CheckpointWriteError(
            f"could not write checkpoint {fs.url(final)}: {reason} (errno {cause.errno}); the "
            "partial file was removed. Free space on that disk, or run with a store on another "
            "disk; the run resumes from its previous checkpoint") from exc


def _sweep_dead_tmp(fs: LocalFS, path: str) -> None:
    """Remove the temporary files of saves whose process is dead (killed mid-save)."""
    for name in fs.listdir(path):
        if ".pt.tmp-" in name:
            pid = name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                fs.remove(fs.join(path, name))


def save_checkpoint(directory: str | os.PathLike, step: int, state: Mapping[str, Any], *,
                    keep_last: int | None = 3) -> str:
    """Save ``state`` (plus ``"rng"``, :func:`capture_rng_state`, unless it has one) as
    checkpoint ``step`` atomically; keep the last ``keep_last`` (None: all). Returns the
    checkpoint's path. Raises :class:`CheckpointWriteError` on a failed write."""
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, not {keep_last}")
    fs, path = filesystem_for(directory)
    fs.makedirs(path)
    if "rng" not in state:
        state = {**state, "rng": capture_rng_state()}
    final = fs.join(path, checkpoint_name(step))
    _write(fs, final, state)
    _sweep_dead_tmp(fs, path)
    if keep_last is not None:
        for _, old in list_checkpoints(directory)[:-keep_last]:
            fs.remove(filesystem_for(old)[1])
    return fs.url(final)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint's dict (tensors on ``map_location``), loaded with ``weights_only=True``.

    Raises :class:`UnsafeCheckpointError` for a file that would need pickled code (never
    written by cot2align), :class:`StoreError` for a damaged one; both name the file and say
    to delete it.
    """
    fs, p = filesystem_for(path)
    url = fs.url(p)
    try:
        source = p if fs.is_local else io.BytesIO(fs.read_bytes(p))
        return torch.load(source, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        message = str(exc)
        if isinstance(exc, RuntimeError) and "PytorchStreamReader" not in message:
            raise
        if "Weights only load failed" not in message:
            raise StoreError(
                f"checkpoint {url} is damaged and cannot be read ({message.splitlines()[0]}): "
                f"delete it (rm {url}) and run again, training resumes from the previous "
                "checkpoint or from step 0") from exc
        lines = [ln.strip() for ln in message.splitlines()]
        reason = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint {url}: it holds pickled objects that only load by "
            f"running code{f' ({reason})' if reason else ''}. cot2align never writes such a "
            "file, so it did not come from a training run: do not load it with "
            f"weights_only=False; delete it (rm {url}) and run again, training resumes from "
            "the previous checkpoint or from step 0") from exc


class CheckpointDir:
    """The checkpoints of one training run in ``directory`` (a local path or fsspec URL).

    Implements ``cot2align_core.training.Checkpointer``: :meth:`save` / :meth:`restore` the
    loop's state with the global RNG states, :meth:`save_best` / :meth:`load_best` the best
    state, :meth:`remove_all`. ``keep_last``: checkpoints kept by :meth:`save` (None: all).
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int | None = 2) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, not {keep_last}")
        self.directory = os.fspath(directory)
        self.keep_last = keep_last

    def __repr__(self) -> str:
        return f"CheckpointDir({self.directory!r}, keep_last={self.keep_last})"

    def steps(self) -> list[int]:
        """Steps of the checkpoints on disk, oldest first."""
        return [s for s, _ in list_checkpoints(self.directory)]

    def save(self, step: int, state: Mapping[str, Any]) -> str:
        """Save ``state`` and the current RNG states as checkpoint ``step``; rotate."""
        return save_checkpoint(self.directory, step, state, keep_last=self.keep_last)

    def restore(self) -> tuple[int, dict[str, Any]] | None:
        """Load the newest checkpoint and put back the RNG states saved with it:
        ``(step, state)``, or None when there is none."""
        found = list_checkpoints(self.directory)
        if not found:
            return None
        step, path = found[-1]
        state = load_checkpoint(path)
        restore_rng_state(state["rng"])
        return step, state

    def save_best(self, step: int, state: Mapping[str, Any]) -> str:
        """Replace the best state (atomically) by ``state``, reached at ``step``."""
        fs, path = filesystem_for(self.directory)
        fs.makedirs(path)
        best = fs.join(path, BEST_NAME)
        _write(fs, best, {**state, "step": int(step)})
        return fs.url(best)

    def load_best(self) -> tuple[int, dict[str, Any]] | None:
        """``(step, state)`` of the best state, or None when none was saved."""
        fs, path = filesystem_for(self.directory)
        best = fs.join(path, BEST_NAME)
        if not fs.exists(best):
            return None
        state = load_checkpoint(fs.url(best))
        return int(state.pop("step")), state

    def remove_all(self) -> None:
        """Delete the folder: every checkpoint, the best state, temporary files."""
        fs, path = filesystem_for(self.directory)
        fs.rmtree(path)
