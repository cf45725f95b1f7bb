"""A per-artifact writer lock: a file created with O_EXCL that names its holder and beats.

The lock file holds ``{"pid", "host", "machine", "time", "heartbeat", "token"}``. While held,
a background thread refreshes it every ``heartbeat_every`` seconds (touching its mtime on a
local store, rewriting ``heartbeat`` on an fsspec one). A second writer that finds it:

- takes it over when it is stale: its last heartbeat is older than ``stale_after`` seconds,
  whatever host or pid it names (a container restart changes the hostname; a pid may be
  reused), or it was written on this machine (same boot and pid namespace) by a pid that is
  gone, which needs no wait. The takeover is serialised by an ``flock`` on the artifact
  folder on local stores, so two waiters cannot both remove the stale lock and each believe
  they hold the new one; it is logged (logger ``cot2align``) as "took over stale lock held by
  <host> pid <pid> (last heartbeat N s ago)";
- otherwise waits, polling, logging who holds the lock every ``log_every`` seconds, up to
  ``timeout`` seconds (None: as long as the holder's heartbeat goes on), and then raises
  :class:`~storage.errors.ArtifactLockedError` naming the artifact and the holder.

Heartbeats compare clocks: the bound assumes the hosts sharing a store agree on the time to
well within ``stale_after``.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

from storage.errors import ArtifactLockedError
from storage.fs import LocalFS

LOCK_NAME = ".lock"
TAKEOVER_NAME = LOCK_NAME + ".takeover"     # left by older versions; removed when tidying
STALE_AFTER_S = 60.0
HEARTBEAT_EVERY_S = 5.0
LOG_EVERY_S = 30.0
log = logging.getLogger("cot2align")


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


@functools.lru_cache(maxsize=1)
def machine_id() -> str:
    """This boot of this machine and this pid namespace: pids are comparable only within it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


@contextmanager
def _flock(folder: str) -> Iterator[None]:
    """An exclusive ``flock`` on the folder itself (no side file to leave behind)."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class ArtifactLock:
    """The lock of one artifact folder; ``acquire()`` / ``release()`` or a ``with`` block."""

    def __init__(self, fs: LocalFS, artifact_dir: str, label: str,
                 timeout: float | None = 600.0, poll: float = 0.2, *,
                 stale_after: float = STALE_AFTER_S, heartbeat_every: float = HEARTBEAT_EVERY_S,
                 log_every: float = LOG_EVERY_S) -> None:
        self.fs = fs
        self.dir = artifact_dir
        self.path = fs.join(artifact_dir, LOCK_NAME)
        self.label = label
        self.timeout = timeout
        self.poll = poll
        self.stale_after = stale_after
        self.heartbeat_every = heartbeat_every
        self.log_every = log_every
        self.token: str | None = None
        self.took_over: dict[str, Any] | None = None
        self.lost = False                # set when the heartbeat finds another holder's token
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    # Who holds it ----------------------------------------------------------------------
    def holder(self) -> dict[str, Any] | None:
        """The current holder's record, or None when unlocked (or unreadable)."""
        try:
            info = json.loads(self.fs.read_bytes(self.path).decode("utf-8"))
            return info if isinstance(info, dict) else None
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None

    def heartbeat_age(self, info: dict[str, Any] | None) -> float:
        """Seconds since the holder's last sign of life (its record or the file's mtime)."""
        stamps = []
        if info is not None:
            for key in ("heartbeat", "time"):
                try:
                    stamps.append(float(info[key]))
                except (KeyError, TypeError, ValueError):
                    pass
        try:
            stamps.append(self.fs.mtime(self.path))
        except (FileNotFoundError, OSError):
            pass
        return time.time() - max(stamps) if stamps else float("inf")

    def is_stale(self, info: dict[str, Any] | None) -> bool:
        if not self.fs.exists(self.path):
            return False
        if info is None:
            # Created but not yet written, or garbage: stale once it is a few seconds old.
            return self.heartbeat_age(None) > 5.0
        if self.heartbeat_age(info) > self.stale_after:
            return True
        here = (info.get("machine") == machine_id() if "machine" in info
                else info.get("host") == socket.gethostname())
        try:
            return here and not pid_alive(int(info.get("pid", -1)))
        except (TypeError, ValueError):
            return False

    def live_holder(self) -> dict[str, Any] | None:
        """The holder's record when the lock is held by a live writer."""
        if not self.fs.exists(self.path):
            return None
        info = self.holder()
        return None if self.is_stale(info) else (info or {"pid": None, "host": None})

    def _describe(self, info: dict[str, Any] | None) -> str:
        if info is None:
            return "an unknown holder"
        return (f"{info.get('host')} pid {info.get('pid')} (last heartbeat "
                f"{self.heartbeat_age(info):.0f} s ago)")

    # Taking it -------------------------------------------------------------------------
    def _take_over(self, seen: dict[str, Any] | None) -> None:
        def remove_if_unchanged() -> None:
            if self.holder() == seen and self.is_stale(seen):
                described = self._describe(seen)
                self.fs.remove(self.path)
                self.took_over = seen or {}
                log.warning("took over stale lock held by %s on %s", described, self.label)

        if self.fs.is_local:
            with _flock(self.dir):
                remove_if_unchanged()
        else:
            remove_if_unchanged()

    def acquire(self) -> None:
        token = uuid.uuid4().hex
        now = time.time()
        payload = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "machine": machine_id(), "time": now, "heartbeat": now,
                              "token": token}).encode("utf-8")
        start = time.monotonic()
        next_log = start + self.log_every
        while True:
            self.fs.makedirs(self.dir)
            if self.fs.create_exclusive(self.path, payload):
                self.token = token
                self._start_heartbeat()
                return
            info = self.holder()
            if self.is_stale(info):
                self._take_over(info)
                continue
            waited = time.monotonic() - start
            if self.timeout is not None and waited >= self.timeout:
                raise ArtifactLockedError(self._locked_message(info))
            if time.monotonic() >= next_log:
                log.info("waiting %.0f s for the lock of %s, held by %s", waited, self.label,
                         self._describe(info))
                next_log += self.log_every
            time.sleep(self.poll)

    def _locked_message(self, info: dict[str, Any] | None) -> str:
        return (f"artifact {self.label} is being written by {self._describe(info)}; waited "
                f"{self.timeout:g} s. Wait for that run to finish; a holder that stops "
                f"refreshing the lock is taken over {self.stale_after:g} s after its last "
                f"heartbeat (lock file {self.fs.url(self.path)}).")

    # Keeping it ------------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self.lost = False
        self._beater = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.label}",
                                        daemon=True)
        self._beater.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Refresh the lock now (the background thread does it every ``heartbeat_every`` s)."""
        info = self.holder()
        if self.token is None or info is None or info.get("token") != self.token:
            self.lost = self.token is not None
            self._stop.set()
            if self.lost:
                log.error("lost the lock of %s: it was taken over (this process stopped "
                          "refreshing it for over %g s)", self.label, self.stale_after)
            return
        try:
            if self.fs.is_local:
                os.utime(self.path)
            else:
                self.fs.write_atomic(self.path, json.dumps(
                    {**info, "heartbeat": time.time()}).encode("utf-8"))
        except OSError as e:  # a transient error: the next beat tries again
            log.warning("could not refresh the lock %s: %s", self.fs.url(self.path), e)

    def release(self) -> None:
        self._stop.set()
        if self._beater is not None and self._beater is not threading.current_thread():
            self._beater.join()
        self._beater = None
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
