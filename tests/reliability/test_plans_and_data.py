"""Faults 3, 4, 6, 8, 11, 12: thresholds, collapse, data changing, PostgreSQL restarts, restore, bad input."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, insert, update
from sqlalchemy.pool import NullPool

from deployment_cleanup.runs import (
    ApplyRequest,
    Outcome,
    apply,
    make_plan,
    plan_and_record,
    utc_now,
)
from deployment_cleanup.seed import reference_tables
from deployment_cleanup.spec import SpecError, parse_cleanup
from tests.integration.conftest import OpenConnections
from tests.support.documents import cleanup_document
from tests.support.inventory import Seeded, http_routing, loose_cleanup, run, seed
from tests.support.postgres import PostgresServer
from tests.support.reliability import Outcome as Row
from tests.support.reliability import Watch, scale
from tests.support.routing_server import RoutingServer

TABLES = reference_tables()
LOOSE = {
    "maxArchivedPerRun": 100_000,
    "maxArchivedPercent": 100,
    "maxArchivedPerProject": 1000,
    "referenceSet": {"maxDropPercent": 50, "minCount": 1},
}


def _sql_cleanup(seeded: Seeded, safety: dict[str, Any] | None = None, **spec: Any):  # type: ignore[no-untyped-def]
    return loose_cleanup(seeded.url, {"sql": {}}, safety=safety or LOOSE, **spec)


def _measure(seeded: Seeded, connections: OpenConnections) -> dict[str, float]:
    plan = run(plan_and_record(connections(_sql_cleanup(seeded)), utc_now())).plan
    assert plan is not None
    return {t.name: t.actual for t in plan.thresholds if t.actual is not None} | {
        "builds": plan.counts["builds"]
    }


@pytest.mark.parametrize(
    "threshold",
    ["maxArchivedPerRun", "maxArchivedPercent", "maxArchivedPerProject", "referenceSetMinCount"],
)
@pytest.mark.parametrize("where", ["one-below", "exactly-at", "one-above"])
def test_threshold_boundary(
    sqlite_url: str, connections: OpenConnections, outcome: Row, threshold: str, where: str
) -> None:
    seeded = seed(sqlite_url, projects=25)
    actual = _measure(seeded, connections)[threshold]
    step = {"maxArchivedPercent": 100 / _measure(seeded, connections)["builds"]}.get(threshold, 1)
    # "Below" means the limit is one step below the actual value: the check must fail.
    shift = {"one-below": -step, "exactly-at": 0, "one-above": step}[where]
    if threshold == "referenceSetMinCount":
        shift = -shift  # a floor: the run passes when the actual value is at or above it
    limits: dict[str, Any] = dict(LOOSE)
    if threshold == "referenceSetMinCount":
        limits["referenceSet"] = {"maxDropPercent": 100, "minCount": int(actual + shift)}
    else:
        limits[threshold] = (
            actual + shift if threshold == "maxArchivedPercent" else int(actual + shift)
        )
    watch = Watch(seeded)
    result = run(
        apply(
            connections(_sql_cleanup(seeded, limits)),
            ApplyRequest(approved_plan_id=None, approve_current=True),
        )
    )
    must_block = where == "one-below"
    assert (result.outcome is Outcome.BLOCKED) is must_block, result.message
    if must_block:
        assert threshold in result.message
    watch.check(outcome, approved=set() if must_block else seeded.expected_candidates())


def test_routing_collapse_blocks(
    sqlite_url: str, connections: OpenConnections, outcome: Row
) -> None:
    seeded = seed(sqlite_url, projects=30, routed_non_active=8)
    with RoutingServer() as routing:
        routing.set_routed(str(b) for b in seeded.live())
        conns = connections(
            loose_cleanup(
                seeded.url,
                http_routing(routing.url),
                safety=LOOSE | {"referenceSet": {"maxDropPercent": 10, "minCount": 1}},
            )
        )
        assert run(plan_and_record(conns, utc_now())).outcome is Outcome.SUCCEEDED
        watch = Watch(seeded)
        routing.set_routed([])  # suddenly almost nothing is routed
        result = run(apply(conns, ApplyRequest(approved_plan_id=None, approve_current=True)))
    assert result.outcome is Outcome.BLOCKED
    assert "routedBuildsMaxDropPercent" in result.message
    watch.check(outcome, approved=set())


def test_empty_replica_is_refused(
    sqlite_url: str, tmp_path: Any, connections: OpenConnections, outcome: Row
) -> None:
    seeded = seed(sqlite_url, projects=30)
    empty = tmp_path / "empty-replica.sqlite"
    engine = create_engine(f"sqlite:///{empty}", poolclass=NullPool)
    TABLES.metadata.create_all(engine)
    watch = Watch(seeded)
    replica = loose_cleanup(
        f"sqlite:///{empty}",
        {"sql": {}},
        safety=LOOSE | {"referenceSet": {"maxDropPercent": 10, "minCount": 20}},
    )
    result = run(
        apply(connections(replica), ApplyRequest(approved_plan_id=None, approve_current=True))
    )
    assert result.outcome is Outcome.BLOCKED
    assert "referenceSetMinCount" in result.message
    watch.check(outcome, approved=set())


@pytest.mark.postgres
def test_standby_is_refused(
    local_postgres_server: PostgresServer, connections: OpenConnections, outcome: Row
) -> None:
    url = local_postgres_server.create_database("standby_scenario")
    seeded = seed(url, projects=10)
    standby = local_postgres_server.create_standby()
    try:
        watch = Watch(seeded)
        conns = connections(
            loose_cleanup(standby.url("standby_scenario"), {"sql": {}}, safety=LOOSE)
        )
        with pytest.raises(Exception, match="standby"):
            run(make_plan(conns, utc_now(), None))
        watch.check(outcome, approved=set())
    finally:
        standby.close()
        seeded.engine.dispose()
        local_postgres_server.drop_database("standby_scenario")


def test_builds_change_between_plan_and_apply(
    sqlite_url: str, connections: OpenConnections, outcome: Row
) -> None:
    for seed_value in range(scale(3, 20)):
        seeded = seed(
            sqlite_url.replace(".sqlite", f"-{seed_value}.sqlite"), projects=30, seed=seed_value
        )
        rng = random.Random(seed_value)
        conns = connections(
            _sql_cleanup(seeded, execution={"batchSize": 10, "canaryBatchSize": 10})
        )
        planned = run(plan_and_record(conns, utc_now()))
        assert planned.plan is not None
        watch = Watch(seeded)
        victims = rng.sample([d.build for d in planned.plan.candidates], 6)
        with seeded.engine.begin() as conn:
            for kind, build in zip(["active", "routed", "status"] * 2, victims, strict=True):
                if kind == "active":
                    conn.execute(
                        update(TABLES.projects)
                        .where(TABLES.projects.c.id == build.project_id)
                        .values(active_build_id=build.id)
                    )
                elif kind == "routed":
                    conn.execute(
                        insert(TABLES.routes).values(build_id=build.id, hostname="late.test")
                    )
                else:
                    conn.execute(
                        update(TABLES.builds)
                        .where(TABLES.builds.c.id == build.id)
                        .values(status="pinned")
                    )
                    watch.touched.add(int(build.id))
        watch.mark_live(int(b.id) for b in victims)
        # The approved id is now stale: the apply must refuse, not archive the changed builds.
        result = run(apply(conns, ApplyRequest(approved_plan_id=planned.plan.id)))
        assert result.outcome is Outcome.AWAITING_APPROVAL
        watch.check(outcome, approved=set())


@pytest.mark.postgres
@pytest.mark.parametrize("moment", ["mid-scan", "mid-apply"])
def test_postgres_restart(
    local_postgres_server: PostgresServer, connections: OpenConnections, outcome: Row, moment: str
) -> None:
    name = f"restart_{moment.replace('-', '_')}"
    url = local_postgres_server.create_database(name)
    seeded = seed(url, projects=scale(200, 400))
    watch = Watch(seeded)
    pause = "0s" if moment == "mid-scan" else "200ms"
    conns = connections(
        _sql_cleanup(
            seeded, execution={"batchSize": 20, "canaryBatchSize": 5, "pauseBetweenBatches": pause}
        )
    )
    restarted = threading.Event()

    def restart_when_due() -> None:
        if moment == "mid-apply":
            deadline = time.monotonic() + 30
            while not seeded.archived() and time.monotonic() < deadline:
                time.sleep(0.05)
        local_postgres_server.stop()
        local_postgres_server.start()
        restarted.set()

    thread = threading.Thread(target=restart_when_due)
    started = time.monotonic()
    thread.start()
    try:
        first = run(apply(conns, ApplyRequest(approved_plan_id=None, approve_current=True)))
        outcome.notes.append(f"{moment}: the interrupted run ended {first.outcome}")
    except Exception as exc:  # the restart may surface as a database error: the run stops
        outcome.notes.append(f"{moment}: the interrupted run stopped with {type(exc).__name__}")
    thread.join(60)
    assert restarted.is_set()
    # Run again until the apply completes: it resumes its own plan.
    for _ in range(5):
        try:
            again = run(apply(conns, ApplyRequest(approved_plan_id=None, approve_current=True)))
        except Exception:  # the pool may still hold connections from before the restart
            continue
        if again.outcome is Outcome.SUCCEEDED:
            break
    outcome.recovery_seconds.append(time.monotonic() - started)
    assert seeded.archived() <= seeded.expected_candidates()
    watch.check(outcome, approved=seeded.expected_candidates())
    seeded.engine.dispose()
    conns.close()
    local_postgres_server.drop_database(name)


def test_restore_drill_of_a_thousand_builds(
    sqlite_url: str, connections: OpenConnections, outcome: Row
) -> None:
    seeded = seed(sqlite_url, projects=260, builds_per_project=(7, 7))
    conns = connections(_sql_cleanup(seeded, execution={"batchSize": 500, "canaryBatchSize": 50}))
    watch = Watch(seeded)
    result = run(apply(conns, ApplyRequest(approved_plan_id=None, approve_current=True)))
    assert result.run is not None
    assert result.run.archived >= 1000
    watch.check(outcome, approved=seeded.expected_candidates())
    outcome.notes.append(
        f"restored {result.run.archived} builds in {outcome.restore_seconds[-1]:.2f}s"
    )


MUTATIONS = st.one_of(
    st.text(max_size=300),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.just("x" * 5000),
    st.just("builds; DROP TABLE builds;--"),
    st.just('"; DELETE FROM builds'),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
PATHS = [
    "spec.mode",
    "spec.database.url",
    "spec.database.builds.table",
    "spec.database.builds.status",
    "spec.database.projects.activeBuildId",
    "spec.database.schema",
    "spec.routing.batchSize",
    "spec.routing.batchDeadline",
    "spec.routing.sql.table",
    "spec.retention.minAge",
    "spec.retention.keepNewest",
    "spec.safety.maxArchivedPercent",
    "spec.safety.referenceSet.minCount",
    "spec.execution.canaryBatchSize",
    "spec.approval.approvedPlanId",
    "spec.schedule",
    "spec",
    "metadata.name",
    "spec.unknownField",
    "spec.notifications.webhook.on",
]


def test_bad_input_corpus_is_refused_with_a_named_field_never_a_crash(outcome: Row) -> None:
    count = scale(300, 3000)

    @settings(max_examples=count, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(path=st.sampled_from(PATHS), value=MUTATIONS)
    def check(path: str, value: object) -> None:
        document: dict[str, Any] = cleanup_document()
        node = document
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[leaf] = value
        problems = _problems(document)
        assert problems is None or problems
        assert all(p.path and p.message for p in problems or [])
        assert len("".join(str(p) for p in problems or [])) < 5000

    check()
    outcome.runs = count
    outcome.notes.append(
        f"{count} generated documents (injection attempts, huge strings, wrong types): each "
        "valid or refused with a SpecError naming its field, none crashed; the API server's "
        "own refusals are tested in tests/e2e/test_crd.py"
    )


def _problems(document: dict[str, Any]) -> list[Any] | None:
    """None if the document is valid, else its problems; any other exception fails the test."""
    try:
        parse_cleanup(document)
    except SpecError as exc:
        return exc.problems
    return None
