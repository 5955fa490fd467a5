"""Faults 5, 7, 9, 10: the operator process killed, the API server down, two operators, secrets."""

from __future__ import annotations

import json
import random
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.inventory import Seeded, seed
from tests.support.operator import (
    Cluster,
    OperatorProcess,
    cleanup_resource,
    cluster_spec,
    wait_for,
)
from tests.support.reliability import Outcome as Row
from tests.support.reliability import Watch, scale

PACED = {"batchSize": 5, "canaryBatchSize": 5, "pauseBetweenBatches": "200ms"}


def apply_spec(**sections: Any) -> dict[str, Any]:
    return cluster_spec(
        **({"mode": "Apply", "approval": {"mode": "Automatic"}, "execution": PACED} | sections)
    )


def run_state(cluster: Cluster) -> str | None:
    return (cluster.status().get("run") or {}).get("state")


def fresh_builds(tmp_path: Path, name: str, projects: int = 40) -> Seeded:
    path = tmp_path / f"{name}.sqlite"
    path.touch()
    return seed(f"sqlite:///{path}", projects=projects)


def test_kill_9_at_step_boundaries(crds: Any, tmp_path: Path, outcome: Row) -> None:
    for seed_value in range(scale(2, 50)):
        _kill_and_resume(crds, tmp_path, seed_value, outcome)
    outcome.notes.append(f"{scale(2, 50)} seeds: killed after 0-6 archive batches plus 0-300 ms")


def _kill_and_resume(crds: Any, tmp_path: Path, seed_value: int, outcome: Row) -> None:
    cluster = Cluster(crds, f"k-{uuid.uuid4().hex[:10]}")
    crds.kubectl("create", "namespace", cluster.namespace)
    builds = fresh_builds(tmp_path, f"kill-{seed_value}")
    cluster.secret("builds-db", url=builds.url)
    watch = Watch(builds)
    rng = random.Random(seed_value)
    # Where to die: right after the plan is recorded (0 archived), or after the n-th
    # batch, plus up to 300 ms more so some kills land before the status write.
    after_batches = rng.randint(0, 6)
    extra = rng.uniform(0, 0.3)
    log = tmp_path / f"operator-{seed_value}.log"
    first = OperatorProcess(cluster.cp, cluster.namespace, log).start()
    try:
        cluster.apply(cleanup_resource(apply_spec()))
        wait_for(
            lambda: len(builds.archived()) >= 5 * after_batches and _run_recorded(builds),
            timeout=60,
            what="the kill point",
        )
        time.sleep(extra)
    finally:
        first.kill()
    killed_at = time.monotonic()
    with OperatorProcess(cluster.cp, cluster.namespace, log):
        wait_for(lambda: run_state(cluster) == "Succeeded", timeout=90, what="the resumed apply")
    outcome.recovery_seconds.append(time.monotonic() - killed_at)
    _assert_each_archived_once(builds)
    watch.check(outcome, approved=builds.expected_candidates())
    builds.engine.dispose()


def _run_recorded(builds: Seeded) -> bool:
    with builds.engine.connect() as conn:
        try:
            count = conn.exec_driver_sql(
                "SELECT count(*) FROM deployment_cleanup_runs"
            ).scalar_one()
        except Exception:  # the tables do not exist before the first run
            return False
    return bool(count)


def _assert_each_archived_once(builds: Seeded) -> None:
    with builds.engine.connect() as conn:
        twice = conn.exec_driver_sql(
            "SELECT build_id FROM deployment_cleanup_audit WHERE action = 'archive' "
            "GROUP BY build_id HAVING count(*) > 1"
        ).all()
    assert twice == []


def test_api_server_down_mid_run(crds: Any, cluster: Cluster, tmp_path: Path, outcome: Row) -> None:
    outage = scale(5, 60)
    builds = fresh_builds(tmp_path, "outage", projects=60)
    cluster.secret("builds-db", url=builds.url)
    watch = Watch(builds)
    with OperatorProcess(cluster.cp, cluster.namespace, tmp_path / "operator.log") as operator:
        cluster.apply(
            cleanup_resource(apply_spec(execution=PACED | {"pauseBetweenBatches": "500ms"}))
        )
        wait_for(lambda: len(builds.archived()) >= 10, timeout=60, what="archiving under way")
        cluster.cp.stop_apiserver()
        stopped_at = time.monotonic()
        time.sleep(3)  # the kill switch poller fails closed within a poll or two
        frozen = builds.archived()
        time.sleep(max(outage - 3, 1))
        assert builds.archived() == frozen, "archived while the API server was down"
        cluster.cp.start_apiserver()
        wait_for(
            lambda: (
                run_state(cluster) == "Succeeded"
                and builds.archived() == builds.expected_candidates()
            ),
            timeout=90,
            what="recovery without a restart",
        )
        # An API server outage is not the run's failure: no Failed status or Event, so no
        # growing backoff (a failure recorded in the instant the API server came back once
        # held the run back for minutes).
        assert "Failed" not in cluster.event_reasons()
        outcome.recovery_seconds.append(time.monotonic() - stopped_at - outage)
        assert operator.process is not None
        assert operator.process.poll() is None  # the same process recovered
    outcome.notes.append(
        f"API server stopped for {outage}s mid-apply: no batch was written without it"
    )
    watch.check(outcome, approved=builds.expected_candidates())


