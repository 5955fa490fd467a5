"""The incident, replayed on an embedded SQLite database.

863 projects; the routing lookup batches that hold 170 projects' live builds
stall. The old job treated "no answer" as "inactive" and archived them. Here:
a blocked plan that changes nothing, then a healthy plan, an apply of exactly
that plan, and a restore of the whole run in one call.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TextIO

from sqlalchemy import Engine, create_engine, func, select

from .db import EnvironmentSecrets
from .demo_routing import DemoRoutingServer
from .report import render_result
from .runs import ApplyRequest, Outcome, apply, connect, plan_and_record, restore, utc_now
from .seed import reference_tables, seed_inventory
from .spec import API_VERSION, KIND, load_cleanup

__all__ = ["run_demo"]

PROJECTS = 863
STALLED_PROJECTS = range(301, 471)  # 170 projects, as in the incident

CLEANUP_YAML = """\
apiVersion: {api_version}
kind: {kind}
metadata:
  name: nightly
  namespace: demo
spec:
  mode: Apply
  database:
    url: sqlite:///{database}
  routing:
{routing}
    batchSize: 500
    concurrency: 4
    batchDeadline: 2s
    readTimeout: 1s
    retries:
      maxAttempts: 2
      initialBackoff: 100ms
  retention:
    keepNewest: 2
    minAge: 7d
  safety:
    maxArchivedPerRun: 5000
    maxArchivedPercent: 70
    maxArchivedPerProject: 10
    referenceSet:
      maxDropPercent: 10
      minCount: 100
  execution:
    batchSize: 500
    canaryBatchSize: 20
"""


def _archived(engine: Engine) -> int:
    builds = reference_tables().builds
    with engine.connect() as conn:
        return int(
            conn.execute(select(func.count()).where(builds.c.status == "archived")).scalar_one()
        )


def _heading(out: TextIO, text: str) -> None:
    out.write(f"\n{'=' * 78}\n{text}\n{'=' * 78}\n")


async def _replay(directory: Path, out: TextIO) -> bool:
    database = (directory / "builds.sqlite").resolve()
    database.unlink(missing_ok=True)
    engine = create_engine(f"sqlite:///{database}")
    seeded = seed_inventory(
        engine, projects=PROJECTS, now=utc_now(), projects_without_active=3, routed_non_active=6
    )
    out.write(
        f"Seeded {database}: {seeded.projects} projects, {seeded.builds} builds, "
        f"{len(seeded.routed)} routed builds.\n"
    )
    ok = True
    with DemoRoutingServer(engine) as server:
        # The demo asks its own routing API; the file it leaves behind reads the
        # routes table instead, so the commands below work after the demo ends.
        http = f"    http:\n      url: {server.url}"
        cleanup = load_cleanup(
            CLEANUP_YAML.format(api_version=API_VERSION, kind=KIND, database=database, routing=http)
        )
        manifest = directory / "cleanup.yaml"
        manifest.write_text(
            CLEANUP_YAML.format(
                api_version=API_VERSION, kind=KIND, database=database, routing="    sql: {}"
            )
        )
        conns = connect(cleanup, EnvironmentSecrets())
        try:
            _heading(
                out,
                f"1. Plan while the lookup batches holding {len(STALLED_PROJECTS)} projects' "
                "live builds stall",
            )
            server.stall_ids = {
                str(seeded.active[p]) for p in STALLED_PROJECTS if p in seeded.active
            }
            blocked = await plan_and_record(conns, utc_now())
            out.write(render_result(blocked) + "\n")
            changed = _archived(engine)
            out.write(f"\nBuilds archived by the blocked run: {changed}\n")
            ok &= blocked.outcome is Outcome.BLOCKED and changed == 0

            _heading(out, "2. The routing API recovers: plan again")
            server.heal()
            ready = await plan_and_record(conns, utc_now())
            out.write(render_result(ready) + "\n")
            ok &= ready.outcome is Outcome.SUCCEEDED and ready.plan is not None
            assert ready.plan is not None

            _heading(out, f"3. Apply the approved plan {ready.plan.id}")
            applied = await apply(conns, ApplyRequest(approved_plan_id=ready.plan.id))
            out.write(render_result(applied) + "\n")
            live_archived = _live_archived(engine, seeded.routed | set(seeded.active.values()))
            out.write(f"\nLive builds archived: {live_archived}\n")
            ok &= applied.outcome is Outcome.SUCCEEDED and live_archived == 0
            ok &= _archived(engine) == ready.plan.candidate_count

            assert applied.run is not None
            _heading(out, f"4. Restore the whole run {applied.run.id} in one command")
            restored = await restore(conns, applied.run.id, None, utc_now())
            out.write(render_result(restored) + "\n")
            ok &= _archived(engine) == 0
        finally:
            conns.close()
    out.write(
        "\nTry it yourself:\n"
        f"  deployment-cleanup plan -f {manifest}\n"
        f"  deployment-cleanup apply -f {manifest} --plan-id <id from the plan>\n"
        f"  deployment-cleanup runs -f {manifest}\n"
        f"  deployment-cleanup restore -f {manifest} --run <run id>\n"
    )
    engine.dispose()
    return ok


def _live_archived(engine: Engine, live: set[int]) -> int:
    builds = reference_tables().builds
    with engine.connect() as conn:
        archived = set(
            conn.execute(select(builds.c.id).where(builds.c.status == "archived")).scalars()
        )
    return len(archived & live)


def run_demo(directory: Path, out: TextIO) -> int:
    """Run the demo in ``directory``; 0 if every step did what it should."""
    directory.mkdir(parents=True, exist_ok=True)
    ok = asyncio.run(_replay(directory, out))
    out.write(
        "\nDemo "
        + ("finished: every step behaved as expected.\n" if ok else "FAILED: see above.\n")
    )
    return 0 if ok else 1
