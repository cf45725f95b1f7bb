"""A tiny pipeline store built by calling every stage task's function directly: no Prefect
server, no flow. Shard tasks run as plain functions outside a flow run
(:func:`tasks.stage.run_shard`); generation uses transformers (vLLM is the flows' business)."""
from __future__ import annotations

from pathlib import Path

import pytest

from cot2align_core.config import parse_config, read_config_data
from tests.flows.conftest import REPO, tiny_config_dict


@pytest.fixture(scope="session")
def task_cfg(tmp_path_factory):
    raw = tiny_config_dict(tmp_path_factory.mktemp("task-store") / "store")
    raw["generate"]["backend"] = "hf"
    # Every student of the paper-table grid (KD bases alone and with CoT2Align, ablations):
    # each must resolve, train and be evaluated.
    grid = read_config_data(REPO / "configs" / "paper_table_demo.yaml")
    raw["distill"]["students"] = grid["distill"]["students"]
    # Its main student is the paper's objective (all three pairs, balanced), as in the grid.
    raw["distill"]["objective"]["ot"].update(grid["distill"]["objective"]["ot"])
    raw["evaluate"].update(seeds=[0], decoding=["greedy", "sampled"], max_rows=3, max_tokens=8)
    raw["distill"]["selection"] = {"every": 3, "max_rows": 4, "max_tokens": 8}
    return parse_config(raw)


@pytest.fixture(scope="session")
def task_store(task_cfg):
    """(config, {key: StageRef}) of every stage instance, run in the registry's order."""
    from tasks.registry import STAGES, instances, plan, upstream_keys

    fps = plan(task_cfg)
    refs = {}
    for stage in STAGES:
        for key in instances(task_cfg, stage):
            ups = {str(u): refs[str(u)] for u in upstream_keys(task_cfg, key)}
            refs[str(key)] = stage.load_task().fn(task_cfg, key, fps[key], ups)
    return task_cfg, refs


def artifact(ref):
    from storage.store import open_artifact

    return open_artifact(Path(ref.path))
