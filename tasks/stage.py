"""The life cycle every stage task shares: reuse a checked artifact, else write one.

``run_stage`` checks the artifact of the fingerprint before anything else, every time (sizes,
Parquet footers, row counts, the manifest's own digest, the upstream artifacts it was built
from: milliseconds, :meth:`storage.store.ArtifactStore.check`):

- sound and not forced: reused, and the log says what was checked;
- damaged shards: exactly those are recomputed (the others are kept), said in the log;
- stale or untrustworthy (an upstream changed, a hand-edited manifest) or ``--force``: the
  artifact is recomputed *beside* the old one and swapped in only when it commits, so a forced
  rerun that fails loses nothing;
- partial (a killed run): resumed, keeping the shards its journal vouches for.

``body`` fills the writer under the artifact's lock; the manifest is committed last. Training
checkpoints stay inside the artifact until after that commit, so a kill at any moment loses no
training. A markdown summary is published as a Prefect artifact.
"""
from __future__ import annotations

import logging
import re
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from cot2align_core.config import PipelineConfig
from storage.store import ArtifactStore
from tasks.common import StageRef, logger
from tasks.registry import StageKey, spec, stage_params

def open_store(cfg: PipelineConfig) -> ArtifactStore:
    """The config's store; reading and reusing need no write access (writers check it)."""
    return ArtifactStore(cfg.store)


def _reused(label: str, fp: str, art, how: str) -> StageRef:
    logger().info("%s: reused artifact %s (%s)", label, art.path, how)
    return StageRef(label, fp, str(art.path), reused=True,
                    summary=art.manifest.get("info", {}).get("summary", {}))


def _announce(label: str, report, force: bool) -> None:
    log = logger()
    if force and report.status == "complete":
        log.info("%s: --force: recomputing beside %s, swapped in when it commits", label,
                 report.path)
    elif report.action == "repair":
        log.warning("%s: %s is damaged (%s); recomputing only %s", label, report.path,
                    "; ".join(str(p) for p in report.problems),
                    ", ".join(report.bad_shards + report.bad_files))
    elif report.action == "recompute":
        log.warning("%s: %s cannot be reused (%s); recomputing it", label, report.path,
                    "; ".join(str(p) for p in report.problems))
    elif report.action == "resume":
        log.info("%s: resuming the unfinished artifact %s", label, report.path)


def run_stage(cfg: PipelineConfig, key: StageKey, fp: str, upstream: dict[str, StageRef],
              body: Callable[[Any], dict[str, Any] | None], *, force: bool = False) -> StageRef:
    stage, label = key.stage, str(key)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    store = open_store(cfg)
    report = store.check(stage, fp)
    if report.ok and not force:
        return _reused(label, fp, report.artifact, report.summary())
    _announce(label, report, force)
    t0 = time.time()
    with store.writer(stage, fp, params=stage_params(cfg, key),
                      upstream={k: r.fingerprint for k, r in upstream.items()},
                      version=spec(stage).version, lock_timeout=None,
                      invalidate=(report.bad_shards + report.bad_files
                                  if report.action == "repair" and not force else ()),
                      replace=force or report.action == "recompute") as writer:
        if writer.complete:  # another run finished it while this one waited for the lock
            return _reused(label, fp, writer.artifact, "finished meanwhile by another run")
        summary = body(writer) or {}
        writer.info["summary"] = summary
    art = store.get(stage, fp)  # the commit also removed the checkpoints, only then
    seconds = time.time() - t0
    logger().info("%s: wrote %s in %.1f s", label, art.path, seconds)
    _publish(label, art, summary, seconds)
    return StageRef(label, fp, str(art.path), reused=False, seconds=seconds, summary=summary)


def run_shard(shard_task, *args, **kwargs):
    """Run one shard: as a Prefect task inside a flow run (named, retried, on the flow's task
    runner), as the plain function outside one (tests, notebooks: no server needed)."""
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return shard_task.fn(*args, **kwargs)
    return shard_task(*args, **kwargs)


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _publish(label: str, art, summary: dict[str, Any], seconds: float) -> None:
    if not _in_prefect_run():  # outside a Prefect run: nothing to publish
        return
    from prefect.artifacts import create_markdown_artifact
    lines = [f"## {label}", "", f"- artifact: `{art.path}`", f"- seconds: {seconds:.1f}"]
    lines += [f"- {k}: {v}" for k, v in summary.items() if not isinstance(v, (dict, list))]
    key = "stage-" + artifact_key(label)
    create_markdown_artifact("\n".join(lines), key=key, description=f"{label} stage output")


