"""``cot2align worker``: Prefect's process worker, stopped cleanly by SIGTERM.

prefect 3.7.7's ``prefect worker start`` turns a SIGTERM into a SIGINT to itself and keeps
going: the flow run it started trains on to its end, the idle worker does not exit, and a
second SIGTERM SIGKILLs the worker and leaves the flow-run process running as an orphan.
A host shutting down, a ``systemctl stop`` or a rolling update then either waits hours or
loses track of the run.

This command runs the same :class:`~prefect.workers.process.ProcessWorker` in-process. On
SIGTERM or SIGINT it

1. sends SIGTERM to every process below it (the flow-run processes, their vLLM engines and
   process pools, also any started while it stops);
2. waits up to ``grace_s`` for them to exit: a stage in a training loop stops after its current
   step (:func:`tasks.stage.stop_at_step_boundary`), any other stage at once; the run is
   recorded as Crashed, the artifact's checkpoints and finished shards are kept, and the
   crash-rerun automation (``cot2align prefect-setup``) reschedules it for another worker,
   which resumes it;
3. SIGKILLs what is left after ``grace_s``, marks a run still shown as Running as Crashed,
   and stops the worker.
"""
from __future__ import annotations

import os
import signal
import time


def descendants(pid: int) -> list[int]:
    """Live process ids below ``pid``, children first (Linux ``/proc``)."""
    from storage.locks import pid_alive

    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            found.append(child)
            todo.append(child)
    return [p for p in found if pid_alive(p)]


def _signal(pids, signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def flow_run_id_of(pid: int) -> str | None:
    """The flow run a process belongs to (``PREFECT__FLOW_RUN_ID`` in its environment)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    found = [v for k, _, v in (e.partition(b"=") for e in env) if k == b"PREFECT__FLOW_RUN_ID"]
    return found[0].decode() if found else None


async def stop_runs(grace_s: float, say=print) -> set[str]:
    """SIGTERM every process below this one, wait up to ``grace_s`` for all to exit (the
    worker reaps its flow-run processes meanwhile), then SIGKILL the rest. Returns the ids of
    the flow runs they belonged to."""
    import anyio

    deadline = time.monotonic() + grace_s
    signalled: set[int] = set()
    runs: set[str] = set()
    while alive := descendants(os.getpid()):
        if time.monotonic() > deadline:
            say(f"cot2align worker: {len(alive)} process(es) still running after {grace_s:.0f} s: "
                f"SIGKILL {alive}")
            _signal(alive, signal.SIGKILL)
            break
        new = [p for p in alive if p not in signalled]
        if new:
            runs.update(filter(None, map(flow_run_id_of, new)))
            say(f"cot2align worker: SIGTERM to {new} (flow runs {sorted(runs)})")
            _signal(new, signal.SIGTERM)
            signalled.update(new)
        await anyio.sleep(0.5)
    return runs


async def settle(run_ids: set[str], timeout_s: float = 15.0, say=print) -> None:
    """Wait until no stopped run is Running or Pending any more (the run reports its crash, or
    the worker reports the exit); then mark those still left so as Crashed, so that no run
    stays Running with no process behind it."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    async with get_client() as client:
        with anyio.move_on_after(timeout_s):
            while run_ids:
                states = {i: (await client.read_flow_run(i)).state for i in run_ids}
                run_ids = {i for i, st in states.items() if st.is_running() or st.is_pending()}
                if run_ids:
                    await anyio.sleep(0.5)
        for i in run_ids:
            say(f"cot2align worker: flow run {i} is still Running: marking it Crashed")
            await client.set_flow_run_state(i, Crashed(message="cot2align worker stopped: the "
                                                              "run's process was killed"),
                                            force=True)


def _exit_soon(seconds: float, scratch: str) -> None:
    """prefect 3.7.7's worker does not finish cancelling (its event loop spins on a task that
    ignores the cancellation, idle or not): leave the process after ``seconds``."""
    import shutil
    import threading

    def leave() -> None:
        shutil.rmtree(scratch, ignore_errors=True)
        print("cot2align worker: stopped", flush=True)
        os._exit(0)

    threading.Timer(seconds, leave).start()


def serve(pool: str, *, name: str | None = None, limit: int | None = None,
          grace_s: float = 120.0) -> int:
    """Poll ``pool`` for flow runs and run each in a subprocess until SIGTERM or SIGINT.

    The worker works in a scratch folder of its own: Prefect runs a deployment's pull steps in
    the worker's working directory when it loads a crashed run's flow for its on_crashed hooks
    (a ``git_clone`` there would leave a clone per crash)."""
    import tempfile

    import anyio
    from prefect.workers.process import ProcessWorker

    def say(message: str) -> None:
        print(message, flush=True)

    async def main(scratch: str) -> None:
        worker = ProcessWorker(work_pool_name=pool, name=name, limit=limit)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.start)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    say(f"cot2align worker: {signal.Signals(signum).name} received: stopping "
                        f"the flow runs (grace {grace_s:.0f} s), then the worker")
                    break
            await settle(await stop_runs(grace_s, say=say), say=say)
            _exit_soon(3.0, scratch)
            tg.cancel_scope.cancel()
        say("cot2align worker: stopped")

    scratch = tempfile.mkdtemp(prefix="cot2align-worker-")
    os.chdir(scratch)
    anyio.run(main, scratch)
    return 0
