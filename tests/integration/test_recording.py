"""A plan's candidates are recorded while it is made, and only a finished plan shows."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import func, make_url, select

from deployment_cleanup import runs
from deployment_cleanup.runs import ApplyRequest, Outcome, apply, plan_and_record, utc_now
from tests.integration.conftest import OpenConnections
from tests.support.inventory import (
    Seeded,
    http_routing,
    loose_cleanup,
    recorded_candidates,
    run,
    seed,
)
from tests.support.routing_server import RoutingServer


@pytest.fixture
def world(database_url: str, routing_server: RoutingServer) -> Seeded:
    seeded = seed(database_url, projects=60)
    routing_server.set_routed(str(b) for b in seeded.live())
    return seeded


def test_every_candidate_is_recorded_in_plan_order_though_the_plan_keeps_a_sample(
    world: Seeded, routing_server: RoutingServer, connections: OpenConnections
) -> None:
    conns = connections(loose_cleanup(world.url, http_routing(routing_server.url, batchSize=7)))
    result = run(plan_and_record(conns, utc_now()))
    assert result.plan is not None
    assert result.run is not None
    recorded = recorded_candidates(conns.store, result.run.id)
    assert set(recorded) == world.expected_candidates()
    assert len(recorded) == result.plan.candidate_count == result.run.candidates
    assert len(result.plan.candidates) < len(recorded)
    # The plan's sample is the head of the recorded list: one order, inventory order.
    assert recorded[: len(result.plan.candidates)] == [d.build.id for d in result.plan.candidates]


def test_a_plan_cancelled_midway_leaves_no_run_and_no_items(
    world: Seeded,
    routing_server: RoutingServer,
    connections: OpenConnections,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Write after every unit, so rows are in the table (uncommitted) when the plan dies.
    monkeypatch.setattr(runs, "RECORD_CHUNK", 1)
    routing_server.latency = 0.05
    conns = connections(loose_cleanup(world.url, http_routing(routing_server.url, batchSize=5)))
    looked_up: list[int] = []

    async def plan_then_cancel() -> None:
        task = asyncio.ensure_future(
            plan_and_record(conns, utc_now(), lambda _p, done, _t, _r: looked_up.append(done))
        )
        while not looked_up or looked_up[-1] < 60:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(plan_then_cancel())
    store = conns.store
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(store.runs)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(store.items)).scalar_one() == 0


def test_an_apply_waiting_for_approval_records_a_plan_whose_items_are_not_pending(
    world: Seeded, routing_server: RoutingServer, connections: OpenConnections
) -> None:
    conns = connections(loose_cleanup(world.url, http_routing(routing_server.url)))
    waiting = run(apply(conns, ApplyRequest(approved_plan_id=None)))
    assert waiting.outcome is Outcome.AWAITING_APPROVAL
    assert waiting.run is not None
    assert waiting.run.kind == "plan"
    items = conns.store.items
    with conns.store.engine.connect() as conn:
        outcomes = conn.execute(
            select(items.c.outcome, func.count())
            .where(items.c.run_id == waiting.run.id)
            .group_by(items.c.outcome)
        ).all()
    assert dict(outcomes) == {"planned": len(world.expected_candidates())}
    assert conns.store.unfinished_apply(conns.cleanup.key) is None
    assert world.archived() == set()


@pytest.mark.postgres
def test_a_role_statement_timeout_does_not_cancel_a_long_plan(
    postgres_url: str,
    routing_server: RoutingServer,
    connections: OpenConnections,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The items go through one COPY for the whole plan; a role's statement_timeout shorter
    # than the plan must not cancel it (each scan page stays a short statement of its own).
    seeded = seed(postgres_url, projects=60)
    routing_server.set_routed(str(b) for b in seeded.live())
    routing_server.latency = 0.05
    monkeypatch.setattr(runs, "RECORD_CHUNK", 1)
    url = make_url(postgres_url).update_query_dict({"options": "-c statement_timeout=300"})
    conns = connections(
        loose_cleanup(
            url.render_as_string(hide_password=False),
            http_routing(routing_server.url, batchSize=5, concurrency=1),
        )
    )
    started = time.monotonic()
    result = run(plan_and_record(conns, utc_now()))
    assert time.monotonic() - started > 1  # far longer than the timeout
    assert result.outcome is Outcome.SUCCEEDED, result.message
    assert result.run is not None
    assert set(recorded_candidates(conns.store, result.run.id)) == seeded.expected_candidates()
