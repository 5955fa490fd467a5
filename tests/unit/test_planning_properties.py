"""Property tests: whatever the inventory, answers and failures, nothing live is a candidate."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from deployment_cleanup.planning import (
    Build,
    LookupReceipt,
    PlanBuilder,
    ReferenceCounts,
    RouteAnswer,
    Verdict,
    classify_project,
    plan_settings,
)
from deployment_cleanup.spec import ReferenceSetSpec, RetentionSpec, SafetySpec

NOW = datetime(2026, 12, 4, tzinfo=UTC)


@dataclass
class World:
    projects: dict[int, int | None]  # project -> active build id (may point elsewhere)
    builds: dict[int, list[Build]]
    routed: dict[int, bool | None]  # None: the lookup gave no answer
    failed_batches: int
    retention: RetentionSpec
    safety: SafetySpec


@st.composite
def worlds(draw: st.DrawFn) -> World:
    n_projects = draw(st.integers(0, 12))
    next_id = 1
    projects: dict[int, int | None] = {}
    builds: dict[int, list[Build]] = {}
    routed: dict[int, bool | None] = {}
    for project in range(1, n_projects + 1):
        count = draw(st.integers(0, 8))
        mine = []
        for _ in range(count):
            age = draw(st.one_of(st.none(), st.floats(0, 200)))
            created = None if age is None else NOW - timedelta(days=age)
            mine.append(
                Build(next_id, project, draw(st.sampled_from(["ready", "failed"])), created)
            )
            routed[next_id] = draw(st.sampled_from([True, False, False, None]))
            next_id += 1
        builds[project] = mine
        choices = [None, 10_000 + project] + [b.id for b in mine]
        projects[project] = draw(st.sampled_from(choices))
    retention = RetentionSpec(
        keep_newest=draw(st.integers(0, 4)), min_age=timedelta(days=draw(st.integers(0, 60)))
    )
    safety = SafetySpec(
        max_archived_per_run=draw(st.integers(0, 60)),
        max_archived_percent=draw(st.floats(0, 100)),
        max_archived_per_project=draw(st.integers(0, 8)),
        reference_set=ReferenceSetSpec(
            max_drop_percent=draw(st.floats(0, 100)), min_count=draw(st.integers(0, 10))
        ),
    )
    return World(projects, builds, routed, draw(st.integers(0, 2)), retention, safety)


references = st.builds(ReferenceCounts, st.integers(0, 40), st.integers(0, 40), st.integers(0, 40))


@settings(max_examples=400, deadline=None)
@given(world=worlds(), previous=st.one_of(st.none(), references))
def test_no_active_routed_or_unknown_build_is_ever_a_candidate(
    world: World, previous: ReferenceCounts | None
) -> None:
    builder = PlanBuilder(
        world.safety, plan_settings(world.retention, world.safety, "archived", {}), previous
    )
    for project, builds in world.builds.items():
        answers = {
            b.id: RouteAnswer(bool(world.routed[b.id]), "http", 0)
            for b in builds
            if world.routed[b.id] is not None
        }
        builder.add(
            classify_project(
                project, world.projects[project], True, builds, answers, world.retention, NOW
            )
        )
    receipts = [LookupReceipt(0, 1, True, 1, 0.0)] + [
        LookupReceipt(i + 1, 1, False, 3, 1.0, "timed out") for i in range(world.failed_batches)
    ]
    plan = builder.finish(receipts)

    for decision in plan.candidates:
        build = decision.build
        active = world.projects[build.project_id]
        assert active is not None
        assert build.id != active
        assert active in {b.id for b in world.builds[build.project_id]}
        assert world.routed[build.id] is False
        assert build.created_at is not None
        assert NOW - build.created_at >= world.retention.min_age
    if world.failed_batches:
        assert plan.verdict is Verdict.BLOCKED
    if plan.verdict is Verdict.READY:
        total = sum(len(b) for b in world.builds.values())
        per_project: dict[int | str, int] = {}
        for d in plan.candidates:
            per_project[d.build.project_id] = per_project.get(d.build.project_id, 0) + 1
        assert len(plan.candidates) <= world.safety.max_archived_per_run
        assert total == 0 or len(plan.candidates) * 100 / total <= world.safety.max_archived_percent
        assert max(per_project.values(), default=0) <= world.safety.max_archived_per_project
        assert plan.reference.total >= world.safety.reference_set.min_count
        assert all(t.passed for t in plan.thresholds)
