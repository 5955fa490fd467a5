"""The floor: the same work as a plan, done by the simplest tools on the same machine.

* scan: the plan's columns streamed by the database's own client to /dev/null
  (``COPY ... TO STDOUT`` through psql; the ``sqlite3`` shell, or Python's sqlite3 module when the
  shell is missing);
* lookups: the same number of batched requests at the same concurrency (:mod:`bench.lookups`);
* recording (reported beside the floor, not in it): the database writing as many item rows as
  the plan had candidates, with an evidence string of the same length, by one
  ``INSERT ... SELECT`` through the same client: the least a plan that records its candidates
  can cost on top of the floor.

Every piece runs in its own process, like the engine, so none shares a GIL with the routing
server that the benchmark process hosts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import make_url

__all__ = [
    "SCAN_SQL",
    "ScanCommand",
    "lookup_command",
    "measure_concurrently",
    "psql_record",
    "psql_scan",
    "run_json",
    "sqlite_record",
    "sqlite_scan",
    "time_command",
]

SCAN_SQL = "SELECT project_id, id, status, created_at FROM builds WHERE status <> 'archived'"
# What the engine asks for: the same rows in keyset order (informational, not the floor).
ORDERED_SCAN_SQL = SCAN_SQL + " ORDER BY project_id, id"
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
COMMAND_TIMEOUT_SECONDS = 3600


@dataclass(frozen=True)
class ScanCommand:
    argv: list[str]
    tool: str  # what did the scan, for the report


def libpq_uri(sqlalchemy_url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as a libpq URI for psql (no +driver)."""
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(False)


def _psql(psql: Path, sqlalchemy_url: str, *options: str) -> list[str]:
    return [
        str(psql),
        "--no-psqlrc",
        "--quiet",
        "--set=ON_ERROR_STOP=1",
        f"--dbname={libpq_uri(sqlalchemy_url)}",
        *options,
    ]


def psql_scan(psql: Path, sqlalchemy_url: str, *, ordered: bool = False) -> ScanCommand:
    sql = ORDERED_SCAN_SQL if ordered else SCAN_SQL
    return ScanCommand(
        _psql(psql, sqlalchemy_url, f"--command=COPY ({sql}) TO STDOUT"), "psql COPY TO STDOUT"
    )


_PYTHON_SQLITE_SCAN = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1])
out = open("/dev/null", "w")
for row in connection.execute(sys.argv[2]):
    out.write("|".join(map(str, row)) + "\\n")
"""


def sqlite_scan(path: Path, *, ordered: bool = False) -> ScanCommand:
    sql = ORDERED_SCAN_SQL if ordered else SCAN_SQL
    cli = shutil.which("sqlite3")
    if cli is not None:
        return ScanCommand([cli, "-batch", "-readonly", str(path), sql], "sqlite3 shell")
    return ScanCommand(
        [sys.executable, "-c", _PYTHON_SQLITE_SCAN, str(path), sql], "Python sqlite3 module"
    )


# A candidate's evidence as the engine writes it (the length is what matters).
EVIDENCE = (
    '{"classification": "notRouted", "keepReasons": [], "projectActiveBuild": "1000000", '
    '"routing": {"batch": 1000, "routed": false, "source": "http"}}'
)
_RECORD_TABLE = (
    "CREATE TABLE floor_items (run_id VARCHAR(64) NOT NULL, build_id VARCHAR(200) NOT NULL, "
    "seq INTEGER NOT NULL, project_id VARCHAR(200) NOT NULL, previous_status VARCHAR(64) NOT "
    "NULL, outcome VARCHAR(16) NOT NULL, detail TEXT, evidence TEXT NOT NULL, "
    "PRIMARY KEY (run_id, build_id))"
)


def _record_sql(rows: int, as_text: str) -> str:
    return (
        "DROP TABLE IF EXISTS floor_items; "
        + _RECORD_TABLE
        + "; INSERT INTO floor_items (run_id, build_id, seq, project_id, previous_status, "
        f"outcome, evidence) SELECT 'r-floor', {as_text.format('id')}, id, "
        f"{as_text.format('project_id')}, status, 'planned', '{EVIDENCE}' FROM builds "
        f"WHERE status <> 'archived' LIMIT {rows:d}"
    )


def psql_record(psql: Path, sqlalchemy_url: str, rows: int) -> ScanCommand:
    # One transaction, then statistics, as the engine does.
    command = f"--command={_record_sql(rows, '{}::text')}; ANALYZE floor_items"
    return ScanCommand(
        _psql(psql, sqlalchemy_url, "--single-transaction", command), "psql INSERT ... SELECT"
    )


_PYTHON_SQLITE_RECORD = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN")
for statement in sys.argv[2].split("; "):
    connection.execute(statement)
connection.execute("COMMIT")
"""


