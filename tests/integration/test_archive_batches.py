"""Archive and restore batches on SQLite and PostgreSQL: guards, audit, counters, statements.

On PostgreSQL a batch's guarded UPDATE, items, audit rows and counters are one statement; on
SQLite they are several. Both must leave the same result, and both must roll the whole batch
back rather than archive a build without its audit row.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, delete, event, insert, select, update

from deployment_cleanup import runs as runs_module
from deployment_cleanup.archive import PendingItem
from deployment_cleanup.runs import ApplyRequest, Connections, Outcome, apply, restore, utc_now
from deployment_cleanup.runstate import RunRecord
from deployment_cleanup.seed import reference_tables
from tests.integration.conftest import OpenConnections
from tests.support.inventory import Seeded, loose_cleanup, run, seed

TABLES = reference_tables()


def _cleanup(seeded: Seeded, **spec: Any):  # type: ignore[no-untyped-def]
    # Routing from the routes table in the builds database: the UPDATE re-checks it itself.
    return loose_cleanup(seeded.url, {"sql": {}, "batchSize": 40}, **spec)


def _applying(
    database_url: str, connections: OpenConnections
) -> tuple[Seeded, Connections, RunRecord]:
    """A seeded builds database and an apply of it recorded, with nothing archived yet."""
    seeded = seed(database_url)
    conns = connections(_cleanup(seeded))
    return seeded, conns, _recorded_apply(conns)


def _recorded_apply(conns: Connections) -> RunRecord:
    """An apply run with all its candidates recorded as pending and nothing archived yet."""
    stop = ApplyRequest(None, approve_current=True, stop_requested=lambda: "stopped by the test")
    result = run(apply(conns, stop))
    assert result.outcome is Outcome.STOPPED, result.message
    assert result.run is not None
    assert result.run.archived == result.run.skipped == 0
    return result.run


def _fence(conns: Connections, holder: str = "test") -> Any:
    return conns.store.acquire_lock(conns.cleanup.key, holder, timedelta(minutes=1), utc_now())


def _items(conns: Connections, run_id: str) -> dict[str, tuple[str, str | None]]:
    items = conns.store.items
    query = select(items.c.build_id, items.c.outcome, items.c.detail).where(
        items.c.run_id == run_id
    )
    with conns.engine.connect() as conn:
        return {b: (outcome, detail) for b, outcome, detail in conn.execute(query)}


@contextmanager
def _statements(engine: Engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(args[2].split(None, 1)[0].upper())

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_a_batch_of_several_statuses_is_archived_audited_and_counted_in_few_statements(
    database_url: str, connections: OpenConnections
) -> None:
    seeded, conns, record = _applying(database_url, connections)
    before = seeded.statuses()
    batch = conns.store.pending_items(record.id, 30)
    assert len({i.previous_status for i in batch}) > 1  # ready and failed builds together
    fence = _fence(conns)

    with _statements(conns.engine) as seen:
        result = conns.store.archive_batch(
            record.id,
            batch,
            routed_now=set(),
            fence=fence,
            now=utc_now(),
            routes_guard=conns.routes_guard,
        )

    assert result.archived == tuple(i.build_id for i in batch)  # plan order
    assert result.skipped == {}
    # A fixed number of statements per batch, whatever its size: the lease, then one statement
    # on PostgreSQL; one UPDATE per planned status, the audit rows, the items and the
    # counters on SQLite.
    if conns.engine.dialect.name == "postgresql":
        assert seen == ["UPDATE", "WITH"]
    else:
        assert len(seen) == 1 + len({i.previous_status for i in batch}) + 3
    assert seeded.archived() == {int(i.build_id) for i in batch}
    audit = conns.store.audit_rows(record.id)
    assert {a["build_id"]: a["previous_status"] for a in audit} == {
        i.build_id: before[int(i.build_id)] for i in batch
    }
    assert {a["fencing_token"] for a in audit} == {fence.token}
    assert {a["action"] for a in audit} == {"archive"}
    assert all('"classification": "notRouted"' in a["evidence"] for a in audit)
    outcomes = _items(conns, record.id)
    assert {b for b, (o, _) in outcomes.items() if o == "archived"} == {i.build_id for i in batch}
    counted = conns.store.get_run(record.id)
    assert counted is not None
    assert (counted.archived, counted.skipped) == (len(batch), 0)


def test_every_skip_reason_is_recorded_and_the_rest_of_the_batch_archived(
    database_url: str, connections: OpenConnections
) -> None:
    seeded, conns, record = _applying(database_url, connections)
    batch = conns.store.pending_items(record.id, 40)
    by_project: dict[str, list[PendingItem]] = {}
    for item in batch:
        by_project.setdefault(item.project_id, []).append(item)
    projects = iter(by_project.values())
    # One build of each of four projects changes, and a fifth project loses its active build.
    became_active, status_changed, routed_in_table, deleted = (next(projects)[0] for _ in range(4))
    orphaned = next(projects)
    routed_at_recheck = next(projects)[0]
    with seeded.engine.begin() as conn:
        conn.execute(
            update(TABLES.projects)
            .where(TABLES.projects.c.id == int(became_active.project_id))
            .values(active_build_id=int(became_active.build_id))
        )
        conn.execute(
            update(TABLES.builds)
            .where(TABLES.builds.c.id == int(status_changed.build_id))
            .values(status="pinned")
        )
        conn.execute(
            insert(TABLES.routes).values(
                build_id=int(routed_in_table.build_id), hostname="late.example.test"
            )
        )
        conn.execute(delete(TABLES.builds).where(TABLES.builds.c.id == int(deleted.build_id)))
        conn.execute(
            update(TABLES.projects)
            .where(TABLES.projects.c.id == int(orphaned[0].project_id))
            .values(active_build_id=None)
        )
    before = seeded.statuses()

    result = conns.store.archive_batch(
        record.id,
        batch,
        routed_now={routed_at_recheck.build_id},
        fence=_fence(conns),
        now=utc_now(),
        routes_guard=conns.routes_guard,
    )

    expected_skips = {
        became_active.build_id: "it became its project's active build",
        status_changed.build_id: f"its status changed from {status_changed.previous_status!r} "
        "to 'pinned'",
        routed_in_table.build_id: "it is routed now",
        deleted.build_id: "the build no longer exists",
        routed_at_recheck.build_id: "routed at the re-check",
    } | {i.build_id: "its project no longer has a known active build" for i in orphaned}
    assert result.skipped == expected_skips
    assert result.archived == tuple(i.build_id for i in batch if i.build_id not in expected_skips)
    after = seeded.statuses()
    assert {b for b in after if after[b] != before[b]} == {int(b) for b in result.archived}
    outcomes = _items(conns, record.id)
    for build_id, why in expected_skips.items():
        assert outcomes[build_id] == ("skipped", why)
    assert {a["build_id"] for a in conns.store.audit_rows(record.id)} == set(result.archived)
    counted = conns.store.get_run(record.id)
    assert counted is not None
    assert (counted.archived, counted.skipped) == (len(result.archived), len(expected_skips))


def test_a_batch_routed_entirely_at_the_recheck_writes_only_its_skips(
    database_url: str, connections: OpenConnections
) -> None:
    seeded, conns, record = _applying(database_url, connections)
    before = seeded.statuses()
    batch = conns.store.pending_items(record.id, 5)
    result = conns.store.archive_batch(
        record.id,
        batch,
        routed_now={i.build_id for i in batch},
        fence=_fence(conns),
        now=utc_now(),
        routes_guard=conns.routes_guard,
    )
    assert result.archived == ()
    assert set(result.skipped.values()) == {"routed at the re-check"}
    assert seeded.statuses() == before
    assert conns.store.audit_rows(record.id) == []
    counted = conns.store.get_run(record.id)
    assert counted is not None
    assert (counted.archived, counted.skipped) == (0, 5)


def test_a_build_outside_the_runs_items_rolls_the_whole_batch_back(
    database_url: str, connections: OpenConnections
) -> None:
    """Without its item there would be no audit row: the batch must not commit at all."""
    seeded, conns, record = _applying(database_url, connections)
    batch = conns.store.pending_items(record.id, 10)
    planned = set(_items(conns, record.id))
    # A build that passes every guard (not active, not routed, its project has an active
    # build) but that the plan kept: the second newest of a project with an active build.
    outsider = next(
        builds[1][0]
        for project, builds in seeded.inventory.project_builds.items()
        if project in seeded.inventory.active
        and len(builds) > 1
        and str(builds[1][0]) not in planned
        and builds[1][0] not in seeded.inventory.routed
    )
    statuses = seeded.statuses()
    fake = PendingItem(10_000, str(outsider), "0", statuses[outsider])
    before = seeded.statuses()

    with pytest.raises(RuntimeError, match="rolled back"):
        conns.store.archive_batch(
            record.id,
            [*batch, fake],
            routed_now=set(),
            fence=_fence(conns),
            now=utc_now(),
            routes_guard=conns.routes_guard,
        )

    assert seeded.statuses() == before
    assert conns.store.audit_rows(record.id) == []
    assert {o for o, _ in _items(conns, record.id).values()} == {"pending"}
    counted = conns.store.get_run(record.id)
    assert counted is not None
    assert (counted.archived, counted.skipped) == (0, 0)


def test_pending_items_are_read_a_page_ahead_and_each_is_archived_once(
    database_url: str, connections: OpenConnections, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runs_module, "PENDING_PAGE", 7)
    seeded = seed(database_url)
    conns = connections(_cleanup(seeded, execution={"batchSize": 5, "canaryBatchSize": 3}))
    record = _recorded_apply(conns)
    first = conns.store.pending_items(record.id, 4)
    after = conns.store.pending_items(record.id, 4, after_seq=first[1].seq)
    assert after[:2] == first[2:]

    # Canary 3, then batches of 5 from pages of 7: batches straddle the pages.
    result = run(apply(conns, ApplyRequest(None, approve_current=True)))
    assert result.outcome is Outcome.SUCCEEDED, result.message
    assert result.run is not None
    assert seeded.archived() == seeded.expected_candidates()
    audit = conns.store.audit_rows(result.run.id)
    assert sorted(int(a["build_id"]) for a in audit) == sorted(seeded.expected_candidates())
    assert (result.run.archived, result.run.skipped) == (len(audit), 0)


def test_restore_in_chunks_leaves_someone_elses_change_alone(
    database_url: str, connections: OpenConnections
) -> None:
    seeded = seed(database_url)
    before = seeded.statuses()
    conns = connections(_cleanup(seeded))
    applied = run(apply(conns, ApplyRequest(None, approve_current=True)))
    assert applied.run is not None
    archived = sorted(seeded.archived())
    touched = archived[3]
    with seeded.engine.begin() as conn:
        conn.execute(
            update(TABLES.builds).where(TABLES.builds.c.id == touched).values(status="deleted")
        )

    with _statements(conns.engine) as seen:
        result = conns.store.restore(applied.run.id, None, utc_now(), batch_size=7)

    assert result.restored == len(archived) - 1
    assert result.conflicts.keys() == {str(touched)}
    if conns.engine.dialect.name == "postgresql":
        # the items read, then one statement per chunk
        assert seen.count("WITH") == -(-len(archived) // 7)
    after = seeded.statuses()
    assert after == before | {touched: "deleted"}
    restores = [a for a in conns.store.audit_rows(applied.run.id) if a["action"] == "restore"]
    assert {int(a["build_id"]) for a in restores} == set(archived) - {touched}
    assert all(a["new_status"] == before[int(a["build_id"])] for a in restores)
    assert {(a["previous_status"], a["fencing_token"], a["evidence"]) for a in restores} == {
        ("archived", None, "{}")
    }
    final = conns.store.get_run(applied.run.id)
    assert final is not None
    assert final.restored == result.restored
    again = run(restore(conns, applied.run.id, None, utc_now()))
    assert again.restore is not None
    assert (again.restore.restored, again.restore.already_restored) == (0, result.restored)
