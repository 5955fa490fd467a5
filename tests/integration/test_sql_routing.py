"""Routing from a routes table, in the builds database or in another one."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert
from sqlalchemy.pool import NullPool

from deployment_cleanup.db import ConfigurationError
from deployment_cleanup.planning import RouteAnswer
from deployment_cleanup.routing import BatchResult
from deployment_cleanup.runs import ApplyRequest, Outcome, apply, plan_and_record, utc_now
from deployment_cleanup.seed import reference_tables
from tests.integration.conftest import OpenConnections
from tests.support.inventory import loose_cleanup, recorded_candidates, run, seed

TABLES = reference_tables()


def test_routes_in_another_database_are_used_and_rechecked(
    sqlite_url: str, tmp_path: Path, connections: OpenConnections
) -> None:
    seeded = seed(sqlite_url, create_routes=False)
    routes_url = f"sqlite:///{tmp_path / 'routing.sqlite'}"
    routing_engine = create_engine(routes_url, poolclass=NullPool)
    TABLES.routes.create(routing_engine)
    with routing_engine.begin() as conn:
        conn.execute(
            insert(TABLES.routes), [{"build_id": b, "hostname": f"h{b}"} for b in seeded.live()]
        )

    conns = connections(loose_cleanup(sqlite_url, {"sql": {"url": routes_url}}))
    planned = run(plan_and_record(conns, utc_now()))
    assert planned.plan is not None
    assert planned.run is not None
    assert set(recorded_candidates(conns.store, planned.run.id)) == seeded.expected_candidates()
    evidence = planned.plan.candidates[0].evidence()["routing"]
    assert evidence == {"routed": False, "source": "sql", "batch": evidence["batch"]}  # type: ignore[index]

    late = planned.plan.candidates[-1].build.id
    with routing_engine.begin() as conn:
        conn.execute(insert(TABLES.routes).values(build_id=late, hostname="late.example.test"))
    result = run(apply(conns, ApplyRequest(approved_plan_id=planned.plan.id)))
    # The plan changed (a candidate became routed), so the stale approval is refused.
    assert result.outcome is Outcome.AWAITING_APPROVAL
    assert seeded.archived() == set()


def test_missing_routes_table_in_another_database_is_a_clear_error(
    sqlite_url: str, tmp_path: Path, connections: OpenConnections
) -> None:
    seed(sqlite_url, projects=2)
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    with pytest.raises(
        ConfigurationError, match="spec.routing.sql.table: table 'routes' does not exist"
    ):
        connections(loose_cleanup(sqlite_url, {"sql": {"url": f"sqlite:///{empty}"}}))


def test_routed_hostname_is_kept_as_evidence(sqlite_url: str, connections: OpenConnections) -> None:
    seeded = seed(sqlite_url, projects=3, projects_without_active=0, routed_non_active=0)
    conns = connections(loose_cleanup(sqlite_url, {"sql": {}}))
    active = seeded.inventory.active[1]
    older = seeded.inventory.project_builds[1][-1][0]

    async def look_up() -> BatchResult:
        async with conns.routing:
            return await conns.routing.lookup(0, [active, older])

    result = run(look_up())
    assert result.receipt.ok
    assert result.answers[active] == RouteAnswer(True, "sql", 0, "project-1.example.test")
    assert result.answers[older] == RouteAnswer(False, "sql", 0, None)
