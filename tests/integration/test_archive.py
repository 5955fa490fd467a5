"""Apply, re-check, audit, resume, fencing and restore on real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import insert, update

from deployment_cleanup.archive import FencingLost, LockHeld
from deployment_cleanup.planning import VerdictReason
from deployment_cleanup.runs import (
    ApplyRequest,
    Outcome,
    RunRow,
    apply,
    plan_and_record,
    plan_and_record_run,
    restore,
    utc_now,
)
from deployment_cleanup.runstate import RunKind, RunState
from deployment_cleanup.seed import reference_tables
from tests.integration.conftest import OpenConnections
from tests.support.inventory import Seeded, loose_cleanup, recorded_candidates, run, seed

TABLES = reference_tables()


def _cleanup(seeded: Seeded, **spec: Any):  # type: ignore[no-untyped-def]
    return loose_cleanup(seeded.url, {"sql": {}, "batchSize": 40}, **spec)


def test_apply_archives_exactly_the_approved_candidates_with_an_audit_record(
    database_url: str, connections: OpenConnections
) -> None:
    seeded = seed(database_url)
    before = seeded.statuses()
    conns = connections(_cleanup(seeded))
    planned = run(plan_and_record(conns, utc_now()))
    assert planned.plan is not None
    assert planned.plan.ready
    assert seeded.statuses() == before  # planning changes no build

    result = run(apply(conns, ApplyRequest(approved_plan_id=planned.plan.id)))
    assert result.outcome is Outcome.SUCCEEDED, result.message
    expected = seeded.expected_candidates()
    assert expected
    assert seeded.archived() == expected
    assert not seeded.archived() & seeded.live()
    after = seeded.statuses()
    assert {b: s for b, s in after.items() if b not in expected} == {
        b: s for b, s in before.items() if b not in expected
    }

    audit = conns.store.audit_rows(result.run.id)  # type: ignore[union-attr]
    assert sorted(int(a["build_id"]) for a in audit) == sorted(expected)
    row = audit[0]
    assert row["action"] == "archive"
    assert row["new_status"] == "archived"
    assert row["previous_status"] == before[int(row["build_id"])]
    assert '"classification": "notRouted"' in row["evidence"]
    assert row["fencing_token"] >= 1


def test_restore_returns_a_whole_run_and_is_idempotent(
    database_url: str, connections: OpenConnections
) -> None:
    seeded = seed(database_url)
    before = seeded.statuses()
    conns = connections(_cleanup(seeded))
    applied = run(apply(conns, ApplyRequest(approved_plan_id=None, approve_current=True)))
    assert applied.run is not None
    assert applied.run.archived > 0

    restored = run(restore(conns, applied.run.id, None, utc_now()))
    assert restored.restore is not None
    assert restored.restore.restored == applied.run.archived
    assert seeded.statuses() == before
    again = run(restore(conns, applied.run.id, None, utc_now()))
    assert again.restore is not None
    assert (again.restore.restored, again.restore.already_restored) == (0, applied.run.archived)
    assert seeded.statuses() == before


def test_restore_of_chosen_builds_and_of_builds_someone_changed(
    sqlite_url: str, connections: OpenConnections
) -> None:
    seeded = seed(sqlite_url)
    before = seeded.statuses()
    conns = connections(_cleanup(seeded))
    applied = run(apply(conns, ApplyRequest(approved_plan_id=None, approve_current=True)))
    assert applied.run is not None
    chosen, touched, *_ = sorted(seeded.archived())
    with seeded.engine.begin() as conn:
        conn.execute(
            update(TABLES.builds).where(TABLES.builds.c.id == touched).values(status="deleted")
        )

    one = run(restore(conns, applied.run.id, [str(chosen)], utc_now()))
    assert one.restore is not None
    assert one.restore.restored == 1
    assert seeded.statuses()[chosen] == before[chosen]
    rest = run(restore(conns, applied.run.id, None, utc_now()))
    assert rest.restore is not None
    assert rest.restore.conflicts.keys() == {str(touched)}
    assert seeded.statuses()[touched] == "deleted"  # someone else's change is left alone
    with pytest.raises(ValueError, match="not in run"):
        run(restore(conns, applied.run.id, ["999999"], utc_now()))


def _start_apply(conns: Any, seeded: Seeded) -> Any:
    """An apply that was recorded and then interrupted before any batch was written."""

    async def go() -> Any:
        await asyncio.to_thread(conns.store.ensure_tables)
        plan, _, record = await plan_and_record_run(
            conns,
            utc_now(),
            None,
            "pending",
            lambda plan: RunRow(RunKind.APPLY, RunState.APPLYING, "applying"),
        )
        return plan, record

    return run(go())


def test_each_build_is_rechecked_just_before_it_is_archived(
    database_url: str, connections: OpenConnections
) -> None:
    seeded = seed(database_url)
    conns = connections(_cleanup(seeded, execution={"batchSize": 25, "canaryBatchSize": 25}))
    plan, _ = _start_apply(conns, seeded)
    first = [d.build for d in plan.candidates[:6]]
    became_active, got_routed, status_changed = first[0], first[2], first[4]
    with seeded.engine.begin() as conn:
        conn.execute(
            update(TABLES.projects)
            .where(TABLES.projects.c.id == became_active.project_id)
            .values(active_build_id=became_active.id)
        )
        conn.execute(
            insert(TABLES.routes).values(build_id=got_routed.id, hostname="late.example.test")
        )
        conn.execute(
            update(TABLES.builds)
            .where(TABLES.builds.c.id == status_changed.id)
            .values(status="pinned")
        )

    result = run(apply(conns, ApplyRequest(approved_plan_id=None)))
    archived = seeded.archived()
    assert became_active.id not in archived
    assert got_routed.id not in archived
    assert seeded.statuses()[status_changed.id] == "pinned"
    # The canary batch held changed builds: the run stops for a fresh plan.
    assert result.outcome is Outcome.STOPPED
    assert "canary" in result.message
    assert not result.stopped_on_request  # its own check: not held for the kill switch
    skipped = {i.build_id: i for i in conns.store.pending_items(result.run.id, 1000)}  # type: ignore[union-attr]
    assert not skipped.keys() & {str(b.id) for b in first}


def test_skip_reasons_are_recorded(sqlite_url: str, connections: OpenConnections) -> None:
    seeded = seed(sqlite_url)
    conns = connections(_cleanup(seeded))
    plan, record = _start_apply(conns, seeded)
    victim = plan.candidates[0].build
    with seeded.engine.begin() as conn:
        conn.execute(
            update(TABLES.projects)
            .where(TABLES.projects.c.id == victim.project_id)
            .values(active_build_id=victim.id)
        )
    batch = conns.store.pending_items(record.id, 3)
    fence = conns.store.acquire_lock(conns.cleanup.key, "me", timedelta(minutes=1), utc_now())
    result = conns.store.archive_batch(
        record.id,
        batch,
        routed_now=set(),
        fence=fence,
        now=utc_now(),
        routes_guard=conns.routes_guard,
    )
    assert result.skipped == {str(victim.id): "it became its project's active build"}
    assert len(result.archived) == 2


def test_interrupted_apply_resumes_without_rearchiving_or_leaving_the_plan(
    database_url: str, connections: OpenConnections
) -> None:
    seeded = seed(database_url)
    conns = connections(_cleanup(seeded))
    _, record = _start_apply(conns, seeded)
    fence = conns.store.acquire_lock(
        conns.cleanup.key, "crashed-process", timedelta(seconds=0), utc_now()
    )
    first = conns.store.pending_items(record.id, 5)
    conns.store.archive_batch(record.id, first, routed_now=set(), fence=fence, now=utc_now())
    # The process dies here. New data arrives that a fresh plan would include:
    with seeded.engine.begin() as conn:
        conn.execute(update(TABLES.routes).values(hostname="moved.example.test"))

    result = run(apply(conns, ApplyRequest(approved_plan_id=None)))
    assert result.outcome is Outcome.SUCCEEDED, result.message
    assert result.run is not None
    assert result.run.id == record.id
    planned = set(recorded_candidates(conns.store, record.id))
    assert seeded.archived() == planned
    audit = conns.store.audit_rows(record.id)
    assert len(audit) == len({a["build_id"] for a in audit}) == len(planned)


def test_a_stale_approval_is_refused_after_the_data_changed(
    database_url: str, connections: OpenConnections
) -> None:
    seeded = seed(database_url)
    before = seeded.statuses()
    conns = connections(_cleanup(seeded))
    planned = run(plan_and_record(conns, utc_now()))
    assert planned.plan is not None
    candidate = planned.plan.candidates[0].build
    with seeded.engine.begin() as conn:
        conn.execute(
            insert(TABLES.routes).values(build_id=candidate.id, hostname="rollback.example.test")
        )

    result = run(apply(conns, ApplyRequest(approved_plan_id=planned.plan.id)))
    assert result.outcome is Outcome.AWAITING_APPROVAL
    assert planned.plan.id in result.message
    assert result.plan is not None
    assert result.plan.id in result.message
    assert seeded.statuses() == before


def test_rerunning_an_apply_changes_nothing_more(
    sqlite_url: str, connections: OpenConnections
) -> None:
    seeded = seed(sqlite_url)
    conns = connections(_cleanup(seeded))
    first = run(apply(conns, ApplyRequest(approved_plan_id=None, approve_current=True)))
    assert first.outcome is Outcome.SUCCEEDED
    assert first.plan is not None
    after_first = seeded.statuses()
    second = run(apply(conns, ApplyRequest(approved_plan_id=first.plan.id)))
    # The old id is stale now, but what is left needs no approval: nothing is eligible.
    assert second.outcome is Outcome.SUCCEEDED
    assert second.plan is not None
    assert second.plan.reason is VerdictReason.NOTHING_TO_ARCHIVE
    assert seeded.statuses() == after_first


def test_a_stale_fencing_token_cannot_write(
    database_url: str, connections: OpenConnections
) -> None:
    seeded = seed(database_url)
    conns = connections(_cleanup(seeded))
    _, record = _start_apply(conns, seeded)
    now = utc_now()
    stale = conns.store.acquire_lock(conns.cleanup.key, "replica-a", timedelta(seconds=5), now)
    with pytest.raises(LockHeld, match="replica-a"):
        conns.store.acquire_lock(conns.cleanup.key, "replica-b", timedelta(seconds=5), now)
    fresh = conns.store.acquire_lock(
        conns.cleanup.key, "replica-b", timedelta(seconds=5), now + timedelta(seconds=6)
    )
    assert fresh.token == stale.token + 1
    before = seeded.statuses()
    with pytest.raises(FencingLost):
        conns.store.archive_batch(
            record.id,
            conns.store.pending_items(record.id, 5),
            routed_now=set(),
            fence=stale,
            now=utc_now(),
        )
    assert seeded.statuses() == before
    assert len(conns.store.pending_items(record.id, 10_000)) == record.candidates


def test_apply_refuses_while_another_process_holds_the_lease(
    sqlite_url: str, connections: OpenConnections
) -> None:
    seeded = seed(sqlite_url)
    conns = connections(_cleanup(seeded))
    _start_apply(conns, seeded)
    conns.store.acquire_lock(conns.cleanup.key, "other-replica", timedelta(minutes=5), utc_now())
    before = seeded.statuses()
    result = run(apply(conns, ApplyRequest(approved_plan_id=None)))
    assert result.outcome is Outcome.BUSY
    assert "other-replica" in result.message
    assert seeded.statuses() == before


def test_a_stop_request_halts_the_apply_between_batches(
    sqlite_url: str, connections: OpenConnections
) -> None:
    seeded = seed(sqlite_url)
    conns = connections(_cleanup(seeded, execution={"batchSize": 10, "canaryBatchSize": 3}))
    batches = 0

    def stop_after_two() -> str | None:
        nonlocal batches
        batches += 1
        return "kill switch is on" if batches > 2 else None

    request = ApplyRequest(
        approved_plan_id=None, approve_current=True, stop_requested=stop_after_two
    )
    result = run(apply(conns, request))
    assert result.outcome is Outcome.STOPPED
    assert "kill switch" in result.message
    assert result.stopped_on_request
    assert len(seeded.archived()) == 3 + 10  # the canary, then one full batch


def test_blocked_plan_is_recorded_and_does_not_count_as_successful(
    sqlite_url: str, connections: OpenConnections
) -> None:
    seeded = seed(sqlite_url)
    strict = {"maxArchivedPerRun": 1, "maxArchivedPercent": 100, "maxArchivedPerProject": 100}
    conns = connections(_cleanup(seeded, safety=strict))
    result = run(apply(conns, ApplyRequest(approved_plan_id=None, approve_current=True)))
    assert result.outcome is Outcome.BLOCKED
    assert "maxArchivedPerRun" in result.message
    assert seeded.archived() == set()
    assert conns.store.last_successful_reference(conns.cleanup.key) is None
