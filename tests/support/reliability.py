"""Checks that every reliability scenario ends with, and the report it feeds.

After a scenario, the database itself must show that:
(a) no build that was active or routed at any time during the scenario is archived;
(b) nothing outside an approved plan changed;
(c) every archived build can be restored.
Status and Events (d) are checked by each scenario, since what they must say differs.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from deployment_cleanup.archive import StateStore
from deployment_cleanup.inventory import reflect_builds_schema
from deployment_cleanup.spec import DatabaseSpec

from .inventory import Seeded

FULL = os.environ.get("DEPLOYMENT_CLEANUP_RELIABILITY") == "full"


def scale(fast: int, full: int) -> int:
    """How many runs a scenario makes: a few in the test command, many in the full suite."""
    return full if FULL else fast


@dataclass
class Outcome:
    """What one scenario did, as a row of the report."""

    scenario: str
    fault: str
    runs: int = 0
    archived: int = 0
    wrongly_archived: int = 0
    outside_plan: int = 0
    data_lost: int = 0
    recovery_seconds: list[float] = field(default_factory=list)
    restore_seconds: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Watch:
    """The builds database under a scenario, and everything that was live in it."""

    seeded: Seeded
    initial: dict[int, str] = field(init=False)
    ever_live: set[int] = field(init=False)
    # Builds a scenario changed itself (not the cleanup): excluded from (b) and (c).
    touched: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.initial = self.seeded.statuses()
        self.ever_live = set(self.seeded.live())

    def mark_live(self, builds: Iterable[int]) -> None:
        self.ever_live |= set(builds)

    def check(self, outcome: Outcome, approved: set[int] | None = None) -> None:
        """(a), (b) and (c): archived builds were never live, were approved, and come back."""
        now = self.seeded.statuses()
        archived = {
            b for b, s in now.items() if s == "archived" and self.initial.get(b) != "archived"
        }
        changed = {b for b, s in now.items() if s != self.initial.get(b)} - self.touched
        wrongly = archived & self.ever_live
        outside = changed - archived if approved is None else changed - (archived & approved)
        outcome.runs += 1
        outcome.archived += len(archived)
        outcome.wrongly_archived += len(wrongly)
        outcome.outside_plan += len(outside)
        started = time.monotonic()
        restored_ok = self._restore_everything()
        if archived:
            outcome.restore_seconds.append(time.monotonic() - started)
        after = self.seeded.statuses()
        lost = {b for b in self.initial if after.get(b) != self.initial[b]} - self.touched
        outcome.data_lost += len(lost) + (0 if restored_ok else 1)
        assert not wrongly, f"live builds archived: {sorted(wrongly)[:20]}"
        assert not outside, f"changed outside the approved plan: {sorted(outside)[:20]}"
        assert not lost, f"not restored: {sorted(lost)[:20]}"

    def _restore_everything(self) -> bool:
        engine = self.seeded.engine
        store = StateStore(engine, reflect_builds_schema(engine, DatabaseSpec(url=self.seeded.url)))
        store.ensure_tables()
        with engine.connect() as conn:
            runs = (
                conn.execute(select(store.runs.c.id).where(store.runs.c.kind == "apply"))
                .scalars()
                .all()
            )
        now = datetime.now(UTC)
        return all(not store.restore(run, None, now).conflicts for run in runs)


REPORT_ENV = "DEPLOYMENT_CLEANUP_RELIABILITY_REPORT"


def write_report(outcomes: list[Outcome], folder: Path) -> None:
    """The report: JSON for machines, markdown with a table for people."""
    folder.mkdir(parents=True, exist_ok=True)
    machine = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "full" if FULL else "fast",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    rows = [asdict(o) for o in outcomes]
    (folder / "latest.json").write_text(
        json.dumps({"machine": machine, "scenarios": rows}, indent=2) + "\n"
    )

    def seconds(values: list[float]) -> str:
        return "-" if not values else f"{max(values):.2f}"

    lines = [
        "# Reliability report",
        "",
        f"{machine['date']}, {machine['mode']} run, Python {machine['python']}, "
        f"{machine['cpus']} CPUs, {machine['platform']}.",
        "",
        "Every scenario injects its fault into real components and then checks, from the builds "
        "database itself, that no build that was live at any time was archived, that nothing "
        "outside an approved plan changed, and that every archived build could be restored.",
        "",
        "| scenario | fault | runs | archived | wrongly archived | outside plan | data lost "
        "| worst recovery (s) | worst restore (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.scenario} | {o.fault} | {o.runs} | {o.archived} | {o.wrongly_archived} | "
            f"{o.outside_plan} | {o.data_lost} | {seconds(o.recovery_seconds)} | "
            f"{seconds(o.restore_seconds)} |"
        )
    notes = [f"- **{o.scenario}**: {note}" for o in outcomes for note in o.notes]
    if notes:
        lines += ["", "## Notes", "", *notes]
    total_wrong = sum(o.wrongly_archived + o.outside_plan + o.data_lost for o in outcomes)
    lines += ["", f"Builds archived wrongly or lost, all scenarios: **{total_wrong}**.", ""]
    (folder / "latest.md").write_text("\n".join(lines))
