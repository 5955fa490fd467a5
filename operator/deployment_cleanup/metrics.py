"""Prometheus metrics of the operator, served on their own HTTP port."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

__all__ = [
    "BUILDS_ARCHIVED",
    "BUILDS_RESTORED",
    "KILL_SWITCH",
    "LAST_SUCCESS",
    "LOOKUP_BATCHES_FAILED",
    "RUNS",
    "RUN_DURATION",
    "STATUS_WRITES",
    "forget_cleanup",
    "serve_metrics",
]

RUNS = Counter(
    "deployment_cleanup_runs_total",
    "Runs by outcome (Succeeded, Blocked, AwaitingApproval, Stopped, Failed).",
    ["namespace", "name", "outcome"],
)
LOOKUP_BATCHES_FAILED = Counter(
    "deployment_cleanup_lookup_batches_failed_total",
    "Routing lookup batches that failed (each one blocks its run).",
    ["namespace", "name"],
)
BUILDS_ARCHIVED = Counter(
    "deployment_cleanup_builds_archived_total", "Builds archived.", ["namespace", "name"]
)
BUILDS_RESTORED = Counter(
    "deployment_cleanup_builds_restored_total", "Builds restored.", ["namespace", "name"]
)
RUN_DURATION = Histogram(
    "deployment_cleanup_run_duration_seconds",
    "Wall time of one run.",
    ["namespace", "name"],
    buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 7200),
)
LAST_SUCCESS = Gauge(
    "deployment_cleanup_last_success_timestamp_seconds",
    "Unix time of the last run that succeeded (a ready plan or a completed apply).",
    ["namespace", "name"],
)
STATUS_WRITES = Counter(
    "deployment_cleanup_status_writes_total",
    "Status subresource patches: bounded per run, and none while idle.",
    ["namespace", "name"],
)
KILL_SWITCH = Gauge(
    "deployment_cleanup_kill_switch_enabled",
    "1 while the global kill switch stops destructive steps.",
)


_PER_CLEANUP = (
    LOOKUP_BATCHES_FAILED,
    BUILDS_ARCHIVED,
    BUILDS_RESTORED,
    RUN_DURATION,
    LAST_SUCCESS,
    STATUS_WRITES,
)


def forget_cleanup(namespace: str, name: str, outcomes: Iterable[str]) -> None:
    """Drop a deleted cleanup's series: a stale last-success time would fire its alert."""
    for metric in _PER_CLEANUP:
        with contextlib.suppress(KeyError):  # never set for this cleanup
            metric.remove(namespace, name)
    for outcome in outcomes:
        with contextlib.suppress(KeyError):
            RUNS.remove(namespace, name, outcome)


def serve_metrics(port: int, address: str = "0.0.0.0") -> None:  # noqa: S104 (scraped from other Pods)
    start_http_server(port, addr=address)