def sqlite_record(path: Path, rows: int) -> ScanCommand:
    sql = _record_sql(rows, "CAST({} AS TEXT)")
    cli = shutil.which("sqlite3")
    if cli is not None:
        return ScanCommand([cli, "-batch", str(path), f"BEGIN; {sql}; COMMIT"], "sqlite3 shell")
    return ScanCommand(
        [sys.executable, "-c", _PYTHON_SQLITE_RECORD, str(path), sql], "Python sqlite3 module"
    )


def time_command(argv: list[str]) -> float:
    """Wall seconds of one run of ``argv``, output discarded; raise if it fails."""
    began = time.perf_counter()
    result = subprocess.run(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )
    seconds = time.perf_counter() - began
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({result.returncode}): {result.stderr.decode()}")
    return seconds


def lookup_command(url: str, builds: int, batch_size: int, concurrency: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.lookups",
        f"--url={url}",
        f"--builds={builds}",
        f"--batch-size={batch_size}",
        f"--concurrency={concurrency}",
    ]


def run_json(argv: list[str]) -> dict[str, Any]:
    """Run a bench subprocess from the repository root and parse the JSON it prints last."""
    result = subprocess.run(
        argv,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[:3])} failed ({result.returncode}):\n{result.stderr[-4000:]}"
        )
    # The last JSON line: a wrapper such as py-spy prints its own lines after the worker's.
    last = next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{"))
    parsed: dict[str, Any] = json.loads(last)
    return parsed


def measure_concurrently(scan: list[str], lookups: list[str]) -> dict[str, float]:
    """The scan and the lookups started together: what a perfectly pipelined plan could reach.

    The lookup process starts first and waits (its interpreter start-up is not work a plan
    does); the scan is started and the lookups released at the same instant. The result is the
    later of the two to finish: the scan as timed here, the lookups as timed by themselves.
    """
    looking_up = subprocess.Popen(
        [*lookups, "--wait-for-go"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert looking_up.stdin is not None
    assert looking_up.stdout is not None
    try:
        if looking_up.stdout.readline().strip() != "ready":
            raise RuntimeError("the lookup floor process did not get ready")
        began = time.perf_counter()
        scanning = subprocess.Popen(scan, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        looking_up.stdin.write("go\n")
        looking_up.stdin.flush()
        _, scan_errors = scanning.communicate(timeout=COMMAND_TIMEOUT_SECONDS)
        scan_seconds = time.perf_counter() - began
        lookup_out, lookup_errors = looking_up.communicate(timeout=COMMAND_TIMEOUT_SECONDS)
    finally:
        if looking_up.poll() is None:
            looking_up.kill()
            looking_up.wait()
    if scanning.returncode != 0 or looking_up.returncode != 0:
        raise RuntimeError(f"concurrent floor failed: {scan_errors!r} {lookup_errors[-2000:]}")
    lookup_seconds = float(json.loads(lookup_out.strip().splitlines()[-1])["seconds"])
    return {
        "seconds": max(scan_seconds, lookup_seconds),
        "scan_seconds": scan_seconds,
        "lookup_seconds": lookup_seconds,
    }
