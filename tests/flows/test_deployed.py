"""The README's deployment recipe, run as written, against a real ``prefect server start``.

One server for the module (a temporary PREFECT_HOME, a free port, SQLite), the recipe's
commands run verbatim from the README (their ``export`` lines get local values: the code is a
snapshot of this working tree as a git repository cloned by ``file://``, the store a temporary
folder, the webhook a listener in this process). Then:

- ``prefect deploy --all`` made every deployment as ``prefect.yaml`` and the registry say, and
  the scheduler created future runs of the nightly one (SQLAlchemy 2.1 breaks that);
- ``cot2align prefect-setup`` made the gpu limit and the automations, and a second run of it
  changes nothing;
- a CPU worker runs ``prepare`` from its own clone to Completed, shows it Cached when run again,
  and a ``tokenize`` without upstream fails at once (no retry) and is posted to the webhook;
- SIGTERM to a GPU worker stops ``teacher_sft`` between two steps: the worker exits, the run is
  Crashed with its checkpoints kept, the crash-rerun automation reschedules it, and a second
  worker resumes it from the last checkpoint to Completed.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from flows.deployments import NOTIFY_AUTOMATION, RERUN_AUTOMATION, pool_of
from tasks.registry import STAGE_NAMES, spec
from tests.flows.conftest import REPO

pytestmark = pytest.mark.slow

RECIPE_EXPORTS = {"COT2ALIGN_REPO", "COT2ALIGN_BRANCH", "COT2ALIGN_STORE", "COT2ALIGN_WEBHOOK_URL",
                  "PREFECT_API_URL"}
RECIPE_COMMANDS = ["prefect server start", "cot2align prefect-setup", "prefect deploy --all",
                   "cot2align worker --pool cot2align-cpu", "cot2align worker --pool cot2align-gpu"]
TEACHER_SFT = ["teacher_sft.training.steps=200", "teacher_sft.training.batch_size=8",
               "teacher_sft.training.checkpoint_every=10"]


def readme_recipe() -> tuple[set[str], list[str]]:
    """(exported variables, commands) of the bash block in the README's Deployments section."""
    section = (REPO / "README.md").read_text().split("## Deployments", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    exports = {m[1] for line in lines if (m := re.match(r"export (\w+)=", line))}
    return exports, [line for line in lines if line and not line.startswith("export ")]


def snapshot_repo(dest: Path) -> Path:
    """This working tree (tracked and untracked, not ignored files) as a one-commit repository."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "snapshot"]):
        subprocess.run(git + args, cwd=dest, check=True)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Webhook(http.server.ThreadingHTTPServer):
    """Records the JSON bodies POSTed to it."""

    def __init__(self):
        self.bodies: list[dict] = []
        webhook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                webhook.bodies.append(json.loads(self.rfile.read(length) or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class Api(httpx.Client):
    """The server's REST API; retries what a busy SQLite server answers with 503 (Prefect's
    own client does the same)."""

    def request(self, method, url, **kwargs) -> httpx.Response:
        for attempt in range(8):
            response = super().request(method, url, **kwargs)
            if response.status_code != 503:
                break
            time.sleep(0.5 * (attempt + 1))
        response.raise_for_status()
        return response


@dataclass
class Deployed:
    tmp: Path
    snapshot: Path
    store: Path
    env: dict
    api: Api
    webhook: Webhook
    commands: list[str]
    times: dict[str, float] = field(default_factory=dict)
    procs: list = field(default_factory=list)

    def run(self, command: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        out = subprocess.run(["bash", "-c", command], cwd=cwd, env=self.env, timeout=timeout,
                             capture_output=True, text=True)
        assert out.returncode == 0, f"{command}: {out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out

    def start(self, command: str, log: str) -> subprocess.Popen:
        with open(self.tmp / log, "w") as f:
            proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=self.tmp, env=self.env,
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log = self.tmp / log
        self.procs.append(proc)
        return proc

    def deployment(self, name: str) -> dict:
        return next(d for d in self.api.post("/deployments/filter", json={}).json()
                    if d["name"] == name)

    def create_run(self, deployment: str, **parameters) -> str:
        dep = self.deployment(deployment)
        return self.api.post(f"/deployments/{dep['id']}/create_flow_run",
                             json={"parameters": parameters}).json()["id"]

    def flow_run(self, run_id: str) -> dict:
        return self.api.get(f"/flow_runs/{run_id}").json()

    def wait_state(self, run_id: str, names: set[str], timeout: float, log=None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state"]["name"] in names:
                return run
            time.sleep(1)
        tail = log.read_text()[-4000:] if log else ""
        raise AssertionError(f"flow run {run_id} is {run['state']} after {timeout} s, not "
                             f"{names}\n{tail}")

    def task_runs(self, run_id: str) -> list[dict]:
        body = {"flow_runs": {"id": {"any_": [run_id]}}}
        return self.api.post("/task_runs/filter", json=body).json()

    def notified(self, run_name: str, state: str, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for body in self.webhook.bodies:
                if run_name in body.get("text", "") and state in body.get("subject", ""):
                    return body
            time.sleep(1)
        raise AssertionError(f"no {state} notification for {run_name}: {self.webhook.bodies}")


def stop(proc: subprocess.Popen, grace: float = 60) -> float:
    """SIGTERM a process started by the test; seconds until it exited (SIGKILL after grace)."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return float("inf")
    return time.monotonic() - t0


