"""Run records: which artifacts each run of each config uses, written when the run starts.

A record lies at ``<root>/_runs/<name>-<scope>-<key>.json``; ``key`` hashes the config
file's absolute path, its ``name:``, the scope (``"run"`` for a pipeline run,
``"stage:<stage>"`` for ``cot2align stage``) and the command-line overrides, so two config
files with the same ``name:``, a ``--set`` variant and a single-stage run each keep their own
record; the next run with the same key replaces it. A record holds::

    config_name, config_path, scope, overrides, key
    artifacts     {stage instance key, e.g. distill[sft,seed=0]: fingerprint} the run plans to use (all of them,
                  from its start: gc keeps them while upstream stages are reused)
    status        "running" | "ok" | "failed"
    started, heartbeat, finished     unix times
    pid, host, machine

``gc`` keeps every artifact any record names, whatever its status; a record is dropped by
deleting its file. While a run is open its record's heartbeat is refreshed by a background
thread (``live`` in :func:`read_runs` tells a running record from one whose process died:
no heartbeat for ``RUN_STALE_AFTER_S``, or, on this machine, its pid is gone).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
from typing import Any, Sequence

from storage.errors import StoreError
from storage.fingerprint import canonical_json
from storage.fs import LocalFS, is_tmp_name
from storage.locks import machine_id, pid_alive

RUNS_DIR = "_runs"
RUN_HEARTBEAT_S = 30.0
RUN_STALE_AFTER_S = 120.0


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "_"


def run_key(config_path: str | None, config_name: str, scope: str,
            overrides: Sequence[str]) -> str:
    """12 hex digits naming one (config file, name, scope, overrides)."""
    blob = canonical_json([config_path, config_name, scope, list(overrides)])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


class RunRecord:
    """An open run's record; use as a context manager (``finish`` on exit), or call
    :meth:`heartbeat` and :meth:`finish` by hand."""

    def __init__(self, fs: LocalFS, path: str, data: dict[str, Any],
                 heartbeat_every: float = RUN_HEARTBEAT_S) -> None:
        self.fs, self.path, self.data = fs, path, data
        self.heartbeat_every = heartbeat_every
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.fs.url(self.path)

    def _write(self) -> None:
        try:
            self.fs.write_atomic(self.path, json.dumps(self.data, indent=2,
                                                       sort_keys=True).encode("utf-8"))
        except OSError as e:
            raise StoreError(f"cannot write the run record {self.url} ({e.strerror or e}): "
                             "the store must be writable to run stages") from e

    def heartbeat(self) -> None:
        self.data["heartbeat"] = time.time()
        self._write()

    def set_artifacts(self, fingerprints: dict[str, str]) -> None:
        """Replace the fingerprints the run uses (e.g. once a stage's were resolved)."""
        self.data["artifacts"] = dict(fingerprints)
        self._write()

    def finish(self, status: str = "ok") -> None:
        """Mark the run ``status`` ("ok" or "failed"); its artifacts stay named for gc."""
        self._stop.set()
        if self._beater is not None and self._beater is not threading.current_thread():
            self._beater.join()
        self.data.update(status=status, finished=time.time(), heartbeat=time.time())
        self._write()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            try:
                self.heartbeat()
            except StoreError:
                pass                        # the next beat tries again

    def __enter__(self) -> "RunRecord":
        self._beater = threading.Thread(target=self._beat, daemon=True,
                                        name=f"run-heartbeat {self.data['config_name']}")
        self._beater.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("ok" if exc_type is None else "failed")


def begin_run(fs: LocalFS, root: str, config_path: str | os.PathLike | None, config_name: str,
              fingerprints: dict[str, str], *, scope: str = "run",
              overrides: Sequence[str] = ()) -> RunRecord:
    """Write the record of a run that starts now (see the module doc) and return it."""
    path_text = None if config_path is None else os.path.abspath(os.fspath(config_path))
    key = run_key(path_text, config_name, scope, overrides)
    runs = fs.join(root, RUNS_DIR)
    now = time.time()
    data = {"config_name": config_name, "config_path": path_text, "scope": scope,
            "overrides": list(overrides), "key": key, "artifacts": dict(fingerprints),
            "status": "running", "started": now, "heartbeat": now, "finished": None,
            "pid": os.getpid(), "host": socket.gethostname(), "machine": machine_id()}
    try:
        fs.makedirs(runs)
    except OSError as e:
        raise StoreError(f"cannot create {fs.url(runs)} ({e.strerror or e}): the store must "
                         "be writable to run stages") from e
    record = RunRecord(fs, fs.join(runs, f"{_safe(config_name)}-{_safe(scope)}-{key}.json"),
                       data)
    record._write()
    return record


def read_runs(fs: LocalFS, root: str) -> dict[str, dict[str, Any]]:
    """Every readable record, by file name without ``.json``; each gains ``live``: running
    with a recent heartbeat. Records of the old format (``{config, time, artifacts}``) are
    read too."""
    out = {}
    runs = fs.join(root, RUNS_DIR)
    now = time.time()
    for name in fs.listdir(runs):
        if not name.endswith(".json") or is_tmp_name(name):
            continue
        try:
            rec = json.loads(fs.read_bytes(fs.join(runs, name)))
        except (ValueError, OSError):
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("artifacts"), dict):
            continue
        rec.setdefault("config_name", rec.get("config", name[:-5]))
        rec.setdefault("scope", "run")
        rec.setdefault("status", "ok")
        rec["live"] = _live(rec, now)
        out[name[:-5]] = rec
    return out


def _live(rec: dict[str, Any], now: float) -> bool:
    """Running, with a recent heartbeat, and (on this machine) its process still there."""
    if rec["status"] != "running" or now - float(rec.get("heartbeat") or 0) > RUN_STALE_AFTER_S:
        return False
    return rec.get("machine") != machine_id() or pid_alive(int(rec.get("pid") or -1))
