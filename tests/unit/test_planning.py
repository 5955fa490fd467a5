"""The pure planner: classification, invariants, retention, thresholds, plan id."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from deployment_cleanup.planning import (
    SAMPLE_SIZE,
    Build,
    BuildDecision,
    Classification,
    KeepReason,
    LookupReceipt,
    PlanBuilder,
    ProjectIssue,
    ReferenceCounts,
    RouteAnswer,
    Verdict,
    VerdictReason,
    classify_project,
    evaluate_thresholds,
    invariant_violations,
    plan_settings,
)
from deployment_cleanup.spec import RetentionSpec, SafetySpec

NOW = datetime(2026, 12, 4, 3, 0, tzinfo=UTC)
OLD = NOW - timedelta(days=30)
NO_RETENTION = RetentionSpec(keep_newest=0, min_age=timedelta(0))
LOOSE = SafetySpec.model_validate(
    {
        "maxArchivedPerRun": 10_000,
        "maxArchivedPercent": 100,
        "maxArchivedPerProject": 10_000,
        "referenceSet": {"maxDropPercent": 100, "minCount": 0},
    }
)


def build(build_id: int, project: int = 1, age_days: float = 30, status: str = "ready") -> Build:
    return Build(build_id, project, status, NOW - timedelta(days=age_days))


def routes(**answers: bool) -> dict[int | str, RouteAnswer]:
    return {int(k.removeprefix("b")): RouteAnswer(v, "http", 0) for k, v in answers.items()}


def by_id(decisions: object) -> dict[object, object]:
    return {d.build.id: d for d in decisions.decisions}  # type: ignore[attr-defined]


def test_every_build_gets_an_explicit_classification_with_evidence() -> None:
    builds = [build(1), build(2), build(3), build(4)]
    result = classify_project(
        1, 1, True, builds, routes(b1=True, b2=True, b3=False), NO_RETENTION, NOW
    )
    d = by_id(result)
    assert d[1].classification is Classification.ACTIVE
    assert d[2].classification is Classification.ROUTED
    assert d[3].classification is Classification.NOT_ROUTED
    assert d[4].classification is Classification.UNKNOWN
    assert [b for b, x in d.items() if x.archive] == [3]
    assert d[3].evidence() == {
        "classification": "notRouted",
        "projectActiveBuild": "1",
        "routing": {"routed": False, "source": "http", "batch": 0},
        "keepReasons": [],
    }
    assert KeepReason.ROUTING_UNKNOWN in d[4].keep_reasons


def test_routed_build_that_is_not_active_is_kept_and_reported_as_a_disagreement() -> None:
    result = classify_project(
        1, 1, True, [build(1), build(2)], routes(b1=True, b2=True), NO_RETENTION, NOW
    )
    assert result.disagreements == (2,)
    assert not by_id(result)[2].archive


def test_active_build_is_kept_even_when_routing_says_it_is_not_routed() -> None:
    result = classify_project(1, 1, True, [build(1)], routes(b1=False), NO_RETENTION, NOW)
    assert by_id(result)[1].classification is Classification.ACTIVE
    assert not by_id(result)[1].archive


@pytest.mark.parametrize(
    ("active", "known", "issue"),
    [
        pytest.param(None, True, ProjectIssue.NO_ACTIVE_BUILD, id="no-active-build"),
        pytest.param(
            99, True, ProjectIssue.ACTIVE_BUILD_NOT_IN_INVENTORY, id="active-build-elsewhere"
        ),
        pytest.param(None, False, ProjectIssue.PROJECT_MISSING, id="project-row-missing"),
    ],
)
def test_project_without_a_known_active_build_keeps_everything(
    active: int | None, known: bool, issue: ProjectIssue
) -> None:
    result = classify_project(
        1, active, known, [build(1), build(2)], routes(b1=False, b2=False), NO_RETENTION, NOW
    )
    assert result.issue is issue
    assert not any(d.archive for d in result.decisions)
    assert all(KeepReason.PROJECT_WITHOUT_ACTIVE_BUILD in d.keep_reasons for d in result.decisions)


def test_retention_keeps_the_newest_n_and_anything_younger_than_min_age() -> None:
    builds = [
        build(1, age_days=1),
        build(2, age_days=10),
        build(3, age_days=20),
        build(4, age_days=40),
        build(5, age_days=50),
    ]
    answers = routes(b1=True, b2=False, b3=False, b4=False, b5=False)
    retention = RetentionSpec(keep_newest=2, min_age=timedelta(days=15))
    d = by_id(classify_project(1, 1, True, builds, answers, retention, NOW))
    assert KeepReason.NEWEST in d[2].keep_reasons  # second newest
    assert KeepReason.NEWEST not in d[3].keep_reasons
    assert [b for b, x in d.items() if x.archive] == [3, 4, 5]
    retention = RetentionSpec(keep_newest=0, min_age=timedelta(days=45))
    d = by_id(classify_project(1, 1, True, builds, answers, retention, NOW))
    assert KeepReason.TOO_YOUNG in d[4].keep_reasons
    assert [b for b, x in d.items() if x.archive] == [5]


def test_build_with_unknown_age_is_kept() -> None:
    undated = Build(2, 1, "ready", None)
    d = by_id(
        classify_project(
            1, 1, True, [build(1), undated], routes(b1=True, b2=False), NO_RETENTION, NOW
        )
    )
    assert KeepReason.AGE_UNKNOWN in d[2].keep_reasons


@pytest.mark.parametrize(
    ("active", "route", "expected"),
    [
        pytest.param(
            None,
            RouteAnswer(False, "http", 0),
            ["its project has no known active build"],
            id="no-active",
        ),
        pytest.param(
            7, RouteAnswer(False, "http", 0), ["it is its project's active build"], id="is-active"
        ),
        pytest.param(1, None, ["its routing is unknown"], id="unknown"),
        pytest.param(1, RouteAnswer(True, "http", 0), ["it is routed"], id="routed"),
        pytest.param(1, RouteAnswer(False, "http", 0), [], id="archivable"),
    ],
)
def test_invariants_are_checked_from_raw_facts(
    active: int | None, route: RouteAnswer | None, expected: list[str]
) -> None:
    assert invariant_violations(build(7), active, route) == expected


def _settings() -> dict[str, object]:
    return plan_settings(NO_RETENTION, LOOSE, "archived", {"builds": "builds"})


def _plan(
    projects: list[tuple[int, int | None, list[Build], dict[int | str, RouteAnswer]]],
    receipts: list[LookupReceipt] | None = None,
    safety: SafetySpec = LOOSE,
    previous: ReferenceCounts | None = None,
    settings: dict[str, object] | None = None,
):  # type: ignore[no-untyped-def]
    builder = PlanBuilder(safety, settings or _settings(), previous)
    for project_id, active, builds, answers in projects:
        builder.add(classify_project(project_id, active, True, builds, answers, NO_RETENTION, NOW))
    return builder.finish(receipts or [LookupReceipt(0, 1, True, 1, 0.1)])


def test_a_failed_lookup_batch_blocks_the_whole_run_and_is_named() -> None:
    receipts = [LookupReceipt(0, 2, True, 1, 0.1), LookupReceipt(1, 2, False, 3, 30.0, "timed out")]
    plan = _plan([(1, 1, [build(1), build(2)], routes(b1=True, b2=False))], receipts)
    assert plan.verdict is Verdict.BLOCKED
    assert plan.reason is VerdictReason.LOOKUPS_INCOMPLETE
    assert "batch 1: timed out" in plan.message
    assert "1 of 2 routing lookup batches failed" in plan.message


def test_ready_plan_lists_only_positively_confirmed_candidates() -> None:
    plan = _plan([(1, 1, [build(1), build(2), build(3)], routes(b1=True, b2=False))])
    assert plan.verdict is Verdict.READY
    assert [d.build.id for d in plan.candidates] == [2]
    assert plan.counts["unknown"] == 1
    assert plan.reference == ReferenceCounts(active=1, routed=1, total=1)


def test_plan_with_nothing_to_archive_is_ready_with_its_own_reason() -> None:
    plan = _plan([(1, 1, [build(1)], routes(b1=True))])
    assert plan.ready
    assert plan.reason is VerdictReason.NOTHING_TO_ARCHIVE


def test_plan_id_is_stable_for_the_same_data_and_changes_with_candidates_or_settings() -> None:
    data = [(1, 1, [build(1), build(2), build(3)], routes(b1=True, b2=False, b3=False))]
    first, again = _plan(data), _plan(data)
    assert first.id == again.id
    assert first.id.startswith("p-")
    assert len(first.id) == 18
    changed = _plan([(1, 1, [build(1), build(2), build(3)], routes(b1=True, b2=False, b3=True))])
    assert changed.id != first.id
    status_changed = _plan(
        [
            (
                1,
                1,
                [build(1), build(2, status="failed"), build(3)],
                routes(b1=True, b2=False, b3=False),
            )
        ]
    )
    assert status_changed.id != first.id
    other_settings = plan_settings(NO_RETENTION, LOOSE, "deleted", {"builds": "builds"})
    assert _plan(data, settings=other_settings).id != first.id


R = ReferenceCounts
DROP_10 = {"referenceSet": {"maxDropPercent": 10, "minCount": 0}}
THRESHOLD_CASES = [
    ("maxArchivedPerRun", {"maxArchivedPerRun": 10}, {"candidates": 10}, True),
    ("maxArchivedPerRun", {"maxArchivedPerRun": 10}, {"candidates": 9}, True),
    ("maxArchivedPerRun", {"maxArchivedPerRun": 10}, {"candidates": 11}, False),
    ("maxArchivedPercent", {"maxArchivedPercent": 10}, {"candidates": 10, "inventory": 100}, True),
    ("maxArchivedPercent", {"maxArchivedPercent": 10}, {"candidates": 11, "inventory": 100}, False),
    ("maxArchivedPerProject", {"maxArchivedPerProject": 3}, {"max_per_project": 3}, True),
    ("maxArchivedPerProject", {"maxArchivedPerProject": 3}, {"max_per_project": 4}, False),
    (
        "referenceSetMinCount",
        {"referenceSet": {"minCount": 50}},
        {"reference": R(50, 50, 50)},
        True,
    ),
    (
        "referenceSetMinCount",
        {"referenceSet": {"minCount": 50}},
        {"reference": R(49, 49, 49)},
        False,
    ),
    (
        "activeBuildsMaxDropPercent",
        DROP_10,
        {"reference": R(90, 100, 100), "previous": R(100, 100, 100)},
        True,
    ),
    (
        "activeBuildsMaxDropPercent",
        DROP_10,
        {"reference": R(89, 100, 100), "previous": R(100, 100, 100)},
        False,
    ),
    (
        "activeBuildsMaxDropPercent",
        DROP_10,
        {"reference": R(500, 100, 500), "previous": R(100, 100, 100)},
        True,
    ),
    (
        "routedBuildsMaxDropPercent",
        DROP_10,
        {"reference": R(100, 90, 100), "previous": R(100, 100, 100)},
        True,
    ),
    (
        "routedBuildsMaxDropPercent",
        DROP_10,
        {"reference": R(100, 89, 100), "previous": R(100, 100, 100)},
        False,
    ),
]


@pytest.mark.parametrize(
    ("name", "limits", "actual", "passes"),
    THRESHOLD_CASES,
    ids=[f"{c[0]}-{'pass' if c[3] else 'fail'}-{i}" for i, c in enumerate(THRESHOLD_CASES)],
)
def test_threshold_boundaries_at_below_and_above(
    name: str, limits: dict[str, object], actual: dict[str, object], passes: bool
) -> None:
    safety = SafetySpec.model_validate(limits)
    values = {
        "candidates": 0,
        "inventory": 1000,
        "max_per_project": 0,
        "reference": R(1000, 1000, 1000),
        "previous": None,
    } | actual
    checks = {c.name: c for c in evaluate_thresholds(safety, **values)}  # type: ignore[arg-type]
    assert checks[name].passed is passes
    assert {c.name for c in checks.values() if not c.passed} == (set() if passes else {name})


def test_exceeded_threshold_blocks_and_reports_limit_and_actual() -> None:
    safety = SafetySpec.model_validate(
        {"maxArchivedPerProject": 1, "maxArchivedPercent": 100, "referenceSet": {"minCount": 0}}
    )
    plan = _plan(
        [(1, 1, [build(1), build(2), build(3)], routes(b1=True, b2=False, b3=False))], safety=safety
    )
    assert plan.reason is VerdictReason.THRESHOLD_EXCEEDED
    assert "maxArchivedPerProject actual 2 vs limit 1" in plan.message
    assert plan.candidates  # reported, but the verdict keeps them from being archived


def test_reference_set_collapse_since_the_last_successful_run_blocks() -> None:
    plan = _plan(
        [(1, 1, [build(1), build(2)], routes(b1=True, b2=False))],
        safety=SafetySpec.model_validate(
            {"maxArchivedPercent": 100, "referenceSet": {"maxDropPercent": 10, "minCount": 0}}
        ),
        previous=R(400, 400, 400),
    )
    assert plan.reason is VerdictReason.THRESHOLD_EXCEEDED
    check = next(t for t in plan.thresholds if t.name == "activeBuildsMaxDropPercent")
    assert check.actual == pytest.approx(99.75)
    assert not check.passed


def test_routing_that_suddenly_reports_nothing_routed_blocks_even_with_active_builds_intact() -> (
    None
):
    # Last time two builds were routed (the active one and a canary); now routing says none is.
    plan = _plan(
        [(1, 1, [build(1), build(2), build(3)], routes(b1=False, b2=False, b3=False))],
        safety=SafetySpec.model_validate(
            {"maxArchivedPercent": 100, "referenceSet": {"maxDropPercent": 10, "minCount": 0}}
        ),
        previous=R(1, 2, 2),
    )
    assert plan.reason is VerdictReason.THRESHOLD_EXCEEDED
    checks = {t.name: t for t in plan.thresholds}
    assert checks["activeBuildsMaxDropPercent"].passed
    assert not checks["routedBuildsMaxDropPercent"].passed
    assert checks["routedBuildsMaxDropPercent"].actual == 100.0


def test_a_receipt_must_be_ok_exactly_when_it_has_no_error() -> None:
    with pytest.raises(ValueError, match="ok exactly when"):
        LookupReceipt(0, 1, False, 1, 0.0)
    with pytest.raises(ValueError, match="ok exactly when"):
        LookupReceipt(0, 1, True, 1, 0.0, "boom")


def test_a_streaming_builder_hands_out_every_candidate_but_keeps_only_a_sample() -> None:
    # 30 projects of 3 old, not-routed builds each: 2 candidates per project (1 is active).
    projects = [
        (p, p * 10, [build(p * 10 + i, project=p) for i in range(3)], {}) for p in range(1, 31)
    ]
    for _, _, builds, answers in projects:
        answers.update({b.id: RouteAnswer(False, "http", 0) for b in builds})
    kept = PlanBuilder(LOOSE, _settings())
    streamed = PlanBuilder(LOOSE, _settings(), keep_candidates=False)
    handed_out = []
    for project_id, active, builds, answers in projects:
        decisions = classify_project(project_id, active, True, builds, answers, NO_RETENTION, NOW)
        kept.add(decisions)
        handed_out += streamed.add(decisions)
    full, sampled = kept.finish([]), streamed.finish([])
    assert [d.build.id for d in handed_out] == [d.build.id for d in full.candidates]
    assert len(handed_out) == 60
    assert sampled.candidates == full.candidates[:SAMPLE_SIZE]
    assert sampled.candidate_count == full.candidate_count == 60
    assert sampled.id == full.id  # the id covers every candidate, kept or not
    assert sampled.thresholds == full.thresholds


@pytest.mark.parametrize(
    "route",
    [
        None,
        RouteAnswer(False, "http", 3),
        RouteAnswer(True, "sql", 12, "live.example.test"),
        RouteAnswer(True, "sql", 0, 'h"o\\st\n\u00e9\u2028'),
        RouteAnswer(False, "weird source \u00fc", 7),
    ],
)
@pytest.mark.parametrize("active", [None, 1, 'b-\u00e9"1', 10**20])
@pytest.mark.parametrize(
    "reasons", [(), (KeepReason.ROUTED,), (KeepReason.ACTIVE_BUILD, KeepReason.NEWEST)]
)
def test_evidence_json_is_exactly_the_json_of_the_evidence(
    route: RouteAnswer | None, active: int | str | None, reasons: tuple[KeepReason, ...]
) -> None:
    for classification in Classification:
        decision = BuildDecision(build(5), classification, active, route, reasons)
        assert decision.evidence_json() == json.dumps(decision.evidence(), sort_keys=True)