def recipe_env(tmp: Path, snapshot: Path, store: Path, port: int, webhook: Webhook) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        # `cot2align` and `prefect` from this environment, this working tree's code first.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_UI_ENABLED="false", PREFECT_SERVER_ANALYTICS_ENABLED="false",
        COT2ALIGN_REPO=f"file://{snapshot}", COT2ALIGN_BRANCH="main",
        COT2ALIGN_STORE=str(store), COT2ALIGN_WEBHOOK_URL=webhook.url,
        COT2ALIGN_RERUN_AFTER_S="10", OMP_NUM_THREADS="1")
    return env


def wait_healthy(api: httpx.Client, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, server.log.read_text()[-3000:]
        try:
            api.get("/health")
            return
        except (httpx.TransportError, httpx.HTTPStatusError):
            pass
        time.sleep(1)
    raise AssertionError(f"server not healthy after {timeout} s: {server.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    if shutil.which("git") is None:
        pytest.skip("git is needed: workers get the code by a git_clone pull step")
    exports, commands = readme_recipe()
    assert exports == RECIPE_EXPORTS and commands == RECIPE_COMMANDS, (exports, commands)
    tmp = tmp_path_factory.mktemp("deployed")
    snapshot = snapshot_repo(tmp / "repo")
    port, webhook = free_port(), Webhook()
    env = recipe_env(tmp, snapshot, tmp / "store", port, webhook)
    api = Api(base_url=env["PREFECT_API_URL"], timeout=30)
    d = Deployed(tmp, snapshot, tmp / "store", env, api, webhook, commands)
    t0 = time.monotonic()
    try:
        server = d.start(commands[0], "server.log")
        wait_healthy(api, server, 240)
        d.times["server start"] = time.monotonic() - t0
        t0 = time.monotonic()
        d.run(commands[1], cwd=tmp)
        d.times["prefect-setup"] = time.monotonic() - t0
        t0 = time.monotonic()
        d.run(commands[2], cwd=snapshot)
        d.times["prefect deploy --all"] = time.monotonic() - t0
        yield d
    finally:
        for proc in reversed(d.procs):
            if proc.poll() is None:
                stop(proc, grace=30)
        webhook.shutdown()
        api.close()
        print("\nmeasured (s): " + ", ".join(f"{k} {v:.1f}" for k, v in d.times.items()))


def test_deployments_match_the_registry_and_the_scheduler_creates_nightly_runs(deployed):
    d = deployed
    deps = {x["name"]: x for x in d.api.post("/deployments/filter", json={}).json()}
    assert set(deps) == {"nightly", *STAGE_NAMES}
    clone = {"prefect.deployments.steps.git_clone": {"repository": f"file://{d.snapshot}",
                                                     "branch": "main"}}
    for name in STAGE_NAMES:
        dep, stage = deps[name], spec(name)
        assert dep["description"].startswith(stage.description), name
        assert dep["work_pool_name"] == pool_of(stage)
        assert {"cot2align", f"stage:{name}", "gpu" if stage.gpu else "cpu"} <= set(dep["tags"])
        assert dep["parameters"] == {"config_path": "configs/demo.yaml", "store": str(d.store)}
        assert dep["pull_steps"] == [clone]
        props = dep["parameter_openapi_schema"]["properties"]
        assert all(props[p]["description"] for p in ("config_path", "overrides", "force", "store"))
    nightly = deps["nightly"]
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert nightly["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert nightly["work_pool_name"] == "cot2align-gpu" and nightly["pull_steps"] == [clone]
    t0, deadline, future = time.monotonic(), time.monotonic() + 120, []
    body = {"flow_runs": {"deployment_id": {"any_": [nightly["id"]]},
                          "state": {"type": {"any_": ["SCHEDULED"]}}}}
    while not future and time.monotonic() < deadline:
        future = [r for r in d.api.post("/flow_runs/filter", json=body).json()
                  if r["expected_start_time"] > r["created"]]
        if not future:
            time.sleep(2)
    d.times["scheduled runs after deploy"] = time.monotonic() - t0
    import sqlalchemy

    assert future, (f"the scheduler created no run of the nightly deployment (SQLAlchemy "
                    f"{sqlalchemy.__version__}; pyproject.toml pins <2.1)")
    assert all(r["parameters"]["config_path"] == "configs/demo.yaml" for r in future)


def test_prefect_setup_made_the_gpu_limit_and_the_automations_and_is_idempotent(deployed):
    d = deployed
    d.run(d.commands[1], cwd=d.tmp)  # a second time
    assert d.api.get("/concurrency_limits/tag/gpu").json()["concurrency_limit"] == 1
    names = [a["name"] for a in d.api.post("/automations/filter", json={}).json()]
    assert sorted(names) == sorted([NOTIFY_AUTOMATION, RERUN_AUTOMATION])
    pools = {p["name"] for p in d.api.post("/work_pools/filter", json={}).json()}
    assert {"cot2align-cpu", "cot2align-gpu"} <= pools


@pytest.fixture(scope="module")
def cpu_runs(deployed):
    """A CPU worker runs prepare twice (computed, then reused) and tokenize without its
    upstream artifacts (fails); then it is stopped."""
    d = deployed
    worker = d.start(d.commands[3], "worker-cpu.log")
    runs = {}
    for label, deployment in (("prepare", "prepare"), ("again", "prepare"),
                              ("tokenize", "tokenize")):
        t0 = time.monotonic()
        runs[label] = d.create_run(deployment)
        d.wait_state(runs[label], {"Completed", "Failed", "Crashed"}, 300, worker.log)
        d.times[f"{label} run"] = time.monotonic() - t0
    d.times["idle cpu worker stop"] = stop(worker)
    return runs, worker


def test_a_cpu_worker_runs_stage_deployments_from_its_own_clone(deployed, cpu_runs):
    d, (runs, worker) = deployed, cpu_runs
    assert d.flow_run(runs["prepare"])["state"]["name"] == "Completed"
    assert list(d.store.glob("prepare/*/manifest.json"))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=d.snapshot,
                          capture_output=True, text=True).stdout.strip()
    m = re.search(r"cot2align code at (\S+) \(git (\w+)\)", worker.log.read_text())
    assert m and m[2] == head, worker.log.read_text()[-4000:]
    assert not Path(m[1]).is_relative_to(REPO) and not Path(m[1]).is_relative_to(d.snapshot)
    assert not Path(m[1]).exists()  # the run's clone went with its working directory
    (task,) = d.task_runs(runs["prepare"])
    assert task["name"] == "prepare" and task["state"]["name"] == "Completed"
    assert {"cot2align", "stage:prepare"} <= set(task["tags"])
    (again,) = d.task_runs(runs["again"])
    assert again["state"]["name"] == "Cached" and again["state"]["type"] == "COMPLETED"
    assert d.flow_run(runs["again"])["state"]["name"] == "Completed"
    assert worker.returncode == 0 and "cot2align worker: stopped" in worker.log.read_text()


def test_a_run_without_its_upstream_fails_at_once_and_is_posted_to_the_webhook(deployed,
                                                                                 cpu_runs):
    d, (runs, _) = deployed, cpu_runs
    run = d.flow_run(runs["tokenize"])
    assert run["state"]["name"] == "Failed"
    assert "cot2align stage generate" in run["state"]["message"]  # what to run first
    assert run["run_count"] == 1 and d.task_runs(runs["tokenize"]) == []  # failed up front
    body = d.notified(run["name"], "Failed")
    assert "tokenize" in body["text"]


def test_sigterm_stops_training_and_the_crashed_run_resumes_on_another_worker(deployed,
                                                                               cpu_runs):
    d = deployed
    worker = d.start(d.commands[4], "worker-gpu-a.log")
    run_id = d.create_run("teacher_sft", overrides=TEACHER_SFT)
    deadline = time.monotonic() + 300
    while not list(d.store.glob("teacher_sft/*/checkpoints/step-*.pt")):
        assert time.monotonic() < deadline and worker.poll() is None, worker.log.read_text()[-4000:]
        time.sleep(0.5)
    d.times["SIGTERM to gpu worker exit"] = stop(worker)
    assert worker.returncode == 0, worker.log.read_text()[-4000:]
    crashed = d.flow_run(run_id)
    assert crashed["state"]["type"] in ("CRASHED", "SCHEDULED"), crashed["state"]
    (art,) = [p.parent for p in d.store.glob("teacher_sft/*/checkpoints")]
    assert not (art / "manifest.json").exists() and list(art.glob("checkpoints/step-*.pt"))
    t0 = time.monotonic()
    d.wait_state(run_id, {"AwaitingRetry"}, 120)
    d.times["crash to rescheduled"] = time.monotonic() - t0
    second = d.start(d.commands[4], "worker-gpu-b.log")
    t0 = time.monotonic()
    done = d.wait_state(run_id, {"Completed", "Failed", "Crashed"}, 300, second.log)
    d.times["rerun to Completed"] = time.monotonic() - t0
    assert done["state"]["name"] == "Completed" and done["run_count"] == 2
    # The flow-run processes' console (the API's copy of the logs can miss records when
    # SQLite is locked, see the README).
    assert "SIGTERM received: stopped after this step" in worker.log.read_text()
    step = int(re.search(r"resumed from checkpoint step (\d+)", second.log.read_text())[1])
    assert 10 <= step < 200
    assert (art / "manifest.json").exists() and not (art / "checkpoints").exists()
    body = {"artifacts": {"key": {"any_": ["progress-teacher-sft-training-steps"]}}}
    progress = d.api.post("/artifacts/filter", json=body).json()
    assert any(a["description"].startswith("FAILED at") for a in progress), progress
    assert any(a["data"] == 100.0 for a in progress)
    d.notified(crashed["name"], "Crashed")
    d.times["idle gpu worker stop"] = stop(second)
