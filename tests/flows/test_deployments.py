"""prefect.yaml: every deployment's entrypoint loads as a Prefect flow, the pipeline runs on a
cron schedule, and every stage has its own deployment."""
from __future__ import annotations

import yaml
from prefect.flows import Flow, load_flow_from_entrypoint

from tasks.registry import STAGE_NAMES
from tests.flows.conftest import REPO


def test_every_deployment_entrypoint_is_a_flow_and_the_pipeline_is_scheduled(monkeypatch):
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"nightly", *STAGE_NAMES}
    for name, d in deployments.items():
        flow = load_flow_from_entrypoint(d["entrypoint"])
        assert isinstance(flow, Flow), name
        assert "config_path" in flow.parameters.properties
        assert (REPO / d["parameters"]["config_path"]).is_file()
        assert d["work_pool"]["name"] == "cot2align-process"
    assert deployments["nightly"]["schedules"][0]["cron"]
    assert load_flow_from_entrypoint(deployments["distill"]["entrypoint"]).name == "cot2align-distill"
