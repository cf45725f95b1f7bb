"""The life cycle every stage task shares: reuse a complete artifact, else write one.

``run_stage`` looks the artifact up by fingerprint; when it is complete (and not forced) the
stage is skipped. Otherwise it takes the artifact's lock, lets ``body`` fill the writer (shards
already finished by an interrupted run are kept: ``body`` asks ``writer.done_shards()``), and
the manifest is committed last. A markdown summary is published as a Prefect artifact.
"""
from __future__ import annotations

import re
import time
from typing import Any, Callable

from cot2align_core.config import PipelineConfig
from storage.store import ArtifactStore
from tasks.common import StageRef, logger
from tasks.registry import StageKey, spec, stage_params


def open_store(cfg: PipelineConfig) -> ArtifactStore:
    store = ArtifactStore(cfg.store)
    store.check_writable()
    return store


def run_stage(cfg: PipelineConfig, key: StageKey, fp: str, upstream: dict[str, StageRef],
              body: Callable[[Any], dict[str, Any] | None], *, force: bool = False) -> StageRef:
    stage, label = key.stage, str(key)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    store = open_store(cfg)
    log = logger()
    art = store.get(stage, fp)
    if art is not None and not force:
        log.info("%s: reusing %s", label, art.path)
        return StageRef(label, fp, str(art.path), reused=True,
                        summary=art.manifest.get("info", {}).get("summary", {}))
    if art is not None:
        log.info("%s: --force, recomputing %s", label, art.path)
        store.discard(stage, fp)
    t0 = time.time()
    with store.writer(stage, fp, params=stage_params(cfg, key),
                      upstream={k: r.fingerprint for k, r in upstream.items()},
                      version=spec(stage).version) as writer:
        if writer.complete:  # another run finished it while this one waited for the lock
            log.info("%s: finished meanwhile by another run, reusing %s", label, writer.artifact.path)
            return StageRef(label, fp, str(writer.artifact.path), reused=True,
                            summary=writer.artifact.info.get("summary", {}))
        summary = body(writer) or {}
        writer.info["summary"] = summary
    art = store.get(stage, fp)
    seconds = time.time() - t0
    log.info("%s: wrote %s in %.1f s", label, art.path, seconds)
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
    key = "stage-" + re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    create_markdown_artifact("\n".join(lines), key=key, description=f"{label} stage output")


def publish_table(rows: list[dict[str, Any]], key: str, description: str) -> None:
    """A Prefect table artifact inside a run (floats rounded to 2 places); nothing outside."""
    if not _in_prefect_run():
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact([{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
                           for r in rows], key=key, description=description)


class Progress:
    """A tqdm bar on the terminal and a Prefect progress artifact inside a run."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self.total = max(total, 1)
        self.done = 0
        self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        self._artifact = None
        if _in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            self._artifact = create_progress_artifact(0.0, description=desc)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        percent = int(100 * self.done / self.total)
        if self._artifact is not None and percent != getattr(self, "_percent", None):
            from prefect.artifacts import update_progress_artifact

            self._percent = percent  # one API call per whole percent, not per step
            update_progress_artifact(self._artifact, float(percent))

    def close(self) -> None:
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def kill_point(stage: str, event: str, count: int) -> None:
    """Crash-test hook: SIGKILL this process when ``COT2ALIGN_KILL_AT`` is ``stage:event:count``.

    The stages call it after each committed shard (``generate:shard:N``,
    ``cache_teacher:shard:N``) and after each optimizer step (``distill:step:N``,
    ``teacher_sft:step:N``), so tests can kill a real run at a precise point and check that the
    resumed run ends where an uninterrupted one does. Unset, it does nothing.
    """
    import os
    import signal

    target = os.environ.get("COT2ALIGN_KILL_AT")
    if target and target == f"{stage}:{event}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)
