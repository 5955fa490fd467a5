"""The Argo CD health check in examples/argocd-health-check.yaml, run by a real Lua interpreter
on status objects built by the operator's own status code."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployment_cleanup.planning import (
    Build,
    LookupReceipt,
    Plan,
    PlanBuilder,
    RouteAnswer,
    classify_project,
    plan_settings,
)
from deployment_cleanup.runstate import RunKind, RunRecord, RunState
from deployment_cleanup.spec import RetentionSpec, SafetySpec
from deployment_cleanup.status import build_status, condition
from tests.support.lua import HealthCheck, cleanup_object, interpreter

EXAMPLE = Path(__file__).parents[2] / "examples" / "argocd-health-check.yaml"
KEY = "resource.customizations.health.deployment-cleanup.dev_DeploymentCleanup"
NOW = datetime(2026, 12, 4, 3, 0, tzinfo=UTC)
RETENTION = RetentionSpec(keep_newest=1, min_age=timedelta(0))
LOOSE = {"maxArchivedPerRun": 10_000, "maxArchivedPercent": 100, "maxArchivedPerProject": 100}


def script() -> str:
    config = yaml.safe_load(EXAMPLE.read_text())
    assert config["kind"] == "ConfigMap"
    assert config["metadata"] == config["metadata"] | {"name": "argocd-cm", "namespace": "argocd"}
    return str(config["data"][KEY])


@pytest.fixture(scope="module")
def health() -> HealthCheck:
    run = interpreter()
    if run is None:
        pytest.skip(
            "no Lua interpreter: install the lupa package (a dev dependency) or Debian's lua5.1"
        )
    return run


def plan(*, failed_batches: int = 0, safety: dict[str, Any] | None = None) -> Plan:
    spec = SafetySpec.model_validate(safety or LOOSE)
    builder = PlanBuilder(spec, plan_settings(RETENTION, spec, "archived", {}))
    for p in range(4):
        builds = [Build(p * 10 + i, p, "ready", NOW - timedelta(days=30 + i)) for i in range(5)]
        answers = {b.id: RouteAnswer(False, "http", p) for b in builds}
        builder.add(classify_project(p, p * 10, True, builds, answers, RETENTION, NOW))
    receipts = [
        LookupReceipt(
            i, 500, i >= failed_batches, 1, 0.1, None if i >= failed_batches else "timeout"
        )
        for i in range(failed_batches + 1)
    ]
    return builder.finish(receipts)


def run(state: RunState, kind: RunKind = RunKind.PLAN) -> RunRecord:
    finished = None if state is RunState.APPLYING else NOW
    return RunRecord(
        "r-1",
        "platform/nightly",
        kind,
        "p-0123456789abcdef",
        state,
        NOW,
        finished,
        5,
        16,
        3,
        0,
        13,
        "",
    )


def status(
    outcome: str, the_plan: Plan | None, the_run: RunRecord | None, generation: int = 1
) -> dict[str, Any]:
    return build_status(
        generation=generation, now=NOW, outcome=outcome, message="m", plan=the_plan, run=the_run
    )


def with_ready(base: dict[str, Any], reason: str, generation: int = 1) -> dict[str, Any]:
    """A status whose Ready condition is False with this reason (as _failed/_invalid write it)."""
    changed = copy.deepcopy(base)
    changed["conditions"] = [c for c in changed["conditions"] if c["type"] != "Ready"] + [
        condition("Ready", False, reason, f"{reason} happened", NOW, generation)
    ]
    return changed


READY = status("Succeeded", plan(), run(RunState.PLANNED))
APPLYING = status("Succeeded", plan(), run(RunState.APPLYING, RunKind.APPLY))["run"]
BLOCKED_BY_THRESHOLD = plan(safety={**LOOSE, "maxArchivedPerRun": 1})
AWAITING = status("AwaitingApproval", plan(), run(RunState.PLANNED))

# (id, status, metadata.generation, expected health)
CASES: list[tuple[str, dict[str, Any] | None, int, str]] = [
    ("no-status-yet", None, 1, "Progressing"),
    ("plan-ready", READY, 1, "Healthy"),
    ("applied", status("Succeeded", plan(), run(RunState.SUCCEEDED, RunKind.APPLY)), 1, "Healthy"),
    ("awaiting-approval", AWAITING, 1, "Suspended"),
    (
        "lookups-incomplete",
        status("Blocked", plan(failed_batches=1), run(RunState.BLOCKED)),
        1,
        "Degraded",
    ),
    (
        "threshold-exceeded",
        status("Blocked", BLOCKED_BY_THRESHOLD, run(RunState.BLOCKED)),
        1,
        "Degraded",
    ),
    ("invariant-violated", with_ready(READY, "InvariantViolated"), 1, "Degraded"),
    ("stopped", status("Stopped", plan(), run(RunState.STOPPED, RunKind.APPLY)), 1, "Degraded"),
    ("failed", with_ready(READY, "Failed"), 1, "Degraded"),
    ("invalid-spec", with_ready(READY, "InvalidSpec"), 1, "Degraded"),
    ("failed-while-applying", with_ready(READY, "Failed") | {"run": APPLYING}, 1, "Degraded"),
    ("applying", AWAITING | {"run": APPLYING}, 1, "Progressing"),
    ("spec-change-not-handled-yet", READY, 2, "Progressing"),
    ("unknown-reason", with_ready(READY, "Busy"), 1, "Progressing"),
]


@pytest.mark.parametrize(
    ("the_status", "generation", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_health_follows_the_ready_condition_and_the_run(
    health: HealthCheck, the_status: dict[str, Any] | None, generation: int, expected: str
) -> None:
    got, message = health(script(), cleanup_object(generation, the_status))
    assert got == expected, message
    if the_status is not None and expected != "Progressing":
        ready = next(c for c in the_status["conditions"] if c["type"] == "Ready")
        assert message.startswith(ready["reason"] + ": ")


def test_the_cases_carry_the_reasons_the_operator_writes() -> None:
    reasons = {
        case_id: next(c["reason"] for c in s["conditions"] if c["type"] == "Ready")
        for case_id, s, _, _ in CASES
        if s is not None
    }
    assert reasons["lookups-incomplete"] == "LookupsIncomplete"
    assert reasons["threshold-exceeded"] == "ThresholdExceeded"
    assert reasons["stopped"] == "Stopped"
    assert reasons["awaiting-approval"] == "AwaitingApproval"
    assert reasons["applied"] == "Applied"
    assert reasons["plan-ready"] == "PlanReady"
