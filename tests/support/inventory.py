"""Seeding a builds database and reading its state back, for integration tests."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, select
from sqlalchemy.pool import NullPool

from deployment_cleanup.archive import StateStore
from deployment_cleanup.seed import SeededInventory, reference_tables, seed_inventory
from deployment_cleanup.spec import DeploymentCleanup

from .documents import cleanup

T = TypeVar("T")
NOW = datetime.now(UTC).replace(microsecond=0)
KEEP_NEWEST = 2
MIN_AGE = timedelta(days=7)


@dataclass
class Seeded:
    url: str
    engine: Engine
    inventory: SeededInventory

    def statuses(self) -> dict[int, str]:
        builds = reference_tables().builds
        with self.engine.connect() as conn:
            return dict(conn.execute(select(builds.c.id, builds.c.status)).all())  # type: ignore[arg-type]

    def archived(self) -> set[int]:
        return {b for b, s in self.statuses().items() if s == "archived"}

    def live(self) -> set[int]:
        return self.inventory.routed | set(self.inventory.active.values())

    def expected_candidates(
        self, keep_newest: int = KEEP_NEWEST, min_age: timedelta = MIN_AGE
    ) -> set[int]:
        """Worked out from what was seeded, independently of the planner."""
        expected = set()
        for project, builds in self.inventory.project_builds.items():
            if project in self.inventory.without_active:
                continue
            for position, (build_id, created) in enumerate(builds):
                if position < keep_newest or NOW - created < min_age:
                    continue
                if (
                    build_id == self.inventory.active.get(project)
                    or build_id in self.inventory.routed
                ):
                    continue
                expected.add(build_id)
        return expected


def seed(url: str, projects: int = 40, **kwargs: Any) -> Seeded:
    engine = create_engine(url, poolclass=NullPool)  # no pooled connection outlives a test
    kwargs.setdefault("projects_without_active", 2)
    kwargs.setdefault("routed_non_active", 3)
    inventory = seed_inventory(engine, projects=projects, now=NOW, **kwargs)
    return Seeded(url, engine, inventory)


def loose_cleanup(
    url: str, routing: dict[str, Any] | None = None, **spec: Any
) -> DeploymentCleanup:
    """A cleanup with thresholds wide enough that only the behaviour under test can block it."""
    spec.setdefault("retention", {"keepNewest": KEEP_NEWEST, "minAge": "7d"})
    spec.setdefault(
        "safety",
        {
            "maxArchivedPerRun": 100_000,
            "maxArchivedPercent": 100,
            "maxArchivedPerProject": 1000,
            "referenceSet": {"maxDropPercent": 50, "minCount": 1},
        },
    )
    spec.setdefault("execution", {"batchSize": 25, "canaryBatchSize": 5})
    return cleanup(url, routing=routing, **spec)


def http_routing(url: str, **settings: Any) -> dict[str, Any]:
    """HTTP routing with short timeouts, so fault tests finish in about a second."""
    return {
        "http": {"url": url},
        "batchSize": 50,
        "concurrency": 4,
        "connectTimeout": "1s",
        "readTimeout": "300ms",
        "batchDeadline": "1s",
        "retries": {"maxAttempts": 2, "initialBackoff": "50ms", "maxBackoff": "200ms"},
    } | settings


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def recorded_candidates(store: StateStore, run_id: str) -> list[Any]:
    """A run's candidates as recorded in its items (the plan itself keeps only a sample)."""
    items = store.items
    query = select(items.c.build_id).where(items.c.run_id == run_id).order_by(items.c.seq)
    with store.engine.connect() as conn:
        return [store.schema.coerce_build_id(b) for (b,) in conn.execute(query)]
