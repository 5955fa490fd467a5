"""Plans and runs as the status object of a DeploymentCleanup. Pure.

The CLI prints exactly this object with ``--output json`` and the operator
writes it to the resource's status subresource. It is bounded whatever the
inventory size: samples and lists are capped and messages truncated; the full
per-build evidence lives in the audit store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from .planning import Plan, Verdict
from .runstate import RunKind, RunRecord, RunState

__all__ = [
    "HISTORY_LIMIT",
    "MESSAGE_LIMIT",
    "build_status",
    "condition",
    "plan_summary",
    "ready_reason",
    "run_summary",
    "timestamp",
]

MESSAGE_LIMIT = 1024
HISTORY_LIMIT = 10
FAILED_BATCHES_SHOWN = 10
CANDIDATES_SHOWN = 20


def timestamp(value: datetime) -> str:
    """RFC 3339 in UTC with a Z, as Kubernetes writes times. Naive values are taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(text: str, limit: int = MESSAGE_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plan_summary(plan: Plan, computed_at: datetime) -> dict[str, Any]:
    failed = plan.failed_receipts
    return {
        "id": plan.id,
        "verdict": str(plan.verdict),
        "reason": str(plan.reason),
        "message": _short(plan.message),
        "computedAt": timestamp(computed_at),
        "counts": dict(plan.counts),
        "keepReasons": {k: v for k, v in plan.keep_reasons.items() if v},
        "projectIssues": {k: v for k, v in plan.project_issues.items() if v},
        "referenceCount": plan.reference.total,
        "referenceSet": {"active": plan.reference.active, "routed": plan.reference.routed},
        "thresholds": [
            {"name": t.name, "limit": t.limit, "actual": t.actual, "passed": t.passed}
            | ({"note": t.note} if t.note else {})
            for t in plan.thresholds
        ],
        "lookups": {
            "batches": len(plan.receipts),
            "ok": len(plan.receipts) - len(failed),
            "failed": len(failed),
            "failedBatches": [
                {
                    "index": r.index,
                    "size": r.size,
                    "attempts": r.attempts,
                    "error": _short(r.error or "", 300),
                }
                for r in failed[:FAILED_BATCHES_SHOWN]
            ],
        },
        "candidatesSample": [
            {
                "build": str(d.build.id),
                "project": str(d.build.project_id),
                "status": d.build.status,
                "createdAt": None if d.build.created_at is None else timestamp(d.build.created_at),
            }
            for d in plan.candidates[:CANDIDATES_SHOWN]
        ],
        "samples": {k: list(v) for k, v in plan.samples.items() if v},
    }


def run_summary(run: RunRecord) -> dict[str, Any]:
    return {
        "id": run.id,
        "kind": str(run.kind),
        "state": str(run.state),
        "planId": run.plan_id,
        "startedAt": timestamp(run.started_at),
        "finishedAt": None if run.finished_at is None else timestamp(run.finished_at),
        "candidates": run.candidates,
        "archived": run.archived,
        "skipped": run.skipped,
        "restored": run.restored,
        "pending": run.pending if run.state is RunState.APPLYING else 0,
        "message": _short(run.message),
    }


def condition(
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int,
    previous: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A Kubernetes condition; lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
    since = timestamp(now)
    for old in previous:
        if (
            old.get("type") == type_
            and old.get("status") == value
            and old.get("lastTransitionTime")
        ):
            since = str(old["lastTransitionTime"])
    return {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": _short(message),
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def ready_reason(outcome: str, plan: Plan | None, run: RunRecord | None) -> str:
    """The most telling CamelCase reason for the Ready condition (the REASON column)."""
    if outcome == "Succeeded" and run is not None and run.kind is RunKind.APPLY:
        return "Applied"
    if outcome in ("Succeeded", "Blocked") and plan is not None:
        return str(plan.reason)
    return outcome


def build_status(
    *,
    generation: int,
    now: datetime,
    outcome: str,
    message: str,
    plan: Plan | None,
    run: RunRecord | None,
    history: Sequence[RunRecord] = (),
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole status object after a run.

    ``outcome`` is the run's outcome (Succeeded, Blocked, AwaitingApproval,
    Stopped, Failed) and decides the Ready condition; ``plan`` fills the
    lookup and safety conditions when a plan was made.
    """
    old = previous or {}
    old_conditions = list(old.get("conditions") or [])
    conditions = [
        condition(
            "Ready",
            outcome == "Succeeded",
            ready_reason(outcome, plan, run),
            message,
            now,
            generation,
            old_conditions,
        )
    ]
    if plan is not None:
        failed = plan.failed_receipts
        conditions.append(
            condition(
                "LookupsComplete",
                not failed,
                "AllLookupsSucceeded" if not failed else "LookupsIncomplete",
                f"{len(plan.receipts)} lookup batches answered"
                if not failed
                else f"{len(failed)} of {len(plan.receipts)} lookup batches failed",
                now,
                generation,
                old_conditions,
            )
        )
        broken = [t.name for t in plan.thresholds if not t.passed]
        checks_ok = not broken and not plan.invariant_violations
        reason = (
            "ChecksPassed"
            if checks_ok
            else "InvariantViolated"
            if plan.invariant_violations
            else "ThresholdExceeded"
        )
        conditions.append(
            condition(
                "SafetyChecksPassed",
                checks_ok,
                reason,
                "every threshold passed"
                if checks_ok
                else "failed: "
                + ", ".join(broken + (["invariants"] if plan.invariant_violations else [])),
                now,
                generation,
                old_conditions,
            )
        )
    awaiting = outcome == "AwaitingApproval"
    conditions.append(
        condition(
            "AwaitingApproval",
            awaiting,
            "AwaitingApproval" if awaiting else "NotAwaiting",
            message if awaiting else "no plan is waiting for approval",
            now,
            generation,
            old_conditions,
        )
    )

    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": conditions,
        "plan": None if plan is None else plan_summary(plan, now),
        "run": None if run is None else run_summary(run),
        "lastSuccessfulRun": old.get("lastSuccessfulRun"),
        "history": [
            {
                "id": r.id,
                "kind": str(r.kind),
                "state": str(r.state),
                "planId": r.plan_id,
                "startedAt": timestamp(r.started_at),
                "archived": r.archived,
                "skipped": r.skipped,
            }
            for r in history[:HISTORY_LIMIT]
        ],
    }
    if (
        plan is not None
        and plan.verdict is Verdict.READY
        and run is not None
        and run.state
        in (
            RunState.PLANNED,
            RunState.SUCCEEDED,
        )
    ):
        status["lastSuccessfulRun"] = {
            "id": run.id,
            "planId": plan.id,
            "finishedAt": timestamp(now),
            "referenceCount": plan.reference.total,
        }
    return status