@pytest.mark.parametrize(
    "priorities", [(100, 100), (100, 50)], ids=["same-priority", "different-priority"]
)
def test_two_operators(
    crds: Any, cluster: Cluster, tmp_path: Path, outcome: Row, priorities: tuple[int, int]
) -> None:
    builds = fresh_builds(tmp_path, "two")
    cluster.secret("builds-db", url=builds.url)
    cluster.apply(
        {
            "apiVersion": "kopf.dev/v1",
            "kind": "KopfPeering",
            "metadata": {"name": "deployment-cleanup"},
        }
    )
    watch = Watch(builds)
    a = OperatorProcess(
        cluster.cp,
        cluster.namespace,
        tmp_path / "a.log",
        identity="replica-a",
        peering="deployment-cleanup",
        priority=priorities[0],
    )
    b = OperatorProcess(
        cluster.cp,
        cluster.namespace,
        tmp_path / "b.log",
        identity="replica-b",
        peering="deployment-cleanup",
        priority=priorities[1],
    )
    with a, b:
        cluster.apply(cleanup_resource(apply_spec()))
        if priorities[0] == priorities[1]:
            # Equal priorities: kopf pauses both; nothing may be archived meanwhile.
            time.sleep(5)
            assert builds.archived() == set()
            outcome.notes.append("same priority: kopf paused both operators; nothing was archived")
        else:
            wait_for(
                lambda: builds.archived() == builds.expected_candidates(),
                timeout=60,
                what="the apply",
            )
    with builds.engine.connect() as conn:
        tokens = (
            conn.exec_driver_sql(
                "SELECT DISTINCT fencing_token FROM deployment_cleanup_audit WHERE action = 'archive'"
            )
            .scalars()
            .all()
        )
    assert len(tokens) <= 1  # at most one writer, checked by the database's fencing tokens
    _assert_each_archived_once(builds)
    watch.check(outcome, approved=builds.expected_candidates())


FAILURE_PATHS = {
    "database-unreachable": {"url": "postgresql://cleanup:{password}@127.0.0.1:9/builds"},
    "database-auth-url-in-error": {
        "url": "postgresql://cleanup:{password}@no-such-host.invalid:5432/builds"
    },
    "routing-unreachable": {
        "routing": {
            "http": {
                "url": "http://127.0.0.1:9/lookup",
                "tokenSecretRef": {"name": "routing", "key": "token"},
            }
        }
    },
    "routing-refuses-token": {
        "routing": {
            "http": {
                "url": "http://127.0.0.1:{port}/lookup",
                "tokenSecretRef": {"name": "routing", "key": "token"},
            }
        }
    },
    "secret-key-missing": {"database": {"urlSecretRef": {"name": "builds-db", "key": "missing"}}},
}


@pytest.mark.parametrize("path", list(FAILURE_PATHS))
def test_secret_canaries_on_every_failure_path(
    crds: Any, cluster: Cluster, tmp_path: Path, outcome: Row, path: str
) -> None:
    from tests.support.routing_server import RoutingServer  # noqa: PLC0415

    password = "CANARY-pw-" + uuid.uuid4().hex[:8]
    token = "CANARY-tok-" + uuid.uuid4().hex[:8]
    builds = fresh_builds(tmp_path, "secrets", projects=10)
    change = json.loads(json.dumps(FAILURE_PATHS[path]))
    with (
        RoutingServer(token="the-right-token") as routing,
        OperatorProcess(cluster.cp, cluster.namespace, tmp_path / "operator.log") as operator,
    ):
        url = change.pop("url", builds.url).replace("{password}", password)
        cluster.secret("builds-db", url=url)
        cluster.secret("routing", token=token)
        text = json.dumps(change).replace("{port}", str(routing.port))
        cluster.apply(cleanup_resource(apply_spec(**json.loads(text))))
        wait_for(
            lambda: (
                cluster.status().get("failure")
                or (cluster.status().get("plan") or {}).get("verdict")
            ),
            timeout=60,
            what="the failed or blocked run",
        )
        time.sleep(1)
        everything = "\n".join(
            [json.dumps(cluster.get()), json.dumps(cluster.events()), operator.log.read_text()]
        )
    assert password not in everything
    assert token not in everything
    assert "Failed" in everything or "Blocked" in everything
    outcome.runs += 1
    outcome.notes.append(f"{path}: canaries absent from status, annotations, Events and logs")


def test_resource_edited_during_a_run(
    crds: Any, cluster: Cluster, tmp_path: Path, outcome: Row
) -> None:
    builds = fresh_builds(tmp_path, "edited", projects=60)
    cluster.secret("builds-db", url=builds.url)
    watch = Watch(builds)
    with OperatorProcess(cluster.cp, cluster.namespace, tmp_path / "operator.log"):
        cluster.apply(cleanup_resource(apply_spec()))
        wait_for(lambda: len(builds.archived()) >= 10, timeout=60, what="archiving under way")
        # Someone tightens retention mid-run: the approved plan finishes as approved, and the
        # new generation gets its own plan afterwards (which finds nothing more to archive).
        edited = apply_spec(retention={"keepNewest": 4, "minAge": "7d"})
        cluster.apply(cleanup_resource(edited))
        wait_for(
            lambda: (
                cluster.status().get("observedGeneration") == 2
                and run_state(cluster) == "Succeeded"
            ),
            timeout=90,
            what="the edited generation reconciled",
        )
    assert builds.archived() == builds.expected_candidates()  # the first plan, exactly
    outcome.notes.append(
        "spec edited mid-apply: the approved plan finished; generation 2 was planned after it"
    )
    watch.check(outcome, approved=builds.expected_candidates())