def publish_table(rows: list[dict[str, Any]], key: str, description: str) -> None:
    """A Prefect table artifact inside a run (floats rounded to 2 places); nothing outside."""
    if not _in_prefect_run():
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact([{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
                           for r in rows], key=key, description=description)


def artifact_key(text: str) -> str:
    """A Prefect artifact key from free text: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class Progress:
    """A tqdm bar on the terminal and a Prefect progress artifact inside a run.

    The artifact's key is ``progress-<desc>`` (``progress-distill-sft-seed-0-training-steps``),
    so the UI shows one history per loop across runs. When the loop ends by an exception (a
    failed step, a timeout, SIGTERM) its description says where it stopped and why.
    """

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self.total = max(total, 1)
        self.done = 0
        self.desc = desc
        self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                        disable=not sys.stderr.isatty())  # bars on a terminal only
        self._artifact = None
        self._percent = 0
        if _in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            self._artifact = create_progress_artifact(0.0, key=f"progress-{artifact_key(desc)}",
                                                      description=desc)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        percent = int(100 * self.done / self.total)
        if self._artifact is not None and percent != self._percent:
            from prefect.artifacts import update_progress_artifact

            self._percent = percent  # one API call per whole percent, not per step
            update_progress_artifact(self._artifact, float(percent))

    def fail(self, exc: BaseException) -> None:
        """Mark the artifact as stopped at its current percentage by ``exc``."""
        if self._artifact is None:
            return
        from prefect.artifacts import update_progress_artifact

        why = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        update_progress_artifact(self._artifact, float(self._percent),
                                 description=f"FAILED at {self._percent}% ({why[:200]}): "
                                             f"{self.desc}")

    def close(self) -> None:
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        if exc is not None:
            try:
                self.fail(exc)
            except Exception as err:  # the API may be what failed; the original error wins
                logger().warning("could not mark the progress artifact failed: %s", err)


@contextmanager
def stop_at_step_boundary() -> Iterator[Callable[[], None]]:
    """Inside the block, SIGTERM stops the loop at its next step instead of mid-step.

    A worker shutting down (``cot2align worker``), a cancel from the UI or a container
    runtime sends SIGTERM to the flow-run process. Prefect's own handler raises at once,
    wherever the main thread is, possibly halfway through writing a checkpoint. Inside this
    block the signal only sets a flag; the ``check()`` this yields (call it once per step)
    then raises Prefect's ``TerminationSignal``, which Prefect records as Crashed (Cancelled
    when the run is being cancelled), the artifact's lock is released and its checkpoints are
    kept for the rerun to resume from. A second SIGTERM after ``check()`` raised goes to the
    previous handler. Outside the main thread (no signal handlers there) it does nothing.
    """
    import signal

    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main thread
        yield lambda: None
        return
    previous = signal.SIG_DFL if previous is None else previous

    def check() -> None:
        if received:
            from prefect.exceptions import TerminationSignal

            signal.signal(signal.SIGTERM, previous)
            received.clear()
            logger().warning("SIGTERM received: stopped after this step; the artifact's "
                             "checkpoints are kept and a rerun resumes from the last one")
            _send_logs()  # the process dies right after Prefect records the crash
            raise TerminationSignal(signal=signal.SIGTERM)

    try:
        yield check
    finally:
        signal.signal(signal.SIGTERM, previous)


def _send_logs() -> None:
    """Send the run's queued log records to the Prefect API now (waits up to 5 s)."""
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    except Exception as err:  # no API, or it failed: the records stay on the console
        logging.getLogger("cot2align").debug("could not send the logs: %s", err)


def kill_point(stage: str, event: str, count: int) -> None:
    """Crash-test hook: SIGKILL this process when ``COT2ALIGN_KILL_AT`` is ``stage:event:count``.

    The stages call it after each committed shard (``generate:shard:N``,
    ``cache_teacher:shard:N``), after each optimizer step (``distill:step:N``,
    ``teacher_sft:step:N``), inside tokenize's shard task ``N`` between its two shards
    (``tokenize:half-shard:N``), and once training is done and saved but not yet committed
    (``distill:trained:N``), so tests can kill a real run at a precise point and check that
    the resumed run ends where an uninterrupted one does. Unset, it does nothing. With
    ``COT2ALIGN_KILL_ONCE`` set to a file path, only the first process to reach the point dies
    (it creates that file first): a retried shard task then runs through.
    """
    import os
    import signal

    target = os.environ.get("COT2ALIGN_KILL_AT")
    if not target or target != f"{stage}:{event}:{count}":
        return
    once = os.environ.get("COT2ALIGN_KILL_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
