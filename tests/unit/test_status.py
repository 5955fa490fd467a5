"""The status object: conditions, bounded size, the shape the operator writes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from deployment_cleanup.planning import (
    Build,
    LookupReceipt,
    PlanBuilder,
    RouteAnswer,
    classify_project,
    plan_settings,
)
from deployment_cleanup.runstate import RunKind, RunRecord, RunState
from deployment_cleanup.spec import RetentionSpec, SafetySpec
from deployment_cleanup.status import build_status, condition

NOW = datetime(2026, 12, 4, 3, 0, tzinfo=UTC)
RETENTION = RetentionSpec(keep_newest=1, min_age=timedelta(0))


def _huge_plan(projects: int, failed_batches: int):  # type: ignore[no-untyped-def]
    safety = SafetySpec.model_validate(
        {"maxArchivedPerRun": 10**8, "maxArchivedPercent": 100, "maxArchivedPerProject": 10**8}
    )
    builder = PlanBuilder(safety, plan_settings(RETENTION, safety, "archived", {}))
    for p in range(projects):
        builds = [Build(p * 10 + i, p, "ready", NOW - timedelta(days=30 + i)) for i in range(10)]
        answers = {b.id: RouteAnswer(b.id % 10 == 0 or b.id % 7 == 0, "http", p) for b in builds}
        builder.add(classify_project(p, p * 10, True, builds, answers, RETENTION, NOW))
    receipts = [
        LookupReceipt(
            i, 500, i >= failed_batches, 3, 30.0, None if i >= failed_batches else "x" * 2000
        )
        for i in range(failed_batches + 10)
    ]
    return builder.finish(receipts)


def _run(state: RunState = RunState.PLANNED, candidates: int = 0) -> RunRecord:
    return RunRecord(
        "r-1",
        "ns/name",
        RunKind.PLAN,
        "p-0000000000000000",
        state,
        NOW,
        NOW,
        5,
        candidates,
        0,
        0,
        0,
        "m" * 10_000,
    )


def test_status_stays_under_64_kib_for_any_inventory() -> None:
    plan = _huge_plan(projects=8_000, failed_batches=3_000)
    assert len(plan.candidates) > 50_000
    status = build_status(
        generation=3,
        now=NOW,
        outcome="Blocked",
        message="y" * 100_000,
        plan=plan,
        run=_run(candidates=len(plan.candidates)),
        history=[_run()] * 100,
    )
    size = len(json.dumps(status))
    assert size < 64 * 1024, size
    assert status["plan"]["lookups"]["failed"] == 3_000
    assert len(status["plan"]["lookups"]["failedBatches"]) == 10
    assert len(status["plan"]["candidatesSample"]) == 20
    assert len(status["history"]) == 10


def test_conditions_say_why_a_run_was_blocked() -> None:
    plan = _huge_plan(projects=3, failed_batches=1)
    status = build_status(
        generation=2, now=NOW, outcome="Blocked", message=plan.message, plan=plan, run=None
    )
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Ready"]["reason"] == "LookupsIncomplete"
    assert conditions["LookupsComplete"] == conditions["LookupsComplete"] | {
        "status": "False",
        "reason": "LookupsIncomplete",
        "observedGeneration": 2,
    }
    assert conditions["SafetyChecksPassed"]["status"] == "True"
    assert conditions["AwaitingApproval"]["status"] == "False"
    assert status["observedGeneration"] == 2
    assert status["lastSuccessfulRun"] is None


def test_a_ready_plan_becomes_the_last_successful_run() -> None:
    plan = _huge_plan(projects=3, failed_batches=0)
    status = build_status(
        generation=1, now=NOW, outcome="Succeeded", message="ok", plan=plan, run=_run()
    )
    assert status["lastSuccessfulRun"] == {
        "id": "r-1",
        "planId": plan.id,
        "finishedAt": "2026-12-04T03:00:00Z",
        "referenceCount": plan.reference.total,
    }


def test_last_transition_time_moves_only_when_the_status_flips() -> None:
    earlier = [condition("Ready", True, "Succeeded", "", NOW - timedelta(hours=5), 1)]
    same = condition("Ready", True, "Succeeded", "", NOW, 2, earlier)
    flipped = condition("Ready", False, "Blocked", "", NOW, 2, earlier)
    assert same["lastTransitionTime"] == "2026-12-03T22:00:00Z"
    assert flipped["lastTransitionTime"] == "2026-12-04T03:00:00Z"
