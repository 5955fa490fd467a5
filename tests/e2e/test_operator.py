"""The operator on a real kube-apiserver: status, Events, approval, faults, crashes, secrets.

Each test gets its own namespace and builds database; the operator runs as a
real subprocess watching only that namespace.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from deployment_cleanup.seed import reference_tables
from tests.support.inventory import Seeded, seed
from tests.support.operator import (
    Cluster,
    OperatorProcess,
    cleanup_resource,
    cluster_spec,
    wait_for,
)
from tests.support.routing_server import RoutingServer
from tests.support.webhook import WebhookReceiver

TABLES = reference_tables()


@pytest.fixture
def builds(tmp_path: Path) -> Seeded:
    path = tmp_path / "builds.sqlite"
    path.touch()
    return seed(f"sqlite:///{path}")


@pytest.fixture
def operator(cluster: Cluster, tmp_path: Path) -> Iterator[OperatorProcess]:
    with OperatorProcess(cluster.cp, cluster.namespace, tmp_path / "operator.log") as process:
        yield process


def metric(operator: OperatorProcess, series: str) -> float:
    line = next(x for x in operator.metrics().splitlines() if x.startswith(series + " "))
    return float(line.rsplit(" ", 1)[1])


def reconciled(cluster: Cluster, generation: int = 1) -> dict[str, Any] | None:
    status = cluster.status()
    return status if status.get("observedGeneration") == generation and status.get("run") else None


def test_plan_only_resource_gets_status_printer_columns_and_events(
    cluster: Cluster, builds: Seeded, operator: OperatorProcess
) -> None:
    cluster.secret("builds-db", url=builds.url)
    before = builds.statuses()
    cluster.apply(cleanup_resource(cluster_spec()))
    status = wait_for(lambda: reconciled(cluster), what="a recorded plan")

    plan = status["plan"]
    assert plan["verdict"] == "Ready"
    assert plan["counts"]["candidates"] == len(builds.expected_candidates())
    assert {t["name"] for t in plan["thresholds"]} >= {
        "maxArchivedPerRun",
        "maxArchivedPercent",
        "maxArchivedPerProject",
        "referenceSetMinCount",
    }
    assert status["run"]["state"] == "Planned"
    ready = cluster.condition("Ready")
    assert (ready["status"], ready["reason"]) == ("True", "PlanReady")
    assert cluster.condition("LookupsComplete")["status"] == "True"
    assert builds.statuses() == before  # plan-only never changes a build

    table = cluster.kubectl("get", "dcl").stdout
    header = table.splitlines()[0].split()
    assert header[:6] == ["NAME", "READY", "REASON", "MODE", "CANDIDATES", "ARCHIVED"]
    assert "PlanReady" in table
    assert "Planned" in wait_for(cluster.event_reasons, what="events")
    assert 'deployment_cleanup_runs_total{name="nightly"' in operator.metrics()


def test_approval_flow_with_a_stale_approval_refused(
    cluster: Cluster, builds: Seeded, operator: OperatorProcess
) -> None:
    cluster.secret("builds-db", url=builds.url)
    before = builds.statuses()
    cluster.apply(cleanup_resource(cluster_spec(mode="Apply")))
    status = wait_for(lambda: reconciled(cluster), what="a plan awaiting approval")
    assert cluster.condition("AwaitingApproval")["status"] == "True"
    first_plan = status["plan"]["id"]
    assert builds.statuses() == before
    assert "AwaitingApproval" in cluster.event_reasons()

    # The data changes (a candidate gets routed), then the now stale plan is approved.
    victim = int(status["plan"]["candidatesSample"][0]["build"])
    with builds.engine.begin() as conn:
        conn.execute(
            insert(TABLES.routes).values(build_id=victim, hostname="rollback.example.test")
        )
    cluster.apply(
        cleanup_resource(cluster_spec(mode="Apply", approval={"approvedPlanId": first_plan}))
    )
    status = wait_for(lambda: reconciled(cluster, 2), what="the stale approval refused")
    assert cluster.condition("AwaitingApproval")["status"] == "True"
    assert first_plan in cluster.condition("AwaitingApproval")["message"]
    assert status["plan"]["id"] != first_plan
    assert builds.statuses() == before

    # Approving the current plan archives exactly its candidates.
    current = status["plan"]["id"]
    cluster.apply(
        cleanup_resource(cluster_spec(mode="Apply", approval={"approvedPlanId": current}))
    )
    status = wait_for(lambda: reconciled(cluster, 3), what="the apply")
    assert status["run"]["state"] == "Succeeded"
    assert cluster.condition("Ready")["reason"] == "Applied"
    expected = builds.expected_candidates() - {victim}
    assert builds.archived() == expected
    assert status["run"]["archived"] == len(expected)
    assert "Archived" in cluster.event_reasons()

    # Restore the run with one command: an annotation.
    run_id = status["run"]["id"]
    cluster.kubectl("annotate", "dcl", "nightly", f"deployment-cleanup.dev/restore-run={run_id}")
    wait_for(
        lambda: (cluster.status().get("lastRestore") or {}).get("restored"), what="the restore"
    )
    assert builds.archived() == set()
    assert "Restored" in cluster.event_reasons()


def test_failed_lookup_batch_blocks_with_condition_event_and_metric(
    cluster: Cluster, builds: Seeded, operator: OperatorProcess
) -> None:
    cluster.secret("builds-db", url=builds.url)
    before = builds.statuses()
    with RoutingServer() as routing, WebhookReceiver() as webhook:
        cluster.secret("slack", url=webhook.url)
        routing.set_routed(str(b) for b in builds.live())
        target = str(builds.inventory.active[20])
        routing.add_fault("hang", match=lambda ids: target in ids)
        routing_spec = {
            "http": {"url": routing.url},
            "batchSize": 50,
            "readTimeout": "300ms",
            "batchDeadline": "1s",
            "retries": {"maxAttempts": 1},
        }
        notifications = {"webhook": {"urlSecretRef": {"name": "slack", "key": "url"}}}
        cluster.apply(
            cleanup_resource(
                cluster_spec(
                    mode="Apply",
                    approval={"mode": "Automatic"},
                    routing=routing_spec,
                    notifications=notifications,
                )
            )
        )
        status = wait_for(lambda: reconciled(cluster), what="a blocked run")
        notes = wait_for(lambda: webhook.messages, what="a webhook notification")
    assert notes[0]["text"].startswith(f"{cluster.namespace}/nightly: Blocked:")
    assert status["plan"]["verdict"] == "Blocked"
    assert status["plan"]["lookups"]["failed"] == 1
    assert cluster.condition("LookupsComplete")["reason"] == "LookupsIncomplete"
    assert cluster.condition("Ready")["reason"] == "LookupsIncomplete"
    blocked = [e for e in cluster.events() if e["reason"] == "Blocked"]
    assert blocked
    assert blocked[0]["type"] == "Warning"
    assert "routing lookup batches failed" in blocked[0]["message"]
    metrics = operator.metrics()
    assert 'deployment_cleanup_lookup_batches_failed_total{name="nightly"' in metrics
    assert 'outcome="Blocked"' in metrics
    assert builds.statuses() == before


def test_operator_killed_mid_apply_resumes_without_archiving_twice_or_outside_the_plan(
    cluster: Cluster, builds: Seeded, tmp_path: Path
) -> None:
    cluster.secret("builds-db", url=builds.url)
    log = tmp_path / "operator.log"
    slow = cluster_spec(
        mode="Apply",
        approval={"mode": "Automatic"},
        execution={"batchSize": 5, "canaryBatchSize": 5, "pauseBetweenBatches": "300ms"},
    )
    first = OperatorProcess(cluster.cp, cluster.namespace, log).start()
    try:
        cluster.apply(cleanup_resource(slow))
        wait_for(lambda: len(builds.archived()) >= 10, what="a few archived batches")
    finally:
        first.kill()
    partly = builds.archived()
    expected = builds.expected_candidates()
    assert partly < expected
    # New data arrives while the operator is down; a fresh plan would include it,
    # but the interrupted apply must finish its own plan only.
    with builds.engine.begin() as conn:
        conn.execute(
            insert(TABLES.routes).values(
                build_id=min(expected - partly), hostname="late.example.test"
            )
        )
    with OperatorProcess(cluster.cp, cluster.namespace, log):
        status = wait_for(
            lambda: (
                (cluster.status().get("run") or {}).get("state") == "Succeeded" and cluster.status()
            ),
            timeout=60,
            what="the resumed apply",
        )
    audit = builds.engine.connect()
    try:
        rows = audit.exec_driver_sql(
            "SELECT build_id, count(*) FROM deployment_cleanup_audit WHERE action = 'archive' GROUP BY build_id"
        ).all()
    finally:
        audit.close()
    assert all(count == 1 for _, count in rows)  # nothing archived twice
    archived = builds.archived()
    assert archived <= expected  # nothing outside the plan
    assert min(expected - partly) not in archived  # the late route was honoured by the re-check
    assert len(archived) + status["run"]["skipped"] == len(expected)


@pytest.mark.parametrize(
    "peering",
    [
        pytest.param(True, id="peering-with-priorities"),
        pytest.param(False, id="two-standalone-by-mistake"),
    ],
)
def test_two_operators_at_once_only_one_acts(
    cluster: Cluster, builds: Seeded, tmp_path: Path, peering: bool
) -> None:
    cluster.secret("builds-db", url=builds.url)
    if peering:
        cluster.apply(
            {
                "apiVersion": "kopf.dev/v1",
                "kind": "KopfPeering",
                "metadata": {"name": "deployment-cleanup"},
            }
        )
    a = OperatorProcess(
        cluster.cp,
        cluster.namespace,
        tmp_path / "a.log",
        identity="replica-a",
        peering="deployment-cleanup" if peering else None,
        priority=100,
    )
    b = OperatorProcess(
        cluster.cp,
        cluster.namespace,
        tmp_path / "b.log",
        identity="replica-b",
        peering="deployment-cleanup" if peering else None,
        priority=50,
    )
    with a, b:
        cluster.apply(
            cleanup_resource(
                cluster_spec(
                    mode="Apply",
                    approval={"mode": "Automatic"},
                    execution={
                        "batchSize": 10,
                        "canaryBatchSize": 5,
                        "pauseBetweenBatches": "100ms",
                    },
                )
            )
        )
        wait_for(
            lambda: builds.archived() == builds.expected_candidates(), timeout=60, what="the apply"
        )
        wait_for(lambda: cluster.condition("Ready").get("status") == "True", what="a ready status")
    conn = builds.engine.connect()
    try:
        writers = (
            conn.exec_driver_sql(
                "SELECT DISTINCT fencing_token FROM deployment_cleanup_audit WHERE action = 'archive'"
            )
            .scalars()
            .all()
        )
        twice = conn.exec_driver_sql(
            "SELECT build_id FROM deployment_cleanup_audit GROUP BY build_id HAVING count(*) > 1"
        ).all()
        holder = conn.exec_driver_sql("SELECT holder FROM deployment_cleanup_locks").scalar_one()
    finally:
        conn.close()
    assert len(writers) == 1  # every batch was written under one lease
    assert twice == []
    if peering:
        assert holder == "replica-a"  # the higher priority acts; the other stays paused


def test_kill_switch_stops_an_apply_between_batches(
    cluster: Cluster, builds: Seeded, operator: OperatorProcess
) -> None:
    cluster.secret("builds-db", url=builds.url)
    slow = cluster_spec(
        mode="Apply",
        approval={"mode": "Automatic"},
        execution={"batchSize": 5, "canaryBatchSize": 5, "pauseBetweenBatches": "500ms"},
    )
    cluster.apply(cleanup_resource(slow))
    wait_for(lambda: len(builds.archived()) >= 5, what="the first batch")
    switched_at = time.monotonic()
    cluster.kubectl(
        "create", "configmap", "deployment-cleanup-kill-switch", "--from-literal=enabled=true"
    )
    status = wait_for(
        lambda: (cluster.status().get("run") or {}).get("state") == "Stopped" and cluster.status(),
        what="the apply to stop",
    )
    stopped_after = time.monotonic() - switched_at
    frozen = builds.archived()
    time.sleep(2)
    assert builds.archived() == frozen
    assert frozen < builds.expected_candidates()
    assert stopped_after < 10
    assert "kill switch" in status["run"]["message"]
    assert status["killSwitch"] is True
    assert "Stopped" in cluster.event_reasons()
    assert "deployment_cleanup_kill_switch_enabled 1.0" in operator.metrics()
    assert status["heldApply"] == {"generation": 1}

    # Switched off again, the held-back apply runs: a kill switch pauses, it does not cancel.
    cluster.kubectl("delete", "configmap", "deployment-cleanup-kill-switch")
    status = wait_for(
        lambda: (
            (cluster.status().get("run") or {}).get("state") == "Succeeded" and cluster.status()
        ),
        timeout=60,
        what="the held-back apply to finish",
    )
    assert builds.archived() == builds.expected_candidates()
    assert not status.get("heldApply")


def test_secrets_never_appear_in_status_events_or_logs(
    cluster: Cluster, builds: Seeded, operator: OperatorProcess
) -> None:
    canary_password = "CANARY-pw-" + uuid.uuid4().hex[:8]
    canary_token = "CANARY-tok-" + uuid.uuid4().hex[:8]
    cluster.secret("builds-db", url=f"postgresql://cleanup:{canary_password}@127.0.0.1:9/builds")
    cluster.secret("routing-token", token=canary_token)
    cluster.apply(
        cleanup_resource(
            cluster_spec(
                routing={
                    "http": {
                        "url": "http://127.0.0.1:9/lookup",
                        "tokenSecretRef": {"name": "routing-token", "key": "token"},
                    }
                },
            )
        )
    )
    wait_for(lambda: cluster.status().get("failure"), what="a failed run")
    # Now a run that reaches the routing API with the token, and fails there.
    cluster.secret("builds-db", url=builds.url)
    cluster.kubectl(
        "patch",
        "dcl",
        "nightly",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"retention": {"keepNewest": 3}}}),
    )
    wait_for(lambda: reconciled(cluster, 2), timeout=90, what="the blocked plan")
    everything = "\n".join(
        [
            json.dumps(cluster.get()),
            json.dumps(cluster.events()),
            operator.log.read_text(),
        ]
    )
    assert "Failed" in everything
    assert canary_password not in everything
    assert canary_token not in everything


def test_a_scheduled_apply_only_plans_on_creation_and_reports_its_next_time(
    cluster: Cluster, builds: Seeded, operator: OperatorProcess
) -> None:
    cluster.secret("builds-db", url=builds.url)
    before = builds.statuses()
    hourly = {"cron": "0 * * * *", "timeZone": "Europe/Berlin"}
    cluster.apply(
        cleanup_resource(
            cluster_spec(mode="Apply", approval={"mode": "Automatic"}, schedule=hourly)
        )
    )
    status = wait_for(lambda: reconciled(cluster), what="the first plan")
    assert status["run"]["kind"] == "plan"  # creating a scheduled resource never archives by itself
    assert builds.statuses() == before
    next_time = status["schedule"]["nextScheduleTime"]
    assert next_time.endswith(":00:00Z")
    assert next_time > status["run"]["startedAt"]
    # Idle ticks write nothing while nothing is due.
    writes = (
        f'deployment_cleanup_status_writes_total{{name="nightly",namespace="{cluster.namespace}"}}'
    )
    settled = metric(operator, writes)
    time.sleep(3)  # six ticks
    assert metric(operator, writes) == settled


def test_a_deleted_cleanup_leaves_no_metric_series_behind(
    cluster: Cluster, builds: Seeded, operator: OperatorProcess
) -> None:
    # A last-success time left behind would fire the NoRecentSuccess alert for a cleanup
    # that no longer exists.
    cluster.secret("builds-db", url=builds.url)
    cluster.apply(cleanup_resource(cluster_spec()))
    wait_for(lambda: reconciled(cluster), what="a recorded plan")
    series = f'namespace="{cluster.namespace}"'
    last_success = "deployment_cleanup_last_success_timestamp_seconds{"
    assert any(
        line.startswith(last_success) and series in line for line in operator.metrics().splitlines()
    )
    cluster.kubectl("delete", "dcl", "nightly", "--timeout=60s")
    wait_for(
        lambda: not any(series in line for line in operator.metrics().splitlines()),
        timeout=30,
        what="the deleted cleanup's series gone",
    )
