"""Benchmark the engine against the floor of the same work on the same machine.

``python -m bench.run --sizes 10000,100000,1000000 --sqlite-size 100000 --latency-ms 2``

For each size it generates an inventory (PostgreSQL; one SQLite size), then measures, each in
a fresh process: the floor (raw scan, raw lookups, and both at once) and the engine's
``plan_and_record``. Then it applies and restores a plan of ``--archive-size`` candidates. The
routing HTTP server (tests/support/routing_server.py) runs in this process on 127.0.0.1 with the
given per-request latency. Results go to ``<out>/latest.json`` and ``<out>/latest.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import NullPool
from tests.support.postgres import ExistingPostgres, PostgresServer
from tests.support.routing_server import RoutingServer

from .floor import (
    REPO,
    ScanCommand,
    lookup_command,
    measure_concurrently,
    psql_record,
    psql_scan,
    run_json,
    sqlite_record,
    sqlite_scan,
    time_command,
)
from .inventory import Generated, Shape, generate
from .machine import describe
from .operator_run import measure_operator
from .report import evaluate_targets, markdown
from .worker import WorkerConfig

SCAN_REPEATS = 3


@dataclass(frozen=True)
class Settings:
    latency_ms: float
    batch_size: int
    concurrency: int
    keep_newest: int
    execution_batch_size: int
    canary_batch_size: int


class Databases(Protocol):
    kind: str

    def create(self, name: str) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        ...

    def drop(self, name: str) -> None: ...

    def scan(self, url: str, *, ordered: bool = False) -> ScanCommand: ...

    def record(self, url: str, rows: int) -> ScanCommand: ...


class PostgresDatabases:
    kind = "postgresql"

    def __init__(self, server: PostgresServer | ExistingPostgres, psql: Path) -> None:
        self.server = server
        self.psql = psql

    def create(self, name: str) -> str:
        self.server.drop_database(name)
        return self.server.create_database(name)

    def drop(self, name: str) -> None:
        self.server.drop_database(name)

    def scan(self, url: str, *, ordered: bool = False) -> ScanCommand:
        return psql_scan(self.psql, url, ordered=ordered)

    def record(self, url: str, rows: int) -> ScanCommand:
        return psql_record(self.psql, url, rows)


class SqliteDatabases:
    kind = "sqlite"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.sqlite"

    def create(self, name: str) -> str:
        path = self._path(name)
        path.unlink(missing_ok=True)
        path.touch()
        return f"sqlite:///{path}"

    def drop(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def scan(self, url: str, *, ordered: bool = False) -> ScanCommand:
        return sqlite_scan(Path(url.removeprefix("sqlite:///")), ordered=ordered)

    def record(self, url: str, rows: int) -> ScanCommand:
        return sqlite_record(Path(url.removeprefix("sqlite:///")), rows)


def load_average() -> float:
    """The 1-minute load average: a busy neighbour on a shared machine shows up here first."""
    return round(os.getloadavg()[0], 2)


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def worker_command(
    config: WorkerConfig, py_spy: Path | None = None, out: Path | None = None
) -> list[str]:
    command = [sys.executable, "-m", "bench.worker", json.dumps(config)]
    if py_spy is None:
        return command
    assert out is not None
    # Collapsed stacks ("raw"): readable as text, and loadable in speedscope. --gil samples
    # only the thread holding the GIL: the scan thread and the event loop share one core's
    # worth of Python, and a thread waiting for the GIL would otherwise show as busy.
    return [
        str(py_spy),
        "record",
        "--gil",
        "--rate",
        "200",
        "--format",
        "raw",
        "-o",
        str(out),
        "--",
        *command,
    ]


def worker_config(
    mode: str,
    url: str,
    routing: RoutingServer,
    settings: Settings,
    *,
    keep_newest: int,
    trace_memory: bool = False,
) -> WorkerConfig:
    return {
        "mode": mode,
        "database_url": url,
        "routing_url": routing.url,
        "keep_newest": keep_newest,
        "batch_size": settings.batch_size,
        "concurrency": settings.concurrency,
        "execution_batch_size": settings.execution_batch_size,
        "canary_batch_size": settings.canary_batch_size,
        "trace_memory": trace_memory,
    }


@contextmanager
def inventory(databases: Databases, name: str, shape: Shape) -> Iterator[tuple[str, Generated]]:
    url = databases.create(name)
    engine: Engine = create_engine(url, poolclass=NullPool)
    try:
        generated = generate(engine, shape)
    finally:
        engine.dispose()
    try:
        yield url, generated
    finally:
        databases.drop(name)


def measure_floor(
    databases: Databases, url: str, routing: RoutingServer, builds: int, settings: Settings
) -> dict[str, Any]:
    scan = databases.scan(url)
    scan_runs = [time_command(scan.argv) for _ in range(SCAN_REPEATS)]
    ordered = min(time_command(databases.scan(url, ordered=True).argv) for _ in range(2))
    lookups_argv = lookup_command(routing.url, builds, settings.batch_size, settings.concurrency)
    # Best of two: the lookup floor is the noisiest piece on a shared machine. The server keeps
    # every request it saw (ids and body), so they are dropped after each measurement.
    attempts = []
    for _ in range(2):
        attempts.append(run_json(lookups_argv))
        routing.requests.clear()
    lookups = min(attempts, key=lambda attempt: float(attempt["seconds"]))
    concurrent = measure_concurrently(scan.argv, lookups_argv)
    routing.requests.clear()
    scan_seconds = min(scan_runs)
    return {
        "scan_tool": scan.tool,
        "scan_seconds": round(scan_seconds, 4),
        "scan_runs": [round(s, 4) for s in scan_runs],
        "ordered_scan_seconds": round(ordered, 4),
        "lookups": lookups,
        "lookup_runs": [round(float(a["seconds"]), 4) for a in attempts],
        # The floor: the scan, then the lookups, each by the simplest tool.
        "seconds": round(scan_seconds + float(lookups["seconds"]), 4),
        "concurrent": {k: round(v, 4) for k, v in concurrent.items()},
    }


def measure_size(
    databases: Databases,
    routing: RoutingServer,
    size: int,
    settings: Settings,
    profiles: dict[str, Any],
    *,
    py_spy: Path | None,
    trace_memory: bool,
    out: Path,
) -> dict[str, Any]:
    name = f"bench_{size}"
    log(f"{databases.kind} {size:,} builds: generating")
    with inventory(databases, name, Shape(size)) as (url, generated):
        log(
            f"  generated {generated.builds:,} builds of {generated.projects:,} projects "
            f"in {generated.seconds:.1f}s"
        )
        routing.set_routed(generated.routed_ids)
        log("  floor: scan, lookups, both at once")
        load_before = load_average()
        floor = measure_floor(databases, url, routing, generated.builds, settings)
        log(f"  floor {floor['seconds']:.2f}s; engine plan_and_record")
        config = worker_config("plan", url, routing, settings, keep_newest=settings.keep_newest)
        engine = run_json(worker_command(config))
        engine["requests_received"] = routing.request_count
        routing.requests.clear()
        load_after = load_average()
        # The least the recording of this plan's candidates costs the database (best of 2).
        record = databases.record(url, int(engine["candidates"]))
        floor["record_tool"] = record.tool
        floor["record_seconds"] = round(min(time_command(record.argv) for _ in range(2)), 4)
        log(f"  engine {engine['plan_seconds']:.2f}s, peak RSS {engine['peak_rss_mib']} MiB")
        if py_spy is not None:
            profile = out / f"profile-plan-{databases.kind}-{size}.txt"
            log(f"  py-spy profile of the engine into {profile}")
            spied = run_json(worker_command(config, py_spy, profile))
            profiles[f"py-spy {databases.kind} {size}"] = {
                "file": str(profile.relative_to(REPO))
                if profile.is_relative_to(REPO)
                else str(profile),
                "plan_seconds_under_py_spy": spied["plan_seconds"],
            }
            routing.requests.clear()
        if trace_memory:
            log("  tracemalloc run of the engine")
            traced_config = worker_config(
                "plan", url, routing, settings, keep_newest=settings.keep_newest, trace_memory=True
            )
            traced = run_json(worker_command(traced_config))
            profiles[f"tracemalloc {databases.kind} {size}"] = {
                "plan_seconds_under_tracemalloc": traced["plan_seconds"],
                "memory_top": traced["memory_top"],
            }
            routing.requests.clear()
    return {
        "database": databases.kind,
        "builds": generated.builds,
        "projects": generated.projects,
        "routes": generated.routes,
        "generate_seconds": round(generated.seconds, 2),
        "load_average": [load_before, load_after],
        "floor": floor,
        "engine": engine,
        "ratio": round(engine["plan_seconds"] / floor["seconds"], 2),
        "ratio_concurrent": round(engine["plan_seconds"] / floor["concurrent"]["seconds"], 2),
        "ratio_with_record": round(
            engine["plan_seconds"] / (floor["seconds"] + floor["record_seconds"]), 2
        ),
    }


def measure_archive(
    databases: Databases, routing: RoutingServer, candidates: int, settings: Settings
) -> dict[str, Any]:
    """Apply and restore a plan of exactly ``candidates`` builds.

    Every project has 12 builds, all older than minAge, and only its newest routed; keeping the
    newest 2 leaves 10 candidates per project.
    """
    keep, per_project = 2, 12
    projects = max(1, candidates // (per_project - keep))
    shape = Shape(
        projects * per_project,
        per_project=(per_project, per_project),
        routed_extra_percent=0,
        age_days=(8, 90),
    )
    log(f"{databases.kind} archive and restore of {projects * (per_project - keep):,} candidates")
    with inventory(databases, f"bench_archive_{candidates}", shape) as (url, generated):
        routing.set_routed(generated.routed_ids)
        routing.requests.clear()
        config = worker_config("archive", url, routing, settings, keep_newest=keep)
        load_before = load_average()
        result = run_json(worker_command(config))
        result["requests_received"] = routing.request_count
        result["load_average"] = [load_before, load_average()]
        routing.requests.clear()
    log(f"  archive {result['archive_seconds']:.2f}s, restore {result['restore_seconds']:.2f}s")
    return {"database": databases.kind, "builds": generated.builds} | result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    sizes = lambda text: [int(s.replace("_", "")) for s in text.split(",") if s]  # noqa: E731
    parser.add_argument(
        "--sizes",
        type=sizes,
        default=[10_000, 100_000, 1_000_000],
        help="PostgreSQL inventory sizes (builds), comma-separated",
    )
    parser.add_argument(
        "--sqlite-size", type=int, default=100_000, help="SQLite inventory size; 0 skips SQLite"
    )
    parser.add_argument(
        "--archive-size", type=int, default=10_000, help="candidates to apply and restore; 0 skips"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=2.0, help="routing server latency per request"
    )
    parser.add_argument("--batch-size", type=int, default=500, help="spec.routing.batchSize")
    parser.add_argument("--concurrency", type=int, default=4, help="spec.routing.concurrency")
    parser.add_argument(
        "--keep-newest", type=int, default=3, help="spec.retention.keepNewest for the plans"
    )
    parser.add_argument(
        "--execution-batch-size",
        type=int,
        default=250,
        help="spec.execution.batchSize for the archive",
    )
    parser.add_argument(
        "--canary-batch-size", type=int, default=10, help="spec.execution.canaryBatchSize"
    )
    parser.add_argument(
        "--operator-size",
        type=int,
        default=0,
        help="builds for one plan through the operator on the test control plane; 0 skips",
    )
    parser.add_argument(
        "--postgres-url", help="admin URL of an existing server (else one is started)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--py-spy",
        type=Path,
        help="py-spy binary: profile one more engine plan at the largest size",
    )
    parser.add_argument(
        "--trace-memory",
        action="store_true",
        help="one more engine plan at the largest size under tracemalloc",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings(
        latency_ms=args.latency_ms,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        keep_newest=args.keep_newest,
        execution_batch_size=args.execution_batch_size,
        canary_batch_size=args.canary_batch_size,
    )
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with ExitStack() as stack:
        server: PostgresServer | ExistingPostgres
        if args.postgres_url:
            server = ExistingPostgres(args.postgres_url)
            psql = Path(shutil.which("psql") or "psql")
        else:
            log("starting PostgreSQL")
            server = stack.enter_context(PostgresServer())
            psql = server.bin_dir / "psql"
        admin = create_engine(server.url("postgres"), poolclass=NullPool)
        machine = describe(admin)
        admin.dispose()
        routing = stack.enter_context(RoutingServer(latency=args.latency_ms / 1000))
        postgres = PostgresDatabases(server, psql)
        sqlite = SqliteDatabases(
            Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-sqlite-")))
        )
        profiles: dict[str, Any] = {}
        largest = max(args.sizes, default=0)
        inventories = [
            measure_size(
                postgres,
                routing,
                size,
                settings,
                profiles,
                py_spy=args.py_spy if size == largest else None,
                trace_memory=args.trace_memory and size == largest,
                out=out,
            )
            for size in args.sizes
        ]
        if args.sqlite_size:
            inventories.append(
                measure_size(
                    sqlite,
                    routing,
                    args.sqlite_size,
                    settings,
                    profiles,
                    py_spy=None,
                    trace_memory=False,
                    out=out,
                )
            )
        archives = []
        if args.archive_size:
            archives.append(measure_archive(postgres, routing, args.archive_size, settings))
            archives.append(measure_archive(sqlite, routing, args.archive_size, settings))
        operator = None
        if args.operator_size:
            log(f"operator on the test control plane, {args.operator_size:,} builds")
            shape = Shape(args.operator_size)
            with inventory(postgres, "bench_operator", shape) as (url, generated):
                routing.set_routed(generated.routed_ids)
                logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-op-")))
                operator = measure_operator(url, routing, generated.builds, logs)
                routing.requests.clear()
            log(f"  {operator['writes_during_run_total']} API writes for the run")
        if routing.errors:
            raise RuntimeError(f"the routing server failed: {routing.errors!r}")
    results: dict[str, Any] = {
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_seconds": round(time.perf_counter() - began, 1),
        "machine": machine,
        "settings": asdict(settings),
        "inventories": inventories,
        "archives": archives,
        "operator": operator,
        "profiles": profiles,
    }
    results["targets"] = evaluate_targets(results)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "latest.md").write_text(markdown(results))
    log(f"done in {results['wall_seconds']}s: {out / 'latest.md'}")


if __name__ == "__main__":
    main()
