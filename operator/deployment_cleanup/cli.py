"""``deployment-cleanup``: the same runs as the operator, from a terminal.

Exit codes: 0 success, 1 error (bad input, unreachable database, ...),
2 usage error, 3 refused for safety (blocked plan, stale or missing approval,
stopped apply). ``--output json`` prints the status object the operator writes
to the DeploymentCleanup resource.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from .db import ConfigurationError, EnvironmentSecrets, Redactor
from .demo import run_demo
from .report import render_result, table
from .runs import (
    ApplyRequest,
    Connections,
    Outcome,
    RunResult,
    apply,
    connect,
    plan_and_record,
    restore,
    utc_now,
)
from .spec import ApprovalMode, DeploymentCleanup, SpecError, load_cleanup
from .status import build_status, run_summary

__all__ = ["EXIT_BLOCKED", "EXIT_ERROR", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BLOCKED = 3

_EXIT_FOR = {
    Outcome.SUCCEEDED: EXIT_OK,
    Outcome.BLOCKED: EXIT_BLOCKED,
    Outcome.AWAITING_APPROVAL: EXIT_BLOCKED,
    Outcome.STOPPED: EXIT_BLOCKED,
    Outcome.FAILED: EXIT_ERROR,
    Outcome.BUSY: EXIT_BLOCKED,
}


class ProgressLine:
    """A one-line progress display on a terminal; silent when stderr is not one."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.shown = False

    def __call__(self, phase: str, done: int, total: int, run_id: str | None) -> None:
        if not self.enabled:
            return
        if total:
            width = 30
            filled = width * done // max(total, 1)
            bar = "#" * filled + "-" * (width - filled)
            text = f"\r{phase:8} [{bar}] {done:,}/{total:,}"
        else:
            text = f"\r{phase:8} {done:,} builds"
        self.stream.write(text)
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def _status_json(cleanup: DeploymentCleanup, result: RunResult) -> str:
    status = build_status(
        generation=cleanup.metadata.generation,
        now=utc_now(),
        outcome=str(result.outcome),
        message=result.message,
        plan=result.plan,
        run=result.run,
        history=[] if result.run is None else [result.run],
    )
    return json.dumps(status, indent=2, sort_keys=False)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deployment-cleanup",
        description="Plan, apply and restore deployment cleanups; never archives a live build.",
        epilog="Exit codes: 0 success, 1 error, 2 usage, 3 refused by a safety check.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-f", "--file", required=True, type=Path, help="DeploymentCleanup YAML")
        p.add_argument("-o", "--output", choices=("table", "json"), default="table")
        p.add_argument(
            "--secrets-dir",
            type=Path,
            help="folder laid out like mounted Secrets: <dir>/<secret name>/<key>; "
            "otherwise DEPLOYMENT_CLEANUP_SECRET_<NAME>_<KEY> variables",
        )

    p = sub.add_parser("plan", help="classify every build and record a plan; changes no build")
    common(p)
    p = sub.add_parser("apply", help="archive an approved plan (or resume an interrupted apply)")
    common(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--plan-id", help="the plan id you approved; refused if the data changed since"
    )
    group.add_argument(
        "--approve-current-plan",
        action="store_true",
        help="approve whatever plan is current, only if every check passes",
    )
    p = sub.add_parser("restore", help="return a run's archived builds to their previous status")
    common(p)
    p.add_argument("--run", required=True, help="the run id (see the runs command)")
    p.add_argument("--build", action="append", help="restore only this build (repeatable)")
    p = sub.add_parser("runs", help="list the recorded runs of a cleanup")
    common(p)
    p = sub.add_parser("validate", help="check a DeploymentCleanup file and exit")
    p.add_argument("-f", "--file", required=True, type=Path)
    p = sub.add_parser("operator", help="run the Kubernetes operator (kopf) in the foreground")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "-n", "--namespace", action="append", help="watch this namespace (repeatable)"
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    p.add_argument("--standalone", action="store_true", help="no peering: for one replica only")
    p.add_argument("--peering", default="deployment-cleanup", help="kopf peering object name")
    p.add_argument("--priority", type=int, default=0, help="peering priority: the highest one acts")
    p.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="kopf health endpoint")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (0: off; default 8080)")
    p.add_argument(
        "--identity", help="this replica's name in the archive lock (default: host name)"
    )
    p.add_argument(
        "--tick-seconds", type=float, help="reconcile interval per resource (default 15)"
    )
    p.add_argument("--kill-switch", metavar="NAMESPACE/NAME", help="the kill-switch ConfigMap")
    p.add_argument(
        "--static-discovery",
        action="store_true",
        help="serve the resources and namespaces found at start; no cluster-wide watch of "
        "CRDs and Namespaces (so no RBAC for them is needed)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("demo", help="replay the incident on an embedded SQLite database")
    p.add_argument(
        "--dir", type=Path, default=Path("demo-data"), help="where the demo database goes"
    )
    return parser


async def _run(
    args: argparse.Namespace, cleanup: DeploymentCleanup, conns: Connections
) -> RunResult:
    progress = ProgressLine(sys.stderr)
    try:
        if args.command == "plan":
            return await plan_and_record(conns, utc_now(), progress)
        if args.command == "apply":
            request = _approval(cleanup, args.plan_id, args.approve_current_plan)
            return await apply(conns, request, progress=progress)
        if args.command == "restore":
            return await restore(conns, args.run, args.build, utc_now())
        raise AssertionError(args.command)
    finally:
        progress.close()


def _approval(
    cleanup: DeploymentCleanup, plan_id: str | None, approve_current: bool
) -> ApplyRequest:
    """The flags win; without them, the spec's approval applies, as it does in the operator."""
    if plan_id is not None or approve_current:
        return ApplyRequest(approved_plan_id=plan_id, approve_current=approve_current)
    approval = cleanup.spec.approval
    return ApplyRequest(
        approved_plan_id=approval.approved_plan_id,
        approve_current=approval.approved_plan_id is None
        and approval.mode is ApprovalMode.AUTOMATIC,
    )


def _list_runs(conns: Connections, output: str, out: TextIO) -> None:
    conns.store.ensure_tables()
    runs = conns.store.list_runs(conns.cleanup.key)
    if output == "json":
        out.write(json.dumps([run_summary(r) for r in runs], indent=2) + "\n")
        return
    rows = [
        (
            r.id,
            r.kind,
            r.state,
            r.plan_id,
            r.candidates,
            r.archived,
            r.skipped,
            r.restored,
            r.started_at.isoformat(),
        )
        for r in runs
    ]
    header = (
        "RUN",
        "KIND",
        "STATE",
        "PLAN",
        "CANDIDATES",
        "ARCHIVED",
        "SKIPPED",
        "RESTORED",
        "STARTED",
    )
    out.write("\n".join(table(rows, header)) + "\n")


def _run_operator(args: argparse.Namespace) -> int:
    """Settings go through the environment, where OperatorConfig reads them at import."""
    env = {
        "DEPLOYMENT_CLEANUP_METRICS_PORT": args.metrics_port,
        "DEPLOYMENT_CLEANUP_IDENTITY": args.identity,
        "DEPLOYMENT_CLEANUP_TICK_SECONDS": args.tick_seconds,
        "DEPLOYMENT_CLEANUP_STATIC_DISCOVERY": "true" if args.static_discovery else None,
    }
    if args.kill_switch:
        namespace, _, name = args.kill_switch.partition("/")
        env |= {
            "DEPLOYMENT_CLEANUP_KILL_SWITCH_NAMESPACE": namespace,
            "DEPLOYMENT_CLEANUP_KILL_SWITCH_NAME": name,
        }
    os.environ.update({k: str(v) for k, v in env.items() if v is not None})
    import kopf  # noqa: PLC0415 (only the operator needs kopf installed)

    from . import handlers  # noqa: F401, PLC0415 (registers the handlers with kopf)

    kopf.configure(verbose=args.verbose)
    if not args.verbose:  # one line per timer tick is noise; failures still show
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness,
        clusterwide=args.all_namespaces,
        namespaces=args.namespace or (),
    )
    return EXIT_OK


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return run_demo(args.dir, out)
    if args.command == "operator":
        return _run_operator(args)
    redact = Redactor()
    say: Callable[[str], Any] = lambda text: err.write(redact(text) + "\n")  # noqa: E731
    try:
        cleanup = load_cleanup(args.file.read_text())
    except OSError as exc:
        say(f"error: cannot read {args.file}: {exc.strerror}")
        return EXIT_ERROR
    except SpecError as exc:
        say(f"error: {args.file}: {exc}")
        return EXIT_ERROR
    if args.command == "validate":
        out.write(f"{args.file}: valid DeploymentCleanup {cleanup.key}\n")
        return EXIT_OK
    try:
        conns = connect(cleanup, EnvironmentSecrets(args.secrets_dir), redact)
    except ConfigurationError as exc:
        say(f"error: {exc}")
        return EXIT_ERROR
    try:
        if args.command == "runs":
            _list_runs(conns, args.output, out)
            return EXIT_OK
        result = asyncio.run(_run(args, cleanup, conns))
    except (ConfigurationError, ValueError) as exc:
        say(f"error: {exc}")
        return EXIT_ERROR
    except Exception as exc:  # an error must reach the user as text, never with a secret in it
        say(f"error: {type(exc).__name__}: {exc}")
        return EXIT_ERROR
    finally:
        conns.close()
    out.write(
        redact(_status_json(cleanup, result) if args.output == "json" else render_result(result))
        + "\n"
    )
    return _EXIT_FOR[result.outcome]


if __name__ == "__main__":
    raise SystemExit(main())
