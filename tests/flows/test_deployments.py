"""prefect.yaml and the deployment machinery, without a server: every deployment loads as a
flow and matches the stage registry (pool by resource kind, description, tags, CPU defaults,
code pulled by git_clone), stage tasks are named, tagged and retried as intended, SIGTERM
inside a training loop waits for the step boundary, and the worker finds the processes it must
stop. ``test_deployed.py`` runs all of it against a real server."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import cloudpickle
import pytest
import yaml
from prefect.exceptions import TerminationSignal
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.states import Failed

from cot2align_core.config import ConfigError, load_config
from cot2align_core.data import DataError
from flows.deployments import CPU_POOL, GPU_POOL, pool_of
from flows.pipeline import retry_crash_types, stage_task
from flows.worker import descendants, flow_run_id_of
from storage.errors import ArtifactLockedError
from tasks.common import StageError
from tasks.registry import STAGE_NAMES, StageKey, spec
from tasks.stage import stop_at_step_boundary
from tests.flows.conftest import REPO


def deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}


def test_every_deployment_loads_and_matches_the_registry(monkeypatch):
    monkeypatch.chdir(REPO)
    deps = deployments()
    assert set(deps) == {"nightly", *STAGE_NAMES}
    for name, d in deps.items():
        flow = load_flow_from_entrypoint(d["entrypoint"])
        assert isinstance(flow, Flow), name
        expected = {"config_path", "overrides", "force", "store"}
        expected |= set() if name == "nightly" else {"student"}  # stage flows: one student
        assert set(flow.parameters.properties) == expected, name
        assert all(p["description"] for p in flow.parameters.properties.values()), name
        assert d["parameters"]["store"] == "{{ $COT2ALIGN_STORE }}"
        cfg = load_config(REPO / d["parameters"]["config_path"])
        assert cfg.name == "demo"  # the embedded demo: runs on a CPU, needs no files
        assert "cot2align" in d["tags"]
        if name != "nightly":
            stage = spec(name)
            assert flow.name == f"cot2align-{name}"
            assert flow.description.startswith(stage.description) and "description" not in d
            assert d["work_pool"]["name"] == pool_of(stage)
            assert {f"stage:{name}", "gpu" if stage.gpu else "cpu"} <= set(d["tags"])
    assert {pool_of(spec(n)) for n in STAGE_NAMES} == {CPU_POOL, GPU_POOL}
    nightly = deps["nightly"]
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    assert nightly["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert nightly["work_pool"]["name"] == GPU_POOL


def test_workers_get_the_code_by_git_clone_not_by_the_deploying_machines_path():
    spec_ = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (step,) = spec_["pull"]
    assert step == {"prefect.deployments.steps.git_clone": {
        "repository": "{{ $COT2ALIGN_REPO }}", "branch": "{{ $COT2ALIGN_BRANCH }}"}}
    assert "$PWD" not in (REPO / "prefect.yaml").read_text().split("deployments:", 1)[1]


def test_stage_tasks_are_named_by_instance_tagged_and_bounded():
    distill = stage_task(spec("distill"))
    assert distill.task_run_name.format(key=StageKey("distill", "sft", 0)) == "distill[sft,seed=0]"
    assert set(distill.tags) == {"cot2align", "stage:distill", "gpu"}
    prepare = stage_task(spec("prepare"))
    assert set(prepare.tags) == {"cot2align", "stage:prepare"}
    assert prepare.retries == 2 and prepare.timeout_seconds == 24 * 3600
    assert prepare.retry_condition_fn is retry_crash_types
    # distill.parallel > 1 ships the task to worker processes.
    assert cloudpickle.loads(cloudpickle.dumps(distill)).name == "distill"


@pytest.mark.parametrize("exc, retried", [
    (OSError("connection reset"), True), (TimeoutError("stage timed out"), True),
    (RuntimeError("CUDA error: an illegal memory access"), True), (MemoryError(), True),
    (StageError("needs the generate artifact"), False), (ConfigError("bad key"), False),
    (DataError("line 3: empty output"), False), (FileNotFoundError("model"), False),
    (ArtifactLockedError("held by pid 7"), False), (ValueError("bug"), False),
    (FloatingPointError("loss is nan"), False)])
def test_only_crash_type_errors_are_retried(exc, retried):
    assert retry_crash_types(None, None, Failed(data=exc)) is retried


def test_sigterm_in_a_training_loop_stops_at_the_next_step_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    steps = []
    with pytest.raises(TerminationSignal):
        with stop_at_step_boundary() as check:
            for step in range(5):
                steps.append(step)  # the step's work
                if step == 1:
                    os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step
                    steps.append("rest of step 1")
                check()
    assert steps == [0, 1, "rest of step 1"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_outside_the_main_thread_sigterm_handling_is_left_alone():
    result = []

    def body():
        with stop_at_step_boundary() as check:
            check()
            result.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert result == [signal.getsignal(signal.SIGTERM)]


def test_the_worker_finds_its_flow_run_processes_and_their_run_ids():
    env = {**os.environ, "PREFECT__FLOW_RUN_ID": "6ab9cd94-9a49-4080-be50-652526d5faac"}
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run("
                              "[sys.executable, '-c', 'import time; time.sleep(60)'])"], env=env)
    try:
        deadline = time.monotonic() + 30
        while not (below := descendants(child.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(below) == 1  # the child's own child
        assert child.pid in descendants(os.getpid())
        assert {flow_run_id_of(p) for p in [child.pid, *below]} == {env["PREFECT__FLOW_RUN_ID"]}
    finally:
        for pid in [*descendants(child.pid), child.pid]:
            os.kill(pid, signal.SIGKILL)
        child.wait()


def test_prefect_setup_without_a_server_says_how_to_point_at_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "flows.cli", "prefect-setup"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "set PREFECT_API_URL" in out.stderr, out.stderr
