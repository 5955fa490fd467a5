"""What the operator should do next for one DeploymentCleanup. Pure.

The operator calls :func:`next_step` on every tick with the resource as it is
now (spec, generation, status, annotations) and acts on the answer. Being
level-based, the same inputs give the same step, and a step that is repeated
(after a crash, or by a second replica) is harmless: the engine resumes or
re-plans, and the archive lock keeps two writers apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from cronsim import CronSim

from .spec import ApprovalMode, CleanupSpec, Mode, ScheduleSpec

__all__ = [
    "RESTORE_ANNOTATION",
    "Action",
    "Step",
    "failure_backoff",
    "next_schedule_time",
    "next_step",
    "parse_time",
]

RESTORE_ANNOTATION = "deployment-cleanup.dev/restore-run"
# A schedule that was not looked at for longer than this starts counting from
# here; it bounds the cron walk after a long outage.
SCHEDULE_LOOKBACK = timedelta(days=7)


class Action(StrEnum):
    NONE = "None"
    PLAN = "Plan"
    APPLY = "Apply"
    RESTORE = "Restore"
    SKIP_MISSED = "SkipMissed"


@dataclass(frozen=True, slots=True)
class Step:
    action: Action
    reason: str
    # The cron slot this run fills (or the missed slot being skipped).
    slot: datetime | None = None
    next_schedule_time: datetime | None = None
    restore_run: str | None = None
    approved_plan_id: str | None = None
    approve_current: bool = False
    # An apply that the kill switch turned into a plan: recorded, and run once it is off.
    held_by_kill_switch: bool = False


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 time from status (``...Z``), or None."""
    if not isinstance(value, str) or not value:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _slots(schedule: ScheduleSpec, after: datetime) -> CronSim:
    zone = ZoneInfo(schedule.time_zone)
    return CronSim(schedule.cron, after.astimezone(zone))


def next_schedule_time(schedule: ScheduleSpec, now: datetime) -> datetime:
    return next(_slots(schedule, now)).astimezone(UTC)


def _latest_slot(schedule: ScheduleSpec, since: datetime, now: datetime) -> datetime | None:
    """The newest cron slot in (since, now], or None."""
    latest = None
    for slot in _slots(schedule, max(since, now - SCHEDULE_LOOKBACK)):
        if slot > now:
            break
        latest = slot
    return None if latest is None else latest.astimezone(UTC)


def failure_backoff(failures: int) -> timedelta:
    """Wait after the n-th consecutive failure: 30 s doubling, at most 30 minutes."""
    seconds = 30 * 2 ** min(max(failures - 1, 0), 10)
    return min(timedelta(seconds=seconds), timedelta(minutes=30))


def _run_step(
    spec: CleanupSpec, reason: str, slot: datetime | None, nxt: datetime | None, kill_switch: bool
) -> Step:
    if spec.mode is Mode.PLAN:
        return Step(Action.PLAN, reason, slot, nxt)
    if kill_switch:
        return Step(
            Action.PLAN,
            reason + "; the kill switch is on, so only a plan is made",
            slot,
            nxt,
            held_by_kill_switch=True,
        )
    approval = spec.approval
    return Step(
        Action.APPLY,
        reason,
        slot,
        nxt,
        approved_plan_id=approval.approved_plan_id,
        approve_current=approval.approved_plan_id is None
        and approval.mode is ApprovalMode.AUTOMATIC,
    )


def next_step(
    spec: CleanupSpec,
    *,
    generation: int,
    created: datetime,
    status: Mapping[str, Any],
    annotations: Mapping[str, str],
    now: datetime,
    kill_switch: bool,
) -> Step:
    """The one thing to do now, and why."""
    restore = annotations.get(RESTORE_ANNOTATION)
    last_restore = (status.get("lastRestore") or {}).get("runId")
    if restore and restore != last_restore:
        return Step(
            Action.RESTORE, f"annotation {RESTORE_ANNOTATION}={restore}", restore_run=restore
        )

    failure = status.get("failure") or {}
    retry_at = parse_time(failure.get("nextAttemptAt"))
    failed_generation = failure.get("generation")
    if retry_at is not None and now < retry_at and failed_generation == generation:
        return Step(Action.NONE, f"backing off after a failure until {retry_at.isoformat()}")

    schedule = spec.schedule
    nxt = None if schedule is None or schedule.suspend else next_schedule_time(schedule, now)
    if status.get("observedGeneration") != generation:
        reason = f"generation {generation} not yet reconciled"
        if schedule is None or spec.approval.approved_plan_id is not None:
            return _run_step(spec, reason, None, nxt, kill_switch)
        # With a schedule, a spec change alone never archives: it shows a fresh
        # plan, and archiving waits for the schedule or an approval.
        return Step(Action.PLAN, reason + "; archiving waits for the schedule", None, nxt)
    if retry_at is not None and failed_generation == generation:
        return _run_step(spec, "retrying after a failure", None, nxt, kill_switch)
    if schedule is None:
        held = (status.get("heldApply") or {}).get("generation") == generation
        if held and spec.mode is Mode.APPLY:
            # This generation's one apply was held back (planned only, or stopped between
            # batches) by the kill switch, possibly failing closed while the API server was
            # away: it runs once the switch is off. A schedule simply runs at its next slot.
            if kill_switch:
                return Step(Action.NONE, "the kill switch still holds back this generation's apply")
            return _run_step(
                spec, "the kill switch is off: running the apply it held back", None, nxt, False
            )
        return Step(Action.NONE, "no schedule: one run per spec generation, done")
    if schedule.suspend:
        return Step(Action.NONE, "the schedule is suspended")
    last = parse_time((status.get("schedule") or {}).get("lastScheduleTime")) or created
    slot = _latest_slot(schedule, last, now)
    if slot is None:
        return Step(Action.NONE, "waiting for the next scheduled time", next_schedule_time=nxt)
    if now - slot > schedule.starting_deadline:
        return Step(
            Action.SKIP_MISSED,
            f"missed the run due at {slot.isoformat()} by more than the starting deadline",
            slot,
            nxt,
        )
    return _run_step(spec, f"scheduled for {slot.isoformat()}", slot, nxt, kill_switch)
