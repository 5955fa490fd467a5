"""One engine measurement in a fresh process, so that its peak RSS is its own.

``python -m bench.worker '<json config>'`` prints one JSON object on stdout. Modes:

* ``plan``: ``connect`` + ``plan_and_record`` (scan, lookups, classification, recording), the
  status object's size, lookup batch latencies, and memory (VmRSS/VmHWM) at each phase;
* ``archive``: ``apply`` of the current plan (approved as current) and ``restore`` of that run,
  with the plan, the recording of the items and the archive batches timed separately.

Phases are timed by wrapping engine functions in this process only (``runs._make_plan``: the
plan with its candidates streamed into the items table; ``PlanRecorder.finish``: the last
chunk, the run row, ANALYZE and the commit; ``StateStore`` methods); the engine's code is not
changed.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import resource
import sys
import time
import tracemalloc
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

from deployment_cleanup import runs
from deployment_cleanup.archive import StateStore
from deployment_cleanup.db import EnvironmentSecrets
from deployment_cleanup.planning import Plan
from deployment_cleanup.recording import PlanRecorder
from deployment_cleanup.runs import ApplyRequest, Connections, apply, connect, plan_and_record
from deployment_cleanup.spec import API_VERSION, KIND, DeploymentCleanup, parse_cleanup
from deployment_cleanup.status import build_status

from .lookups import percentile

__all__ = ["WorkerConfig", "main"]

MIB = 1024 * 1024
# Missing names are skipped: the engine evolves, and a renamed method only loses its timing.
TIMED_STORE_METHODS = (
    "ensure_tables",
    "last_successful_reference",
    "last_successful_reference_count",
    "prune_plan_items",
    "pending_items",
    "archive_batch",
    "get_run",
    "acquire_lock",
    "finish_run",
    "restore",
)


class WorkerConfig(TypedDict):
    mode: str  # "plan" or "archive"
    database_url: str
    routing_url: str
    keep_newest: int
    batch_size: int
    concurrency: int
    execution_batch_size: int
    canary_batch_size: int
    trace_memory: bool


def cleanup_for(config: WorkerConfig) -> DeploymentCleanup:
    """The benchmarked spec: HTTP routing, and thresholds wide enough for a Ready plan."""
    return parse_cleanup(
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": "bench", "namespace": "bench"},
            "spec": {
                "database": {"url": config["database_url"]},
                "routing": {
                    "http": {"url": config["routing_url"]},
                    "batchSize": config["batch_size"],
                    "concurrency": config["concurrency"],
                },
                "retention": {"keepNewest": config["keep_newest"], "minAge": "7d"},
                "safety": {
                    "maxArchivedPerRun": 100_000_000,
                    "maxArchivedPercent": 100,
                    "maxArchivedPerProject": 100_000,
                    "referenceSet": {"maxDropPercent": 100, "minCount": 1},
                },
                "execution": {
                    "batchSize": config["execution_batch_size"],
                    "canaryBatchSize": config["canary_batch_size"],
                },
            },
        }
    )


def memory() -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of this process, in MiB."""
    fields: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024 / MIB
    return fields


