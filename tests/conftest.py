"""Fixtures shared by the whole suite.

Assets beside the project (../shared: the Dolly split, the paper's real tokenizers) are found
through the COT2ALIGN_SHARED environment variable or the ../shared path next to the repository;
tests that need them skip with the reason when they are absent. They are never copied here.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Small CPU machines: no oversubscription between pytest and torch's thread pool.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def shared_root() -> Path | None:
    env = os.environ.get("COT2ALIGN_SHARED")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared"]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    root = shared_root()
    if root is None:
        pytest.skip("shared assets not found: set COT2ALIGN_SHARED or place them at ../shared")
    return root


@pytest.fixture(scope="session")
def shared_tokenizer_dir(shared_dir):
    def get(name: str) -> Path:
        path = shared_dir / "tokenizers" / name
        if not path.is_dir():
            pytest.skip(f"tokenizer {name!r} not found under {shared_dir / 'tokenizers'}")
        return path

    return get


@pytest.fixture(scope="session")
def dolly_dir(shared_dir) -> Path:
    path = shared_dir / "data" / "dolly"
    if not (path / "dev.jsonl").is_file():
        pytest.skip(f"Dolly split not found under {path}")
    return path


def pytest_configure(config):
    # rouge_score imports absl.logging, which puts a handler on the root logger bound to the
    # sys.stderr of the moment; imported inside a test that captures output, that stream is
    # closed after the test and every later log record fails. Import it once, up front.
    import rouge_score.rouge_scorer  # noqa: F401

    # One intra-op thread: tiny models run faster without thread hand-offs, results do not
    # depend on the machine's core count, and subprocesses get OMP_NUM_THREADS=1 to match.
    import torch

    torch.set_num_threads(1)
