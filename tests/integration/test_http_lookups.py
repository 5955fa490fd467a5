"""Routing lookups over real HTTP on 127.0.0.1: every fault blocks the run and changes nothing."""

from __future__ import annotations

import time
from typing import Any

import pytest

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
def world(sqlite_url: str, routing_server: RoutingServer) -> Seeded:
    seeded = seed(sqlite_url)
    routing_server.set_routed(str(b) for b in seeded.live())
    return seeded


def _target(seeded: Seeded) -> str:
    """A live build in the middle of the inventory: the batch holding it is the one that fails."""
    return str(seeded.inventory.active[20])


FAULTS: list[Any] = [
    pytest.param(
        "hang", {}, "ReadTimeout: no data within the 0.3s read timeout", id="timeout-of-one-batch"
    ),
    pytest.param("status", {"code": 500}, "HTTP 500", id="http-500"),
    pytest.param(
        "status",
        {"code": 503, "retry_after": 30},
        "batch deadline",
        id="503-retry-after-beyond-deadline",
    ),
    pytest.param("status", {"code": 401}, "HTTP 401", id="http-401"),
    pytest.param("reset", {}, "ReadError", id="connection-reset"),
    pytest.param("drip", {"interval": 0.1}, "batch deadline", id="slow-drip"),
    pytest.param("truncated", {}, "not JSON", id="truncated-json"),
    pytest.param(
        "truncated", {"content_length": "full"}, "RemoteProtocolError", id="truncated-connection"
    ),
    pytest.param("malformed", {}, "not JSON", id="malformed-json"),
    pytest.param("empty", {}, "not JSON", id="empty-body"),
    pytest.param("null", {}, "not an object", id="null-body"),
    pytest.param("html", {}, "not JSON", id="html-body"),
    pytest.param("missing_id", {}, "missing from the answer", id="missing-id"),
    pytest.param("extra_id", {"routed": False}, "not asked for", id="extra-id"),
    pytest.param("duplicate_id", {}, "answered twice", id="duplicate-id"),
    pytest.param("contradictory_id", {}, "both routed and not routed", id="contradictory-id"),
    pytest.param("mistyped", {"how": "routed_string"}, "not a boolean", id="routed-as-string"),
    pytest.param("mistyped", {"how": "routed_int"}, "not a boolean", id="routed-as-int"),
    pytest.param("mistyped", {"how": "id_int"}, "not a string", id="id-as-int"),
    pytest.param("mistyped", {"how": "results_dict"}, "not a list", id="results-as-dict"),
    pytest.param("wrong_results_key", {}, "'results' is missing", id="wrong-results-key"),
]


@pytest.mark.parametrize(("kind", "params", "error"), FAULTS)
def test_faulty_batch_blocks_the_run_with_zero_rows_changed(
    world: Seeded,
    routing_server: RoutingServer,
    kind: str,
    params: dict[str, Any],
    error: str,
    connections: OpenConnections,
) -> None:
    target = _target(world)
    routing_server.add_fault(kind, match=lambda ids: target in ids, **params)
    before = world.statuses()
    c = loose_cleanup(world.url, http_routing(routing_server.url))
    conns = connections(c)
    result = run(apply(conns, ApplyRequest(approved_plan_id=None, approve_current=True)))

    assert result.outcome is Outcome.BLOCKED
    assert result.plan is not None
    failed = result.plan.failed_receipts
    assert len(failed) == 1, [r.error for r in failed]
    assert error in (failed[0].error or "")
    assert f"batch {failed[0].index}" in result.message
    assert world.statuses() == before
    assert result.run is not None
    assert result.run.archived == 0


def test_all_batches_failing_stops_asking_after_the_configured_number(
    world: Seeded, routing_server: RoutingServer, connections: OpenConnections
) -> None:
    routing_server.add_fault("status", match="all", code=500)
    c = loose_cleanup(
        world.url, http_routing(routing_server.url, concurrency=1, stopAfterFailedBatches=2)
    )
    conns = connections(c)
    result = run(plan_and_record(conns, utc_now()))
    assert result.outcome is Outcome.BLOCKED
    assert result.plan is not None
    assert routing_server.request_count == 2 * 2  # two batches, two attempts each
    not_attempted = [r for r in result.plan.receipts if r.attempts == 0]
    assert not_attempted
    assert all("not attempted" in (r.error or "") for r in not_attempted)
    counts = result.plan.counts
    assert counts["routed"] == counts["notRouted"] == 0
    assert counts["unknown"] + counts["active"] == counts["builds"]
    assert result.plan.candidate_count == 0


