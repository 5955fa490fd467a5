"""The reference schema, and seeded inventories that resemble the incident.

Used by the demo, the tests and the benchmarks. Everything is deterministic
for a given seed, so a test can name exactly which builds must be archived.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    insert,
)

__all__ = ["ReferenceTables", "SeededInventory", "reference_tables", "seed_inventory"]


@dataclass(frozen=True)
class ReferenceTables:
    metadata: MetaData
    projects: Table
    builds: Table
    routes: Table


def reference_tables() -> ReferenceTables:
    """projects(id, name, active_build_id), builds(id, project_id, status, created_at), routes."""
    md = MetaData()
    big = BigInteger().with_variant(Integer, "sqlite")
    projects = Table(
        "projects",
        md,
        Column("id", big, primary_key=True, autoincrement=False),
        Column("name", String(200), nullable=False),
        Column("active_build_id", big, nullable=True),
    )
    builds = Table(
        "builds",
        md,
        Column("id", big, primary_key=True, autoincrement=False),
        Column("project_id", big, ForeignKey("projects.id"), nullable=False),
        Column("status", String(32), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Index("builds_project_id_id", "project_id", "id"),
    )
    routes = Table(
        "routes",
        md,
        Column("build_id", big, nullable=False, index=True),
        Column("hostname", String(255), nullable=False),
    )
    return ReferenceTables(md, projects, builds, routes)


@dataclass
class SeededInventory:
    """What was seeded, so tests can state the expected plan exactly."""

    projects: int = 0
    builds: int = 0
    active: dict[int, int] = field(default_factory=dict)  # project -> active build
    routed: set[int] = field(default_factory=set)
    # Builds of each project, newest first: (build id, created_at).
    project_builds: dict[int, list[tuple[int, datetime]]] = field(default_factory=dict)
    without_active: set[int] = field(default_factory=set)


def seed_inventory(
    engine: Engine,
    *,
    projects: int = 863,
    builds_per_project: tuple[int, int] = (3, 8),
    now: datetime,
    seed: int = 1,
    projects_without_active: int = 0,
    routed_non_active: int = 0,
    max_age: timedelta = timedelta(days=90),
    create_routes: bool = True,
) -> SeededInventory:
    """Create the reference tables and fill them.

    Each project's newest build is its active build and is routed; a few
    projects (``projects_without_active``) have no active build, and a few
    older builds (``routed_non_active``) are routed without being active, as
    a canary or a rollback would be.
    """
    rng = random.Random(seed)  # noqa: S311 (test data, not secrets)
    tables = reference_tables()
    tables.metadata.create_all(engine)
    seeded = SeededInventory()
    project_rows: list[dict[str, object]] = []
    build_rows: list[dict[str, object]] = []
    route_rows: list[dict[str, object]] = []
    build_id = 0
    orphans = set(rng.sample(range(1, projects + 1), projects_without_active))
    for project_id in range(1, projects + 1):
        count = rng.randint(*builds_per_project)
        ages = sorted(rng.uniform(0, max_age.total_seconds()) for _ in range(count))
        builds = []
        for age in reversed(ages):  # oldest first, so ids grow with time
            build_id += 1
            created = now - timedelta(seconds=age)
            builds.append((build_id, created))
            status = rng.choice(("ready", "ready", "ready", "failed"))
            build_rows.append(
                {"id": build_id, "project_id": project_id, "status": status, "created_at": created}
            )
        newest = builds[-1][0]
        active = None if project_id in orphans else newest
        if active is not None:
            seeded.active[project_id] = active
            seeded.routed.add(active)
            route_rows.append(
                {"build_id": active, "hostname": f"project-{project_id}.example.test"}
            )
        else:
            seeded.without_active.add(project_id)
        project_rows.append(
            {"id": project_id, "name": f"project-{project_id}", "active_build_id": active}
        )
        seeded.project_builds[project_id] = [(b, c) for b, c in reversed(builds)]
    older = [b for bs in seeded.project_builds.values() for b, _ in bs[1:]]
    for extra in rng.sample(older, min(routed_non_active, len(older))):
        seeded.routed.add(extra)
        route_rows.append({"build_id": extra, "hostname": f"canary-{extra}.example.test"})
    with engine.begin() as conn:
        for start in range(0, len(project_rows), 5000):
            conn.execute(insert(tables.projects), project_rows[start : start + 5000])
        for start in range(0, len(build_rows), 5000):
            conn.execute(insert(tables.builds), build_rows[start : start + 5000])
        if create_routes:
            for start in range(0, len(route_rows), 5000):
                conn.execute(insert(tables.routes), route_rows[start : start + 5000])
    seeded.projects = projects
    seeded.builds = build_id
    return seeded
