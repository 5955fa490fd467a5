"""The operator's pure decision: what to do on this tick, and why."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from deployment_cleanup.reconcile import RESTORE_ANNOTATION, Action, failure_backoff, next_step
from deployment_cleanup.spec import CleanupSpec
from tests.support.documents import cleanup

NOW = datetime(2026, 12, 4, 3, 5, tzinfo=UTC)
CREATED = datetime(2026, 11, 1, tzinfo=UTC)


def spec(**sections: Any) -> CleanupSpec:
    return cleanup(**sections).spec


def step(
    s: CleanupSpec,
    status: dict[str, Any] | None = None,
    *,
    generation: int = 1,
    annotations: dict[str, str] | None = None,
    now: datetime = NOW,
    kill_switch: bool = False,
):  # type: ignore[no-untyped-def]
    return next_step(
        s,
        generation=generation,
        created=CREATED,
        status=status or {},
        annotations=annotations or {},
        now=now,
        kill_switch=kill_switch,
    )


def test_without_a_schedule_each_generation_gets_one_run() -> None:
    s = spec()
    assert step(s).action is Action.PLAN
    assert step(s, {"observedGeneration": 1}).action is Action.NONE
    assert step(s, {"observedGeneration": 1}, generation=2).action is Action.PLAN


def test_apply_mode_carries_the_approval_from_the_spec() -> None:
    s = spec(mode="Apply", approval={"approvedPlanId": "p-0123456789abcdef"})
    result = step(s)
    assert result.action is Action.APPLY
    assert result.approved_plan_id == "p-0123456789abcdef"
    assert not result.approve_current
    automatic = step(spec(mode="Apply", approval={"mode": "Automatic"}))
    assert automatic.approve_current
    manual = step(spec(mode="Apply"))
    assert (manual.action, manual.approved_plan_id, manual.approve_current) == (
        Action.APPLY,
        None,
        False,
    )


def test_the_kill_switch_turns_an_apply_into_a_plan() -> None:
    result = step(spec(mode="Apply", approval={"mode": "Automatic"}), kill_switch=True)
    assert result.action is Action.PLAN
    assert "kill switch" in result.reason


NIGHTLY = {"cron": "0 3 * * *", "timeZone": "UTC", "startingDeadline": "1h"}


def test_a_due_scheduled_slot_runs_once() -> None:
    s = spec(mode="Apply", approval={"mode": "Automatic"}, schedule=NIGHTLY)
    status = {"observedGeneration": 1, "schedule": {"lastScheduleTime": "2026-12-03T03:00:00Z"}}
    result = step(s, status)
    assert result.action is Action.APPLY
    assert result.slot == datetime(2026, 12, 4, 3, 0, tzinfo=UTC)
    assert result.next_schedule_time == datetime(2026, 12, 5, 3, 0, tzinfo=UTC)
    done = status | {"schedule": {"lastScheduleTime": "2026-12-04T03:00:00Z"}}
    assert step(s, done).action is Action.NONE


def test_a_slot_missed_beyond_the_starting_deadline_is_skipped_not_run() -> None:
    s = spec(schedule=NIGHTLY)
    status = {"observedGeneration": 1, "schedule": {"lastScheduleTime": "2026-12-03T03:00:00Z"}}
    late = step(s, status, now=datetime(2026, 12, 4, 4, 30, tzinfo=UTC))
    assert late.action is Action.SKIP_MISSED
    assert late.slot == datetime(2026, 12, 4, 3, 0, tzinfo=UTC)


def test_time_zones_decide_when_a_slot_is_due() -> None:
    berlin = spec(schedule={"cron": "0 3 * * *", "timeZone": "Europe/Berlin"})
    status = {"observedGeneration": 1, "schedule": {"lastScheduleTime": "2026-12-03T02:00:00Z"}}
    assert step(berlin, status, now=datetime(2026, 12, 4, 2, 10, tzinfo=UTC)).slot == datetime(
        2026, 12, 4, 2, 0, tzinfo=UTC
    )  # 03:00 in Berlin is 02:00 UTC in winter


def test_suspended_schedule_does_nothing() -> None:
    s = spec(schedule=NIGHTLY | {"suspend": True})
    status = {"observedGeneration": 1, "schedule": {"lastScheduleTime": "2026-12-01T03:00:00Z"}}
    assert step(s, status).action is Action.NONE


def test_with_a_schedule_a_spec_change_plans_but_never_archives_unless_approved() -> None:
    s = spec(mode="Apply", approval={"mode": "Automatic"}, schedule=NIGHTLY)
    assert step(s, {"observedGeneration": 1}, generation=2).action is Action.PLAN
    approved = spec(
        mode="Apply", approval={"approvedPlanId": "p-0123456789abcdef"}, schedule=NIGHTLY
    )
    assert step(approved, {"observedGeneration": 1}, generation=2).action is Action.APPLY


def test_restore_annotation_runs_once_per_run_id() -> None:
    s = spec()
    ann = {RESTORE_ANNOTATION: "r-20261204T030000-abc123"}
    assert step(s, {"observedGeneration": 1}, annotations=ann).action is Action.RESTORE
    done = {"observedGeneration": 1, "lastRestore": {"runId": "r-20261204T030000-abc123"}}
    assert step(s, done, annotations=ann).action is Action.NONE


@pytest.mark.parametrize(("failures", "seconds"), [(1, 30), (2, 60), (3, 120), (10, 1800)])
def test_failures_back_off_exponentially_up_to_half_an_hour(failures: int, seconds: int) -> None:
    assert failure_backoff(failures) == timedelta(seconds=seconds)


def test_a_failed_generation_is_retried_after_the_backoff_only() -> None:
    s = spec()
    status = {
        "observedGeneration": 0,
        "failure": {"generation": 1, "nextAttemptAt": "2026-12-04T03:10:00Z"},
    }
    assert step(s, status).action is Action.NONE
    assert step(s, status, now=datetime(2026, 12, 4, 3, 11, tzinfo=UTC)).action is Action.PLAN


def test_an_apply_held_back_by_the_kill_switch_runs_once_it_is_off() -> None:
    # The switch fails closed while the API server is away, so an outage alone can hold an
    # apply back; without a schedule it must not stay a plan for the rest of the generation.
    s = spec(mode="Apply", approval={"mode": "Automatic"})
    held = {"observedGeneration": 1, "heldApply": {"generation": 1}}
    assert step(s, held, kill_switch=True).action is Action.NONE
    resumed = step(s, held)
    assert (resumed.action, resumed.approve_current) == (Action.APPLY, True)
    assert "held back" in resumed.reason
    # Held back in an older generation, or not at all: this generation is done.
    assert (
        step(s, {"observedGeneration": 2, "heldApply": {"generation": 1}}, generation=2).action
        is Action.NONE
    )
    assert step(s, {"observedGeneration": 1, "heldApply": None}).action is Action.NONE
    # A plan-only spec never applies, held or not.
    assert step(spec(), held).action is Action.NONE
    # With a schedule the next slot runs it, not the switch turning off.
    scheduled = spec(mode="Apply", schedule={"cron": "0 3 * * *"})
    status = held | {"schedule": {"lastScheduleTime": "2026-12-04T03:00:00Z"}}
    assert step(scheduled, status).action is Action.NONE


def test_a_plan_made_instead_of_an_apply_is_marked_held() -> None:
    s = spec(mode="Apply", approval={"mode": "Automatic"})
    assert step(s, kill_switch=True).held_by_kill_switch
    assert not step(s).held_by_kill_switch
    assert not step(spec(), kill_switch=True).held_by_kill_switch  # Plan mode asked for a plan
