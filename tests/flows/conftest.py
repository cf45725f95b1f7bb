"""Pipeline fixtures: one Prefect test server for the session and a tiny config.

The server is Prefect's own (``prefect_test_harness`` starts a real temporary server with a
SQLite database); subprocesses started by tests (crash tests) talk to it through
PREFECT_API_URL, so they do not pay for a server of their own.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def prefect_api_url(tmp_path_factory):
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    # Start with the process's real streams: Prefect's console log handler keeps the stream it
    # was created with, and a test's capsys stream is closed when that test ends.
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    try:
        harness = prefect_test_harness(server_startup_timeout=120)
        harness.__enter__()
        from prefect.logging.configuration import setup_logging

        setup_logging(incremental=False)
    finally:
        sys.stdout, sys.stderr = saved
    try:
        yield str(get_current_settings().api.url)
    finally:
        harness.__exit__(None, None, None)


def tiny_config_dict(store: Path) -> dict:
    """The demo config shrunk to seconds: same stages, same models' shapes, tiny budgets."""
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["name"] = "tiny"
    cfg["store"] = str(store)
    cfg["data"]["demo"].update(n_train=48, n_eval=6)
    cfg["teacher_sft"]["training"].update(steps=30, batch_size=16, checkpoint_every=10)
    cfg["generate"].update(shard_size=16, max_tokens=24, filter_correct=False)
    cfg["tokenize"]["shard_size"] = 32
    cfg["cache_teacher"].update(batch_size=16)
    cfg["distill"]["training"].update(steps=6, batch_size=8, checkpoint_every=2)
    cfg["distill"]["students"] = {"sft": cfg["distill"]["students"]["sft"]}  # one baseline
    cfg["evaluate"].update(seeds=[0, 1], max_rows=4, max_tokens=16, backend="hf")
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_run(prefect_api_url, tmp_path_factory):
    """The tiny pipeline, run once for the session: (config path, results, store)."""
    from flows.pipeline import pipeline_flow

    root = tmp_path_factory.mktemp("tiny")
    config = write_config(root / "tiny.yaml", tiny_config_dict(root / "store"))
    results = pipeline_flow(str(config))
    return config, results, root / "store"


def run_cli(args: list[str], api_url: str, env: dict | None = None, timeout: int = 600):
    """``python -m flows.cli ARGS`` in a subprocess against the session's Prefect server."""
    full_env = {**os.environ, "PREFECT_API_URL": api_url, "OMP_NUM_THREADS": "1",
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