class GcTimer:
    """Time spent in the cyclic garbage collector, per generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self._began = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._began
            self.collections[info["generation"]] += 1


class Probe:
    """Wall time and call counts per wrapped function, memory at checkpoints, progress times."""

    def __init__(self, trace_memory: bool) -> None:
        self.gc = GcTimer()
        self.started = time.perf_counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self.checkpoints: dict[str, dict[str, float]] = {"start": memory()}
        self.progress_times: dict[str, list[float]] = {}
        self.trace_memory = trace_memory
        self.memory_top: dict[str, list[str]] = {}
        if trace_memory:
            tracemalloc.start()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def checkpoint(self, name: str) -> None:
        self.checkpoints[name] = memory()
        if self.trace_memory:
            snapshot = tracemalloc.take_snapshot()
            self.memory_top[name] = [str(stat) for stat in snapshot.statistics("lineno")[:15]]

    def progress(self, phase: str, done: int, total: int, run_id: str | None) -> None:
        times = self.progress_times.setdefault(phase, [])
        # First and latest call only: a million builds report progress a thousand times.
        if times:
            times[1:] = [self.elapsed()]
        else:
            times.append(self.elapsed())

    def wrap(self, owner: Any, name: str, checkpoint: bool = False) -> None:
        original: Callable[..., Any] | None = getattr(owner, name, None)
        if original is None:
            return

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - began
                self.calls[name] += 1
                if checkpoint:
                    self.checkpoint(f"after {name}")

        setattr(owner, name, timed)

    def wrap_async(self, owner: Any, name: str, checkpoint: bool = False) -> None:
        original: Callable[..., Awaitable[Any]] | None = getattr(owner, name, None)
        if original is None:
            return

        @functools.wraps(original)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - began
                self.calls[name] += 1
                if checkpoint:
                    self.checkpoint(f"after {name}")

        setattr(owner, name, timed)

    def report(self) -> dict[str, Any]:
        self.checkpoint("end")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            # CPU close to wall time means the run is bound by this one process (and its GIL).
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "wall_seconds": round(self.elapsed(), 2),
            "gc_seconds_by_generation": [round(s, 3) for s in self.gc.seconds],
            "gc_collections_by_generation": self.gc.collections,
            "seconds_by_function": {k: round(v, 4) for k, v in self.seconds.items()},
            "calls_by_function": dict(self.calls),
            "memory_mib": {
                k: {n: round(v, 1) for n, v in m.items()} for k, m in self.checkpoints.items()
            },
            "peak_rss_mib": round(memory()["VmHWM"], 1),
            "progress_seconds": {
                k: [round(t, 3) for t in v] for k, v in self.progress_times.items()
            },
            "memory_top": self.memory_top,
        }


def lookup_stats(plan: Plan) -> dict[str, Any]:
    latencies = [r.seconds for r in plan.receipts]
    return {
        "batches": len(plan.receipts),
        "failed": len(plan.failed_receipts),
        "ids": sum(r.size for r in plan.receipts),
        "p50_batch_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_batch_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "max_batch_ms": round(max(latencies, default=0.0) * 1000, 2),
    }


def status_size(conns: Connections, result: runs.RunResult, now: datetime) -> int:
    """Bytes of the status object the operator would write, as compact JSON."""
    history = conns.store.list_runs(conns.cleanup.key)
    status = build_status(
        generation=1,
        now=now,
        outcome=str(result.outcome),
        message=result.message,
        plan=result.plan,
        run=result.run,
        history=history,
    )
    return len(json.dumps(status, separators=(",", ":")).encode())


async def measure_plan(conns: Connections, probe: Probe) -> dict[str, Any]:
    now = datetime.now(UTC)
    began = time.perf_counter()
    result = await plan_and_record(conns, now, probe.progress)
    seconds = time.perf_counter() - began
    plan = result.plan
    assert plan is not None
    if not plan.ready:
        raise SystemExit(f"the benchmark plan is not ready: {plan.message}")
    stats = lookup_stats(plan)
    make_plan_seconds = probe.seconds["_make_plan"]
    return {
        "outcome": str(result.outcome),
        "plan_seconds": round(seconds, 4),
        "counts": dict(plan.counts),
        "candidates": plan.candidate_count,
        "lookups": stats
        | {
            "ids_per_second": round(stats["ids"] / make_plan_seconds, 1)
            if make_plan_seconds
            else 0.0
        },
        "status_bytes": status_size(conns, result, now),
    }


async def measure_archive(conns: Connections, probe: Probe) -> dict[str, Any]:
    began = time.perf_counter()
    result = await apply(conns, ApplyRequest(None, approve_current=True), progress=probe.progress)
    apply_seconds = time.perf_counter() - began
    run = result.run
    if run is None or result.outcome is not runs.Outcome.SUCCEEDED:
        raise SystemExit(f"the benchmark apply did not succeed: {result.message}")
    plan_seconds = probe.seconds["_make_plan"]
    record_seconds = probe.seconds["finish"]
    began = time.perf_counter()
    restored = await runs.restore(conns, run.id, None, datetime.now(UTC))
    restore_seconds = time.perf_counter() - began
    assert restored.restore is not None
    return {
        "outcome": str(result.outcome),
        "apply_seconds": round(apply_seconds, 4),
        "plan_seconds": round(plan_seconds, 4),
        "record_items_seconds": round(record_seconds, 4),
        # Everything after the plan: recording the items, the lock, and the batches with their
        # re-check lookups, guarded UPDATEs and audit rows.
        "archive_seconds": round(apply_seconds - plan_seconds, 4),
        "batches_seconds": round(apply_seconds - plan_seconds - record_seconds, 4),
        "archived": run.archived,
        "skipped": run.skipped,
        "restore_seconds": round(restore_seconds, 4),
        "restored": restored.restore.restored,
    }


async def measure(config: WorkerConfig, probe: Probe) -> dict[str, Any]:
    began = time.perf_counter()
    conns = connect(cleanup_for(config), EnvironmentSecrets(environ={}))
    connect_seconds = time.perf_counter() - began
    probe.checkpoint("after connect")
    try:
        if config["mode"] == "plan":
            result = await measure_plan(conns, probe)
        else:
            result = await measure_archive(conns, probe)
    finally:
        conns.close()
    return {"connect_seconds": round(connect_seconds, 4)} | result


def main() -> None:
    config: WorkerConfig = json.loads(sys.argv[1])
    probe = Probe(config["trace_memory"])
    # plan_and_record and apply look these names up at call time, so the wrappers see every call.
    probe.wrap_async(runs, "_make_plan", checkpoint=True)
    probe.wrap(PlanRecorder, "finish", checkpoint=True)
    probe.wrap_async(runs, "_recheck_routing")
    for name in TIMED_STORE_METHODS:
        probe.wrap(StateStore, name)
    result = asyncio.run(measure(config, probe))
    print(json.dumps(result | probe.report()))


if __name__ == "__main__":
    main()
