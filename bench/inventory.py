"""Fast, deterministic inventories in the reference schema, generated inside the database.

One ``INSERT ... SELECT`` per table instead of row-by-row inserts from Python: a million builds
take seconds in PostgreSQL. The same SQL runs on PostgreSQL and SQLite (recursive CTEs, window
functions, integer hashing); only the least() spelling and the timestamp conversion differ.

The shape: projects with ``per_project`` builds each (pseudo-random in the range), build ids
that grow with creation time across all projects (so a project's builds are spread over the
table, as in a real database), each project's newest build active and routed, and a few percent
of the other builds routed too (a canary, a rollback) without being active.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.schema import CreateIndex, DropIndex

from deployment_cleanup.seed import reference_tables

__all__ = ["Generated", "Shape", "generate"]

DAY_SECONDS = 86_400
# Multiplicative hashing keeps every product below 2**63, the integer limit of both databases.
_HASH = "((((CAST({x} AS BIGINT) * 1597334677) % 4294967296) * 1103515245 + 12345) % 2147483648)"


@dataclass(frozen=True)
class Shape:
    """What to generate. Ages are spread uniformly over ``age_days``."""

    builds: int
    per_project: tuple[int, int] = (5, 15)
    routed_extra_percent: int = 3
    failed_percent: int = 25
    age_days: tuple[int, int] = (0, 90)


@dataclass(frozen=True)
class Generated:
    shape: Shape
    builds: int
    projects: int
    routes: int
    # Build ids the routing server must answer ``routed: true`` for, as the API spells them.
    routed_ids: frozenset[str]
    seconds: float


def _statements(shape: Shape, dialect: str, now: datetime) -> list[str]:
    low, high = shape.per_project
    if not 1 <= low <= high:
        raise ValueError(f"bad builds per project range {shape.per_project}")
    max_projects = shape.builds // low + 1
    youngest, oldest = (d * DAY_SECONDS for d in shape.age_days)
    least = "LEAST" if dialect == "postgresql" else "MIN"
    epoch = int(now.timestamp())
    created = (
        f"to_timestamp({epoch} - age_s)"
        if dialect == "postgresql"
        else f"datetime({epoch} - age_s, 'unixepoch')"
    )
    return [
        # How many builds each project gets, and how many builds come before it.
        f"""
        CREATE TEMP TABLE bench_counts AS
        WITH RECURSIVE series(p) AS (
            SELECT CAST(1 AS BIGINT) UNION ALL SELECT p + 1 FROM series WHERE p < {max_projects}
        ),
        counts AS (
            SELECT p, {low} + ((p * 1597334677) % 4294967296) % {high - low + 1} AS n FROM series
        ),
        placed AS (SELECT p, n, SUM(n) OVER (ORDER BY p) - n AS before FROM counts)
        SELECT p AS project_id, CAST({least}(n, {shape.builds} - before) AS BIGINT) AS n,
               CAST(before AS BIGINT) AS before
        FROM placed WHERE before < {shape.builds}
        """,
        # One row per build with its pseudo-random age, status and extra routing.
        f"""
        CREATE TEMP TABLE bench_builds AS
        WITH RECURSIVE ks(k) AS (
            SELECT CAST(1 AS BIGINT) UNION ALL SELECT k + 1 FROM ks WHERE k < {high}
        ),
        hashed AS (
            SELECT c.project_id, c.before + ks.k AS seq, {_HASH.format(x="c.before + ks.k")} AS h
            FROM bench_counts c JOIN ks ON ks.k <= c.n
        )
        SELECT project_id, seq,
               {youngest} + h % {max(1, oldest - youngest)} AS age_s,
               CASE WHEN (h / 7) % 100 < {shape.failed_percent}
                    THEN 'failed' ELSE 'ready' END AS status,
               CASE WHEN (h / 701) % 100 < {shape.routed_extra_percent}
                    THEN 1 ELSE 0 END AS routed_extra
        FROM hashed
        """,
        # Ids grow with creation time across projects; recency 1 is each project's newest build.
        """
        CREATE TEMP TABLE bench_ranked AS
        SELECT project_id, status, age_s, routed_extra,
               ROW_NUMBER() OVER (ORDER BY age_s DESC, seq) AS id,
               ROW_NUMBER() OVER (PARTITION BY project_id ORDER BY age_s, seq DESC) AS recency
        FROM bench_builds
        """,
        """
        INSERT INTO projects (id, name, active_build_id)
        SELECT project_id, 'project-' || project_id, id FROM bench_ranked WHERE recency = 1
        ORDER BY project_id
        """,
        f"""
        INSERT INTO builds (id, project_id, status, created_at)
        SELECT id, project_id, status, {created} FROM bench_ranked ORDER BY id
        """,
        """
        INSERT INTO routes (build_id, hostname)
        SELECT id, 'project-' || project_id || '.example.test' FROM bench_ranked
        WHERE recency = 1 OR routed_extra = 1 ORDER BY id
        """,
        "DROP TABLE bench_ranked",
        "DROP TABLE bench_builds",
        "DROP TABLE bench_counts",
    ]


def _count(conn: Connection, table: str) -> int:
    return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def generate(engine: Engine, shape: Shape, now: datetime | None = None) -> Generated:
    """Create the reference tables in an empty database and fill them with ``shape``."""
    started = time.perf_counter()
    now = now or datetime.now(UTC)
    tables = reference_tables()
    tables.metadata.create_all(engine)
    postgres = engine.dialect.name == "postgresql"
    with engine.begin() as conn:
        deferred: list[str] = []
        if postgres:
            # Checking the foreign key and maintaining the (project_id, id) index row by row
            # takes 20 s for a million builds; building both after the load takes 2 s.
            foreign_key = inspect(conn).get_foreign_keys("builds")[0]["name"]
            index = next(iter(tables.builds.indexes))
            conn.execute(text(f'ALTER TABLE builds DROP CONSTRAINT "{foreign_key}"'))
            conn.execute(DropIndex(index))
            deferred = [
                str(CreateIndex(index).compile(dialect=engine.dialect)),
                f'ALTER TABLE builds ADD CONSTRAINT "{foreign_key}" '
                "FOREIGN KEY (project_id) REFERENCES projects (id)",
            ]
        for statement in [*_statements(shape, engine.dialect.name, now), *deferred]:
            # text() escapes the modulo signs for psycopg's placeholder syntax.
            conn.execute(text(statement))
    # Statistics and a visibility map, as on a database that autovacuum looks after.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE" if postgres else "ANALYZE")
    with engine.connect() as conn:
        routed = frozenset(
            str(row[0]) for row in conn.exec_driver_sql("SELECT build_id FROM routes")
        )
        builds, projects = _count(conn, "builds"), _count(conn, "projects")
    return Generated(shape, builds, projects, len(routed), routed, time.perf_counter() - started)
