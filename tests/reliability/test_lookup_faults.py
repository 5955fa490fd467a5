"""Fault 1 and 2: every kind of lookup failure, and overload, on a real HTTP server."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from hypothesis import given, settings

from deployment_cleanup.runs import ApplyRequest, Outcome, apply
from tests.integration.conftest import OpenConnections
from tests.integration.test_http_lookups import FAULTS
from tests.support.inventory import http_routing, loose_cleanup, run, seed
from tests.support.reliability import Outcome as Row
from tests.support.reliability import Watch, scale
from tests.support.routing_server import RoutingServer
from tests.unit.test_answer_contract import ASKED_IDS, PAYLOADS, assert_exact_or_refused

SINGLE_ID = pytest.param("missing_id", {}, "missing from the answer", id="single-id-missing")


@pytest.mark.parametrize(("kind", "params", "error"), [*FAULTS, SINGLE_ID])
def test_lookup_fault_blocks_with_nothing_archived(
    sqlite_url: str,
    connections: OpenConnections,
    outcome: Row,
    kind: str,
    params: dict[str, Any],
    error: str,
) -> None:
    seeded = seed(sqlite_url, projects=30)
    for seed_value in range(scale(1, 5)):
        watch = Watch(seeded)
        # A different batch fails in each run: the one holding a randomly chosen live build.
        target = str(random.Random(seed_value).choice(sorted(seeded.live())))
        with RoutingServer() as routing:
            routing.set_routed(str(b) for b in seeded.live())
            routing.add_fault(kind, match=lambda ids, t=target: t in ids, **params)
            conns = connections(loose_cleanup(seeded.url, http_routing(routing.url, batchSize=40)))
            result = run(apply(conns, ApplyRequest(approved_plan_id=None, approve_current=True)))
        assert result.outcome is Outcome.BLOCKED, result.message
        assert result.plan is not None
        assert error in " ".join(r.error or "" for r in result.plan.failed_receipts)
        watch.check(outcome, approved=set())


def test_all_batches_time_out(sqlite_url: str, connections: OpenConnections, outcome: Row) -> None:
    seeded = seed(sqlite_url, projects=30)
    watch = Watch(seeded)
    with RoutingServer() as routing:
        routing.add_fault("hang", match="all")
        conns = connections(loose_cleanup(seeded.url, http_routing(routing.url, batchSize=40)))
        result = run(apply(conns, ApplyRequest(approved_plan_id=None, approve_current=True)))
    assert result.outcome is Outcome.BLOCKED
    watch.check(outcome, approved=set())


def test_client_overload_is_answered_or_blocked_never_guessed(
    sqlite_url: str, connections: OpenConnections, outcome: Row
) -> None:
    # Thousands of small lookups at high concurrency against a healthy but slow server.
    seeded = seed(sqlite_url, projects=scale(150, 600))
    watch = Watch(seeded)
    with RoutingServer() as routing:
        routing.set_routed(str(b) for b in seeded.live())
        routing.latency = 0.02
        settings = http_routing(
            routing.url,
            batchSize=1,
            concurrency=64,
            batchDeadline="2s",
            readTimeout="1s",
            stopAfterFailedBatches=1000,
        )
        conns = connections(loose_cleanup(seeded.url, settings))
        started = time.monotonic()
        result = run(apply(conns, ApplyRequest(approved_plan_id=None, approve_current=True)))
        requests = routing.request_count
    assert requests > 0
    assert result.outcome in (Outcome.SUCCEEDED, Outcome.BLOCKED)
    if result.outcome is Outcome.SUCCEEDED:
        assert seeded.archived() == seeded.expected_candidates()
    outcome.notes.append(
        f"{requests} lookup requests at concurrency 64 in {time.monotonic() - started:.1f}s: "
        f"{result.outcome}"
    )
    watch.check(outcome, approved=seeded.expected_candidates())


def test_generated_malformed_answers_never_yield_evidence(outcome: Row) -> None:
    count = scale(200, 10_000)

    @settings(max_examples=count, deadline=None)
    @given(payload=PAYLOADS, asked=ASKED_IDS)
    def check(payload: object, asked: list[str]) -> None:
        assert_exact_or_refused(payload, asked)

    check()
    outcome.runs = count
    outcome.notes.append(
        f"{count} generated answers: none accepted without exact, positive evidence"
    )
