"""A per-artifact writer lock: a file created with O_EXCL that names its holder.

The lock file holds ``{"pid", "host", "time", "token"}``. A second writer that finds it:

- takes it over when the holder ran on this host and its pid is gone (a crashed or killed
  run): the takeover itself is serialised by an ``flock`` on a side file on local stores, so
  two waiters cannot both remove the stale lock and each believe they hold the new one;
- otherwise waits, polling, up to ``timeout`` seconds and then raises
  :class:`~storage.errors.ArtifactLockedError` naming the artifact and the holder.

A lock held by a process on another host cannot be checked for liveness; if that host is gone
the message says which file to remove.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

from storage.errors import ArtifactLockedError
from storage.fs import LocalFS

LOCK_NAME = ".lock"


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


@contextmanager
def _flock(path: str) -> Iterator[None]:
    import fcntl

    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class ArtifactLock:
    """The lock of one artifact folder; ``acquire()`` / ``release()`` or a ``with`` block."""

    def __init__(self, fs: LocalFS, artifact_dir: str, label: str, timeout: float = 600.0,
                 poll: float = 0.2) -> None:
        self.fs = fs
        self.dir = artifact_dir
        self.path = fs.join(artifact_dir, LOCK_NAME)
        self.label = label
        self.timeout = timeout
        self.poll = poll
        self.token: str | None = None
        self.took_over: dict[str, Any] | None = None

    def holder(self) -> dict[str, Any] | None:
        """The current holder's record, or None when unlocked (or unreadable)."""
        try:
            return json.loads(self.fs.read_bytes(self.path).decode("utf-8"))
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None

    def is_stale(self, info: dict[str, Any] | None) -> bool:
        if info is None:
            # Created but not yet written, or garbage: stale once it is a few seconds old.
            try:
                return time.time() - self.fs.mtime(self.path) > 5.0
            except FileNotFoundError:
                return False
        return info.get("host") == socket.gethostname() and not pid_alive(int(info.get("pid", -1)))

    def live_holder(self) -> dict[str, Any] | None:
        """The holder's record when the lock is held by a live (or unverifiable) writer."""
        if not self.fs.exists(self.path):
            return None
        info = self.holder()
        return None if self.is_stale(info) else (info or {"pid": None, "host": None})

    def _take_over(self, seen: dict[str, Any] | None) -> None:
        def remove_if_unchanged() -> None:
            if self.holder() == seen and self.is_stale(seen):
                self.fs.remove(self.path)
                self.took_over = seen or {}

        if self.fs.is_local:
            with _flock(self.path + ".takeover"):
                remove_if_unchanged()
        else:
            remove_if_unchanged()

    def acquire(self) -> None:
        token = uuid.uuid4().hex
        payload = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "time": time.time(), "token": token}).encode("utf-8")
        deadline = time.monotonic() + self.timeout
        while True:
            self.fs.makedirs(self.dir)
            if self.fs.create_exclusive(self.path, payload):
                self.token = token
                return
            info = self.holder()
            if self.is_stale(info):
                self._take_over(info)
                continue
            if time.monotonic() >= deadline:
                raise ArtifactLockedError(self._locked_message(info))
            time.sleep(self.poll)

    def _locked_message(self, info: dict[str, Any] | None) -> str:
        if info is None:
            who = "an unknown holder"
        else:
            age = time.time() - float(info.get("time", time.time()))
            who = f"pid {info.get('pid')} on host {info.get('host')} (since {age:.0f} s)"
        return (f"artifact {self.label} is being written by {who}; waited {self.timeout:g} s. "
                f"Wait for that run to finish, or if it is gone (e.g. its host died), remove "
                f"the lock file {self.fs.url(self.path)} and retry.")

    def release(self) -> None:
        if self.token is None:
            return
        info = self.holder()
        if info is not None and info.get("token") == self.token:
            self.fs.remove(self.path)
        self.token = None

    def __enter__(self) -> "ArtifactLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
