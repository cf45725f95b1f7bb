"""The ``cot2align`` command line.

    cot2align run [CONFIG] [--set key=value ...] [--force STAGE ...] [--engine local|ray]
    cot2align stage NAME CONFIG [--set key=value ...] [--force] [--student LABEL] [--engine ...]
    cot2align plan [CONFIG]              fingerprints and which artifacts exist
    cot2align inspect PATH [--json]      an artifact or a store
    cot2align verify PATH                re-hash shards against the manifest
    cot2align ls [STORE]                 artifacts in a store (--garbage: unreferenced ones)
    cot2align gc [STORE] --yes           remove unreferenced artifacts
    cot2align prefect-setup [--gpu-slots N] [--crash-reruns N] [--rerun-after S] [--webhook-url URL]
                                         work pools, gpu limit, automations on the server
    cot2align worker --pool POOL         a process worker that SIGTERM stops cleanly

`run` and `stage` use the Prefect server of PREFECT_API_URL when it is set, else start a
temporary one for the command (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, 120 s here).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _default_config() -> str:
    if not DEFAULT_CONFIG.is_file():
        raise SystemExit(f"no CONFIG given and the embedded default {DEFAULT_CONFIG} is missing; "
                         "pass a config path, e.g. `cot2align run configs/demo.yaml`")
    return str(DEFAULT_CONFIG)


def _print_summary(results: dict[str, dict], seconds: float) -> None:
    print()
    print(f"{'stage':<32}{'status':<10}{'seconds':>9}  artifact")
    for key, ref in results.items():
        status = "reused" if ref["reused"] else "computed"
        print(f"{key:<32}{status:<10}{ref['seconds']:>9.1f}  {ref['path']}")
    report = results.get("evaluate", {}).get("summary", {}).get("report")
    if report:
        print(f"\nreport: {report}")
    metrics = results.get("evaluate", {}).get("summary", {}).get("metrics")
    if metrics:
        for line in metrics:
            print(f"  {line}")
    print(f"total wall time: {seconds:.1f} s")


def _check(config: str, overrides) -> None:
    """Validate the config and its paths before a flow (and a server) starts."""
    from cot2align_core.config import load_config
    from tasks.common import preflight

    preflight(load_config(config, overrides))


def _with_engine(args) -> list[str]:
    """The ``--set`` overrides, plus ``cluster.engine`` when ``--engine`` is given (the cluster
    section is in no fingerprint: the engine never changes what is reused)."""
    return (args.set or []) + ([f"cluster.engine={args.engine}"] if args.engine else [])


def _cmd_run(args) -> int:
    from flows.pipeline import pipeline_flow
    from flows.server import prefect_server

    t0 = time.time()
    args.set = _with_engine(args)
    config = args.config or _default_config()
    _check(config, args.set)
    with prefect_server():
        results = pipeline_flow(config, args.set or None, args.force or None)
    _print_summary(results, time.time() - t0)
    return 0


def _cmd_stage(args) -> int:
    from flows.pipeline import STAGE_FLOWS
    from flows.server import prefect_server

    t0 = time.time()
    args.set = _with_engine(args)
    _check(args.config, args.set)
    if args.student is not None and args.name != "distill":
        raise SystemExit("cot2align: error: --student applies to the distill stage only")
    with prefect_server():
        results = STAGE_FLOWS[args.name](args.config, args.set or None, args.force,
                                         student=args.student)
    _print_summary(results, time.time() - t0)
    return 0


def _cmd_plan(args) -> int:
    from cot2align_core.config import load_config
    from storage.store import ArtifactStore
    from tasks.registry import plan

    cfg = load_config(args.config or _default_config(), args.set)
    store = ArtifactStore(cfg.store)
    fps = plan(cfg)
    width = max(len(str(key)) for key in fps) + 2
    for key, fp in fps.items():
        report = store.check(key.stage, fp)
        state = ("complete" if report.ok else "missing" if report.status == "absent"
                 else f"{report.status}: will {report.action}")
        print(f"{str(key):<{width}}{fp}  {state}")
    return 0


def _cmd_prefect_setup(args) -> int:
    from datetime import timedelta

    from prefect.settings import get_current_settings

    from flows.deployments import setup
    from flows.pipeline import env_number

    if not get_current_settings().api.url:
        raise SystemExit("cot2align: error: prefect-setup configures a running Prefect server: "
                         "set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    rerun_after = args.rerun_after
    if rerun_after is None:
        rerun_after = env_number("COT2ALIGN_RERUN_AFTER_S", 20)
    if args.gpu_slots < 1 or args.crash_reruns < 0 or rerun_after < 10:
        raise SystemExit("cot2align: error: --gpu-slots must be >= 1, --crash-reruns >= 0 and "
                         "--rerun-after >= 10 (Prefect's minimum)")
    setup(gpu_slots=args.gpu_slots, crash_reruns=args.crash_reruns,
          webhook_url=args.webhook_url or os.environ.get("COT2ALIGN_WEBHOOK_URL") or None,
          quiet=timedelta(seconds=rerun_after))
    return 0


def _cmd_worker(args) -> int:
    from flows.server import prefect_server
    from flows.worker import serve

    with prefect_server():
        return serve(args.pool, name=args.name, limit=args.limit, grace_s=args.grace)


def _stage_or_instance(text: str) -> str:
    from tasks.registry import StageKey

    return str(StageKey.parse(text))


def _add_engine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("local", "ray"),
                   help="where the stages run: this process (local) or a Ray cluster "
                        "(cluster.address in the config; none: one started for the run)")


def build_parser() -> argparse.ArgumentParser:
    from storage.inspect import add_subcommands
    from tasks.registry import STAGE_NAMES

    parser = argparse.ArgumentParser(prog="cot2align", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the whole pipeline (finished stages are reused)")
    p.add_argument("config", nargs="?", help=f"YAML config (default: {DEFAULT_CONFIG.name})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--force", action="append", type=_stage_or_instance, metavar="STAGE",
                   help="recompute this stage (or one student, distill[<label>,seed=<n>]) even "
                        "if its artifact exists")
    _add_engine(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("stage", help="run one stage against the existing upstream artifacts")
    p.add_argument("name", choices=STAGE_NAMES)
    p.add_argument("config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--force", action="store_true", help="recompute even if the artifact exists")
    p.add_argument("--student", metavar="LABEL",
                   help="distill: train only this student (a label, or distill[<label>,seed=<n>])")
    _add_engine(p)
    p.set_defaults(func=_cmd_stage)

    p = sub.add_parser("plan", help="show each stage's fingerprint and whether it exists")
    p.add_argument("config", nargs="?")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("prefect-setup", help="create or update the work pools, the gpu tag "
                                             "concurrency limit and the automations (idempotent)")
    p.add_argument("--gpu-slots", type=int, default=1, metavar="N",
                   help="stage tasks tagged gpu that may run at once, all workers together")
    p.add_argument("--crash-reruns", type=int, default=3, metavar="N",
                   help="reschedule a crashed run while its run count is <= N (0: never)")
    p.add_argument("--rerun-after", type=float, metavar="SECONDS",
                   help="reschedule a crashed run when it stayed crashed this long "
                        "(default: $COT2ALIGN_RERUN_AFTER_S or 20)")
    p.add_argument("--webhook-url", metavar="URL",
                   help="post Failed and Crashed runs here (default: $COT2ALIGN_WEBHOOK_URL)")
    p.set_defaults(func=_cmd_prefect_setup)

    p = sub.add_parser("worker", help="a Prefect process worker; SIGTERM stops its runs at the "
                                      "next step, keeping their checkpoints, then the worker")
    p.add_argument("--pool", required=True, help="work pool, e.g. cot2align-cpu or cot2align-gpu")
    p.add_argument("--name", help="worker name (default: Prefect's)")
    p.add_argument("--limit", type=int, help="flow runs at once (default: no limit)")
    p.add_argument("--grace", type=float, default=120.0, metavar="SECONDS",
                   help="after SIGTERM, how long runs may take to stop before SIGKILL")
    p.set_defaults(func=_cmd_worker)

    add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Under CPU load the temporary server misses Prefect's 20 s default start-up timeout.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    parser = build_parser()
    args = parser.parse_args(argv)
    from cot2align_core.config import ConfigError
    from cot2align_core.data import DataError
    from cot2align_core.tokenization import TokenizerError
    from storage.errors import StoreError
    from tasks.common import StageError

    try:
        return args.func(args) or 0
    except (ConfigError, DataError, StageError, TokenizerError, StoreError,
            FileNotFoundError) as err:
        # Problems with the user's inputs: the message says what to fix; no traceback.
        print(f"cot2align: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
