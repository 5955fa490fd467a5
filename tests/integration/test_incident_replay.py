"""The incident, end to end: 863 projects, one lookup batch times out.

The old job archived the 170 live builds that batch held. This one must block
with zero changes, then, once routing recovers, archive exactly the right
builds, and restore them all in one call.
"""

from __future__ import annotations

from deployment_cleanup.runs import ApplyRequest, Outcome, apply, plan_and_record, restore, utc_now
from tests.integration.conftest import OpenConnections
from tests.support.inventory import http_routing, loose_cleanup, recorded_candidates, run, seed
from tests.support.routing_server import RoutingServer

PROJECTS = 863
INCIDENT_PROJECTS = range(347, 517)  # 170 projects whose live builds share the failing batches


def test_incident_replay(
    database_url: str, routing_server: RoutingServer, connections: OpenConnections
) -> None:
    seeded = seed(database_url, projects=PROJECTS, projects_without_active=0, routed_non_active=0)
    live_in_batch = {str(seeded.inventory.active[p]) for p in INCIDENT_PROJECTS}
    assert len(live_in_batch) == 170
    routing_server.set_routed(str(b) for b in seeded.live())
    routing_server.add_fault("hang", match=lambda ids: bool(live_in_batch.intersection(ids)))
    before = seeded.statuses()
    routing = http_routing(
        routing_server.url, batchSize=500, readTimeout="500ms", batchDeadline="1s"
    )
    conns = connections(
        loose_cleanup(seeded.url, routing, execution={"batchSize": 500, "canaryBatchSize": 50})
    )

    blocked = run(apply(conns, ApplyRequest(approved_plan_id=None, approve_current=True)))
    assert blocked.outcome is Outcome.BLOCKED
    assert blocked.plan is not None
    assert blocked.plan.failed_receipts
    assert "routing lookup batches failed, so nothing is archived" in blocked.message
    assert seeded.statuses() == before
    assert blocked.plan.counts["unknown"] > 0
    assert blocked.run is not None
    assert not set(recorded_candidates(conns.store, blocked.run.id)) & seeded.live()

    routing_server.clear_faults()
    planned = run(plan_and_record(conns, utc_now()))
    assert planned.outcome is Outcome.SUCCEEDED
    assert planned.plan is not None
    applied = run(apply(conns, ApplyRequest(approved_plan_id=planned.plan.id)))
    assert applied.outcome is Outcome.SUCCEEDED, applied.message
    assert seeded.archived() == seeded.expected_candidates()
    assert not seeded.archived() & seeded.live()

    assert applied.run is not None
    restored = run(restore(conns, applied.run.id, None, utc_now()))
    assert restored.restore is not None
    assert restored.restore.restored == len(seeded.expected_candidates())
    assert seeded.statuses() == before
