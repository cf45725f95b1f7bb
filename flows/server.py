"""The Prefect server a command reports to: the one of PREFECT_API_URL, or a temporary one
that lives exactly as long as the command.

Prefect starts its temporary server lazily, from whichever thread first needs the API, as a
child process that a killed command leaves behind (an orphaned uvicorn holding a port and a
SQLite database). :func:`prefect_server` starts it up front instead, from the calling thread,
with the kernel asked to kill it when that thread's process dies (``prctl(PR_SET_PDEATHSIG)``,
Linux), and points this process's Prefect settings at it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator
from unittest import mock

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``Popen(preexec_fn=...)``: the child gets SIGKILL when its parent dies (Linux; a no-op
    elsewhere)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


@contextmanager
def prefect_server(say=lambda msg: print(msg, file=sys.stderr)) -> Iterator[str]:
    """Yield the API URL this command's flows report to (see the module docstring). The
    temporary server's start-up timeout is PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS."""
    from prefect.server.api import server as server_module
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    url = get_current_settings().api.url
    if url:
        say(f"cot2align: Prefect server {url} (PREFECT_API_URL)")
        yield url
        return
    timeout = int(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 120)))
    say(f"cot2align: no PREFECT_API_URL: starting a temporary Prefect server for this command "
        f"(start-up timeout {timeout} s; it ends with the command, even a killed one); set "
        "PREFECT_API_URL to use a running one")
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        kwargs.setdefault("preexec_fn", die_with_parent)
        return real_popen(*args, **kwargs)

    server = server_module.SubprocessASGIServer()
    with mock.patch.object(server_module.subprocess, "Popen", popen):
        server.start(timeout=timeout)
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                _drain_logs()
    finally:
        server.stop()


def _drain_logs(timeout: float = 10.0) -> None:
    """Send the run logs still queued for the API while the server is up: after it stops,
    Prefect's log worker would print "Error logging to API" at exit."""
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=timeout, at_exit=False)
    except Exception:  # best effort: the logs are also on the console
        pass
