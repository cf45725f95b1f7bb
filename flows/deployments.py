"""``cot2align prefect-setup``: what ``prefect.yaml`` cannot declare, created on the server.

``prefect.yaml`` declares the deployments (the nightly pipeline, one per stage), their work
pools, tags, pull steps and the nightly's concurrency limit; ``prefect deploy --all`` creates
them. This module declares the rest and :func:`setup` creates it, idempotently (a second run
updates in place):

- the work pools, one per resource kind: ``cot2align-cpu`` (prepare, tokenize) and
  ``cot2align-gpu`` (the stages that run models, :attr:`StageSpec.gpu`, and the nightly
  pipeline, which runs them all), both process pools;
- a tag concurrency limit ``gpu``: at most ``gpu_slots`` stage tasks tagged ``gpu`` run at
  once across all workers (every stage task of a model-running stage carries the tag);
- automation ``cot2align-rerun-crashed``: a flow run of a project deployment that crashed (its
  process was killed, by the OOM killer, a SIGTERM, its worker stopping) is rescheduled
  (``AwaitingRetry``) 20 s after its last crash report, while its run count is at most
  ``crash_reruns``; the rerun resumes from the artifact's checkpoints and finished shards.
  Prefect retries Failed runs, never Crashed ones. A first attempt that crashes before it
  started (run count 0: its code could not be pulled) is not rerun; a run that had started,
  crashed and then cannot start again is rescheduled after each such crash (its run count
  does not grow) until it starts or is cancelled, each time notified;
- automation ``cot2align-notify-failures``: each Failed or Crashed run of a project deployment
  is posted to a webhook (a ``CustomWebhookNotificationBlock`` named ``cot2align-notify``), when
  a webhook URL is given.

The project's deployments are those tagged ``cot2align`` (their flow runs carry the tag).
"""
from __future__ import annotations

from datetime import timedelta

from tasks.registry import StageSpec

TAG = "cot2align"
CPU_POOL, GPU_POOL = "cot2align-cpu", "cot2align-gpu"
NOTIFY_BLOCK = "cot2align-notify"
RERUN_AUTOMATION = "cot2align-rerun-crashed"
NOTIFY_AUTOMATION = "cot2align-notify-failures"
#: How long a crashed run stays crashed before it is rescheduled (no other state meanwhile).
QUIET = timedelta(seconds=20)

NOTIFY_BODY = """\
cot2align: flow run {{ flow_run.name }} of deployment {{ deployment.name }} is \
{{ flow_run.state.name }}.
Flow: {{ flow.name }}; parameters: {{ flow_run.parameters }}
Message: {{ flow_run.state.message }}
{{ flow_run|ui_url }}"""


def pool_of(stage: StageSpec) -> str:
    """The work pool of a stage's deployment: by the resource kind the stage needs."""
    return GPU_POOL if stage.gpu else CPU_POOL


def _project_runs() -> dict:
    return dict(match_related={"prefect.resource.role": "tag",
                               "prefect.resource.id": f"prefect.tag.{TAG}"})


def rerun_crashed_automation(crash_reruns: int, quiet: timedelta = QUIET):
    """Reschedule a crashed run ``quiet`` after its last crash report, while its run count is
    <= ``crash_reruns``.

    A crash is reported twice by a process worker (by its runner when the process exits, then
    by the worker, a few seconds later, after it loaded the flow for on_crashed hooks); the
    second report would overwrite a reschedule made after the first. So the trigger is
    proactive: per flow run, after a Crashed event it expects any further state event within
    ``quiet``; a second Crashed restarts the wait; when nothing comes, it fires.
    """
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    counts = [str(n) for n in range(1, crash_reruns + 1)]
    trigger = EventTrigger(
        match={"prefect.resource.id": "prefect.flow-run.*", "prefect.run-count": counts},
        **_project_runs(), after={"prefect.flow-run.Crashed"}, expect={"prefect.flow-run.*"},
        for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
        within=quiet)
    action = ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry", force=True,
                                message=f"rescheduled by {RERUN_AUTOMATION} after a crash; "
                                        "the rerun resumes from the checkpoints")
    return AutomationCore(name=RERUN_AUTOMATION, trigger=trigger, actions=[action],
                          description=f"Reruns a crashed cot2align run, up to run count "
                                      f"{crash_reruns}.")


def notify_failures_automation(block_document_id):
    """Post a run's Failed or Crashed state to the webhook, once per run per minute (a crash
    is reported twice, seconds apart)."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    trigger = EventTrigger(match={"prefect.resource.id": "prefect.flow-run.*"}, **_project_runs(),
                           expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                           for_each={"prefect.resource.id"}, posture=Posture.Reactive,
                           threshold=1, within=timedelta(minutes=1))
    action = SendNotification(block_document_id=block_document_id, body=NOTIFY_BODY,
                              subject="cot2align: {{ flow_run.name }} {{ flow_run.state.name }}")
    return AutomationCore(name=NOTIFY_AUTOMATION, trigger=trigger, actions=[action],
                          description="Posts every Failed or Crashed cot2align run to the "
                                      f"{NOTIFY_BLOCK} webhook.")


def _upsert_automation(client, automation) -> str:
    found = client.read_automations_by_name(automation.name)
    if found:
        client.update_automation(found[0].id, automation)
        for extra in found[1:]:
            client.delete_automation(extra.id)
        return "updated"
    client.create_automation(automation)
    return "created"


def _ensure_pool(client, name: str) -> str:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        client.read_work_pool(name)
        return "exists"
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(
            name=name, type="process",
            base_job_template=ProcessWorker.get_default_base_job_template()))
        return "created"


def _save_webhook(url: str):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(
        name=NOTIFY_BLOCK, url=url,
        json_data={"subject": "{{subject}}", "text": "{{body}}", "source": "{{name}}"})
    return block.save(NOTIFY_BLOCK, overwrite=True)


def setup(gpu_slots: int = 1, crash_reruns: int = 3, webhook_url: str | None = None,
          quiet: timedelta = QUIET, say=print) -> dict[str, str]:
    """Create or update the pools, the ``gpu`` limit and the automations on the server of
    PREFECT_API_URL; returns what was done to each (name -> created/updated/exists)."""
    from prefect.client.orchestration import get_client

    done: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        for pool in (CPU_POOL, GPU_POOL):
            done[f"work pool {pool}"] = _ensure_pool(client, pool)
        client.create_concurrency_limit(tag="gpu", concurrency_limit=gpu_slots)  # an upsert
        done[f"tag concurrency limit gpu={gpu_slots}"] = "set"
        if crash_reruns:
            done[f"automation {RERUN_AUTOMATION}"] = _upsert_automation(
                client, rerun_crashed_automation(crash_reruns, quiet))
        if webhook_url:
            block_id = _save_webhook(webhook_url)
            done[f"webhook block {NOTIFY_BLOCK}"] = "saved"
            done[f"automation {NOTIFY_AUTOMATION}"] = _upsert_automation(
                client, notify_failures_automation(block_id))
    for what, how in done.items():
        say(f"{what}: {how}")
    if not webhook_url:
        say(f"no webhook URL (--webhook-url or COT2ALIGN_WEBHOOK_URL): {NOTIFY_AUTOMATION} "
            "not created, failures reach no one")
    return done