def test_429_with_retry_after_is_honoured_then_the_lookup_succeeds(
    world: Seeded, routing_server: RoutingServer, connections: OpenConnections
) -> None:
    target = _target(world)
    routing_server.add_fault(
        "status", match=lambda ids: target in ids, times=1, code=429, retry_after=0.4
    )
    c = loose_cleanup(world.url, http_routing(routing_server.url, batchDeadline="3s"))
    conns = connections(c)
    result = run(plan_and_record(conns, utc_now()))
    assert result.outcome is Outcome.SUCCEEDED
    asked = [r for r in routing_server.requests if target in r.ids]
    assert [r.kind for r in asked] == ["status", "ok"]
    assert asked[1].received_at - asked[0].received_at >= 0.4


def test_token_from_a_secret_is_sent_as_the_configured_header(
    sqlite_url: str, connections: OpenConnections
) -> None:
    seeded = seed(sqlite_url, projects=5)
    with RoutingServer(
        token="s3cret-token", auth_header="X-Routing-Token", auth_prefix=""
    ) as server:
        server.set_routed(str(b) for b in seeded.live())
        routing = http_routing(server.url)
        routing["http"] |= {
            "tokenSecretRef": {"name": "routing", "key": "token"},
            "tokenHeader": "X-Routing-Token",
            "tokenPrefix": "",
        }
        c = loose_cleanup(seeded.url, routing)
        conns = connections(c, {"DEPLOYMENT_CLEANUP_SECRET_ROUTING_TOKEN": "s3cret-token"})
        result = run(plan_and_record(conns, utc_now()))
        assert result.outcome is Outcome.SUCCEEDED
        assert all(r.headers["x-routing-token"] == "s3cret-token" for r in server.requests)

        conns = connections(c, {"DEPLOYMENT_CLEANUP_SECRET_ROUTING_TOKEN": "wrong"})
        refused = run(plan_and_record(conns, utc_now()))
        assert refused.outcome is Outcome.BLOCKED
        assert "HTTP 401" in refused.message


def test_a_slow_but_healthy_server_is_waited_for_not_treated_as_inactive(
    world: Seeded, routing_server: RoutingServer, connections: OpenConnections
) -> None:
    routing_server.latency = 0.2
    c = loose_cleanup(
        world.url, http_routing(routing_server.url, readTimeout="1s", batchDeadline="2s")
    )
    conns = connections(c)
    started = time.monotonic()
    result = run(plan_and_record(conns, utc_now()))
    assert result.outcome is Outcome.SUCCEEDED
    assert result.plan is not None
    assert result.run is not None
    assert set(recorded_candidates(conns.store, result.run.id)) == world.expected_candidates()
    assert time.monotonic() - started >= 0.2


def test_routing_that_collapses_to_nothing_routed_blocks_the_run(
    world: Seeded, routing_server: RoutingServer, connections: OpenConnections
) -> None:
    c = loose_cleanup(
        world.url,
        http_routing(routing_server.url),
        safety={
            "maxArchivedPerRun": 100_000,
            "maxArchivedPercent": 100,
            "maxArchivedPerProject": 1000,
            "referenceSet": {"maxDropPercent": 10, "minCount": 1},
        },
    )
    conns = connections(c)
    first = run(plan_and_record(conns, utc_now()))
    assert first.outcome is Outcome.SUCCEEDED
    routing_server.set_routed([])  # a routing API pointed at an empty table answers "not routed"
    before = world.statuses()
    result = run(apply(conns, ApplyRequest(approved_plan_id=None, approve_current=True)))
    assert result.outcome is Outcome.BLOCKED
    assert result.plan is not None
    failed = {t.name for t in result.plan.thresholds if not t.passed}
    assert failed == {"routedBuildsMaxDropPercent"}
    assert world.statuses() == before
