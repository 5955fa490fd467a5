"""The operator on the test control plane: Kubernetes API writes per run, and its RSS.

A real kube-apiserver and etcd (tests/support/controlplane.py), the project's CRDs, and the
operator as a subprocess (tests/support/operator.py) watching one namespace. One plan-only
DeploymentCleanup over a generated PostgreSQL inventory; the API server's own request counters
(``apiserver_request_total``) give the writes, by verb and resource, from just before the
resource is created until its status shows the run, and then during an idle window.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.support.controlplane import ControlPlane
from tests.support.operator import (
    CRD,
    PEERING_CRDS,
    Cluster,
    OperatorProcess,
    cleanup_resource,
    wait_for,
)
from tests.support.routing_server import RoutingServer

__all__ = ["measure_operator"]

WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE", "APPLY"})
# kube-apiserver renews its own identity Lease every 10 s; the operator writes no Leases (kopf
# peering uses its own resource), so they are left out rather than charged to the operator.
IGNORED_RESOURCES = frozenset({"leases"})
NAMESPACE = "bench"
TICK_SECONDS = 0.5
IDLE_WINDOW_SECONDS = 10.0
RUN_TIMEOUT_SECONDS = 900.0
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def apiserver_writes(cp: ControlPlane) -> Counter[str]:
    """Write requests the API server has served so far, as ``VERB resource[/subresource]``."""
    counts: Counter[str] = Counter()
    for line in cp.kubectl("get", "--raw", "/metrics").stdout.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels, _, value = line.rpartition(" ")
        parsed = dict(_LABEL.findall(labels))
        if parsed.get("verb") not in WRITE_VERBS:
            continue
        resource = parsed.get("resource", "?")
        if resource in IGNORED_RESOURCES:
            continue
        if parsed.get("subresource"):
            resource += "/" + parsed["subresource"]
        counts[f"{parsed['verb']} {resource}"] += int(float(value))
    return counts


def _delta(after: Counter[str], before: Counter[str]) -> dict[str, int]:
    return {key: n for key in sorted(after) if (n := after[key] - before[key]) > 0}


def process_memory_mib(pid: int) -> dict[str, float]:
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = round(int(value.split()[0]) / 1024, 1)
    return fields


def measure_operator(
    database_url: str, routing: RoutingServer, builds: int, log_dir: Path
) -> dict[str, Any]:
    """One plan-only run through the operator; its API writes, timing and memory."""
    spec = {
        "database": {"urlSecretRef": {"name": "builds-db", "key": "url"}},
        "routing": {"http": {"url": routing.url}, "batchSize": 500, "concurrency": 4},
        "retention": {"keepNewest": 3, "minAge": "7d"},
        "safety": {
            "maxArchivedPerRun": 100_000_000,
            "maxArchivedPercent": 100,
            "maxArchivedPerProject": 100_000,
            "referenceSet": {"maxDropPercent": 100, "minCount": 1},
        },
    }
    with ControlPlane() as cp:
        for path in (CRD, PEERING_CRDS):
            cp.kubectl("apply", "--server-side", "-f", str(path))
        cp.kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/deploymentcleanups.deployment-cleanup.dev",
            "crd/kopfpeerings.kopf.dev",
        )
        cp.kubectl("create", "namespace", NAMESPACE)
        cluster = Cluster(cp, NAMESPACE)
        cluster.secret("builds-db", url=database_url)
        log = log_dir / "operator.log"
        with OperatorProcess(cp, NAMESPACE, log, tick=TICK_SECONDS) as operator:
            assert operator.process is not None
            pid = operator.process.pid
            time.sleep(IDLE_WINDOW_SECONDS)  # settle after start-up, then read idle memory
            idle = process_memory_mib(pid)
            before = apiserver_writes(cp)
            began = time.perf_counter()
            cluster.apply(cleanup_resource(spec))  # the bench's own write: 1 POST
            try:
                wait_for(
                    lambda: (cluster.status().get("run") or {}).get("state") == "Planned",
                    timeout=RUN_TIMEOUT_SECONDS,
                    interval=0.5,
                    what="the operator's plan",
                )
            except AssertionError as exc:
                raise RuntimeError(f"{exc}\noperator log:\n{log.read_text()[-3000:]}") from None
            run_seconds = time.perf_counter() - began
            after_run = apiserver_writes(cp)
            time.sleep(IDLE_WINDOW_SECONDS)
            after_idle = apiserver_writes(cp)
            memory_after = process_memory_mib(pid)
            status = cluster.status()
    run_writes = _delta(after_run, before)
    return {
        "builds": builds,
        "tick_seconds": TICK_SECONDS,
        "seconds_to_planned_status": round(run_seconds, 2),
        "candidates": status["plan"]["counts"]["candidates"],
        # Includes the bench's own create of the resource (POST deploymentcleanups).
        "writes_during_run": run_writes,
        "writes_during_run_total": sum(run_writes.values()),
        "idle_window_seconds": IDLE_WINDOW_SECONDS,
        "writes_while_idle": _delta(after_idle, after_run),
        "rss_idle_before_run_mib": idle["VmRSS"],
        "rss_after_run_mib": memory_after["VmRSS"],
        "peak_rss_mib": memory_after["VmHWM"],
    }
