"""What the numbers were measured on: CPU, cores, memory, database and Python versions."""

from __future__ import annotations

import os
import platform
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

__all__ = ["describe"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _sqlite_cli_version() -> str | None:
    cli = shutil.which("sqlite3")
    if cli is None:
        return None
    result = subprocess.run([cli, "-version"], capture_output=True, text=True, check=False)
    return result.stdout.split()[0] if result.returncode == 0 and result.stdout else None


def describe(postgres: Engine | None) -> dict[str, Any]:
    postgres_version = None
    if postgres is not None:
        with postgres.connect() as conn:
            postgres_version = str(conn.execute(text("SHOW server_version")).scalar_one())
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "postgresql": postgres_version,
        "sqlite_library": sqlite3.sqlite_version,
        "sqlite_cli": _sqlite_cli_version(),
    }
