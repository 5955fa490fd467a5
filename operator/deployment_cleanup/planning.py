"""Deciding what may be archived: pure functions, no I/O.

The flow is classify -> invariants -> retention -> thresholds -> Plan(id):

* :func:`classify_project` gives every build of one project an explicit
  classification (active, routed, not routed, unknown) with its evidence, and a
  decision: archive, or keep with the reasons why.
* :func:`invariant_violations` re-checks a candidate against the raw facts,
  independently of the classifier, so a classifier bug cannot archive a live
  build on its own.
* :class:`PlanBuilder` folds projects in inventory order into a :class:`Plan`:
  counts, a bounded sample, the candidates, the safety thresholds and the
  verdict. Anything unknown is kept, and any incomplete lookup blocks the run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from .spec import RetentionSpec, SafetySpec

__all__ = [
    "Build",
    "BuildDecision",
    "BuildId",
    "Classification",
    "KeepReason",
    "LookupReceipt",
    "Plan",
    "PlanBuilder",
    "ProjectDecisions",
    "ProjectId",
    "ProjectIssue",
    "ReferenceCounts",
    "RouteAnswer",
    "ThresholdCheck",
    "Verdict",
    "VerdictReason",
    "classify_project",
    "evaluate_thresholds",
    "invariant_violations",
    "plan_settings",
]

BuildId = int | str
ProjectId = int | str

SAMPLE_SIZE = 20


class Classification(StrEnum):
    ACTIVE = "active"
    ROUTED = "routed"
    NOT_ROUTED = "notRouted"
    UNKNOWN = "unknown"


class KeepReason(StrEnum):
    ACTIVE_BUILD = "activeBuild"
    ROUTED = "routed"
    ROUTING_UNKNOWN = "routingUnknown"
    PROJECT_WITHOUT_ACTIVE_BUILD = "projectWithoutActiveBuild"
    NEWEST = "retainedNewest"
    TOO_YOUNG = "youngerThanMinAge"
    AGE_UNKNOWN = "createdAtUnknown"


class ProjectIssue(StrEnum):
    """Why a project keeps every build, reported so a human can look."""

    NO_ACTIVE_BUILD = "noActiveBuild"
    ACTIVE_BUILD_NOT_IN_INVENTORY = "activeBuildNotInInventory"
    PROJECT_MISSING = "projectRowMissing"


@dataclass(frozen=True, slots=True)
class Build:
    id: BuildId
    project_id: ProjectId
    status: str
    created_at: datetime | None


@dataclass(frozen=True, slots=True)
class RouteAnswer:
    """Positive evidence from one lookup: this build is (or is not) routed."""

    routed: bool
    source: str
    batch: int
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class BuildDecision:
    build: Build
    classification: Classification
    active_build_id: BuildId | None
    route: RouteAnswer | None
    keep_reasons: tuple[KeepReason, ...]

    @property
    def archive(self) -> bool:
        return not self.keep_reasons

    def evidence(self) -> dict[str, object]:
        """The JSON evidence recorded with the decision (audit, status sample)."""
        route: dict[str, object] | None = None
        if self.route is not None:
            route = {
                "routed": self.route.routed,
                "source": self.route.source,
                "batch": self.route.batch,
            }
            if self.route.detail is not None:
                route["detail"] = self.route.detail
        return {
            "classification": str(self.classification),
            "projectActiveBuild": None
            if self.active_build_id is None
            else str(self.active_build_id),
            "routing": route,
            "keepReasons": [str(r) for r in self.keep_reasons],
        }


@dataclass(frozen=True, slots=True)
class ProjectDecisions:
    project_id: ProjectId
    decisions: tuple[BuildDecision, ...]
    issue: ProjectIssue | None
    # Routed builds that are not the project's active build: kept, and reported
    # because the two sources disagree about what is live.
    disagreements: tuple[BuildId, ...]


def _classify(
    build: Build, active_build_id: BuildId | None, route: RouteAnswer | None
) -> Classification:
    if active_build_id is not None and build.id == active_build_id:
        return Classification.ACTIVE
    if route is None:
        return Classification.UNKNOWN
    return Classification.ROUTED if route.routed else Classification.NOT_ROUTED


def classify_project(
    project_id: ProjectId,
    active_build_id: BuildId | None,
    project_known: bool,
    builds: Sequence[Build],
    routes: Mapping[BuildId, RouteAnswer],
    retention: RetentionSpec,
    now: datetime,
) -> ProjectDecisions:
    """Classify and decide every build of one project.

    ``builds`` are all the project's unarchived builds; ``routes`` holds an
    answer only for builds whose lookup succeeded. A project whose active build
    is unknown, or not among its builds, keeps everything.
    """
    ids = {b.id for b in builds}
    issue: ProjectIssue | None = None
    if not project_known:
        issue = ProjectIssue.PROJECT_MISSING
    elif active_build_id is None:
        issue = ProjectIssue.NO_ACTIVE_BUILD
    elif active_build_id not in ids:
        issue = ProjectIssue.ACTIVE_BUILD_NOT_IN_INVENTORY

    newest_first = sorted(
        builds,
        key=lambda b: (b.created_at is not None, b.created_at or datetime.min, str(b.id)),
        reverse=True,
    )
    retained = {b.id for b in newest_first[: retention.keep_newest]}

    decisions = []
    disagreements = []
    for build in newest_first:
        route = routes.get(build.id)
        classification = _classify(build, active_build_id, route)
        reasons: list[KeepReason] = []
        if classification is Classification.ACTIVE:
            reasons.append(KeepReason.ACTIVE_BUILD)
        elif classification is Classification.ROUTED:
            reasons.append(KeepReason.ROUTED)
            disagreements.append(build.id)
        elif classification is Classification.UNKNOWN:
            reasons.append(KeepReason.ROUTING_UNKNOWN)
        if issue is not None:
            reasons.append(KeepReason.PROJECT_WITHOUT_ACTIVE_BUILD)
        if build.id in retained:
            reasons.append(KeepReason.NEWEST)
        if build.created_at is None:
            reasons.append(KeepReason.AGE_UNKNOWN)
        elif now - build.created_at < retention.min_age:
            reasons.append(KeepReason.TOO_YOUNG)
        decisions.append(
            BuildDecision(build, classification, active_build_id, route, tuple(reasons))
        )
    return ProjectDecisions(project_id, tuple(decisions), issue, tuple(disagreements))


def invariant_violations(
    build: Build,
    active_build_id: BuildId | None,
    route: RouteAnswer | None,
) -> list[str]:
    """Why archiving this build would break a hard rule; empty if it would not.

    Deliberately written apart from :func:`classify_project` and from the raw
    facts only, so that the two must agree before anything is archived.
    """
    problems = []
    if active_build_id is None:
        problems.append("its project has no known active build")
    elif build.id == active_build_id:
        problems.append("it is its project's active build")
    if route is None:
        problems.append("its routing is unknown")
    elif route.routed:
        problems.append("it is routed")
    return problems


@dataclass(frozen=True, slots=True)
class LookupReceipt:
    """What happened to one routing lookup batch."""

    index: int
    size: int
    ok: bool
    attempts: int
    seconds: float
    error: str | None = None

    def __post_init__(self) -> None:
        if self.ok == (self.error is not None):
            raise ValueError("a receipt is ok exactly when it has no error")


@dataclass(frozen=True, slots=True)
class ThresholdCheck:
    name: str
    limit: float
    actual: float | None
    passed: bool
    note: str | None = None


class Verdict(StrEnum):
    READY = "Ready"
    BLOCKED = "Blocked"


class VerdictReason(StrEnum):
    PLAN_READY = "PlanReady"
    NOTHING_TO_ARCHIVE = "NothingToArchive"
    LOOKUPS_INCOMPLETE = "LookupsIncomplete"
    INVARIANT_VIOLATED = "InvariantViolated"
    THRESHOLD_EXCEEDED = "ThresholdExceeded"


@dataclass(frozen=True, slots=True)
class ReferenceCounts:
    """The builds known to be live: what the collapse guard compares between runs.

    ``active`` comes from the builds database and ``routed`` from the routing
    source, so a collapse of either one is caught on its own: a routing API
    that suddenly answers "not routed" for everything would otherwise make
    every routed-but-not-active build (a canary, a rollback) a candidate.
    """

    active: int
    routed: int
    total: int  # builds that are active or routed


def _drop_check(name: str, limit: float, previous: int | None, now: int) -> ThresholdCheck:
    if not previous:
        return ThresholdCheck(name, limit, None, True, "no earlier successful run to compare with")
    drop = max(0.0, (previous - now) * 100.0 / previous)
    return ThresholdCheck(
        name,
        limit,
        round(drop, 4),
        drop <= limit,
        f"{previous} at the last successful run, {now} now",
    )


def evaluate_thresholds(
    safety: SafetySpec,
    *,
    candidates: int,
    inventory: int,
    max_per_project: int,
    reference: ReferenceCounts,
    previous: ReferenceCounts | None,
) -> tuple[ThresholdCheck, ...]:
    """Every safety threshold with its limit and actual value. A value equal to its limit passes."""
    percent = 0.0 if inventory == 0 else candidates * 100.0 / inventory
    drop_limit = safety.reference_set.max_drop_percent
    return (
        ThresholdCheck(
            "maxArchivedPerRun",
            safety.max_archived_per_run,
            candidates,
            candidates <= safety.max_archived_per_run,
        ),
        ThresholdCheck(
            "maxArchivedPercent",
            safety.max_archived_percent,
            round(percent, 4),
            percent <= safety.max_archived_percent,
        ),
        ThresholdCheck(
            "maxArchivedPerProject",
            safety.max_archived_per_project,
            max_per_project,
            max_per_project <= safety.max_archived_per_project,
        ),
        ThresholdCheck(
            "referenceSetMinCount",
            safety.reference_set.min_count,
            reference.total,
            reference.total >= safety.reference_set.min_count,
        ),
        _drop_check(
            "activeBuildsMaxDropPercent",
            drop_limit,
            None if previous is None else previous.active,
            reference.active,
        ),
        _drop_check(
            "routedBuildsMaxDropPercent",
            drop_limit,
            None if previous is None else previous.routed,
            reference.routed,
        ),
    )


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything decided for one run. ``candidates`` are in inventory order."""

    id: str
    verdict: Verdict
    reason: VerdictReason
    message: str
    counts: Mapping[str, int]
    keep_reasons: Mapping[str, int]
    project_issues: Mapping[str, int]
    thresholds: tuple[ThresholdCheck, ...]
    receipts: tuple[LookupReceipt, ...]
    candidates: tuple[BuildDecision, ...]
    reference: ReferenceCounts
    samples: Mapping[str, tuple[str, ...]]
    invariant_violations: tuple[str, ...]

    @property
    def ready(self) -> bool:
        return self.verdict is Verdict.READY

    @property
    def failed_receipts(self) -> tuple[LookupReceipt, ...]:
        return tuple(r for r in self.receipts if not r.ok)


def _candidate_line(decision: BuildDecision) -> bytes:
    b = decision.build
    return json.dumps([str(b.id), str(b.project_id), b.status]).encode() + b"\n"


@dataclass
class PlanBuilder:
    """Folds projects, in inventory order, into a Plan.

    ``settings`` is the canonical JSON of every setting that changes what is
    archived; it seeds the plan id so that the same data and the same settings
    give the same id, and anything else gives another.
    """

    safety: SafetySpec
    settings: Mapping[str, object]
    previous_reference: ReferenceCounts | None = None
    _digest: hashlib._Hash = field(init=False)
    _counts: dict[str, int] = field(init=False)
    _keep: dict[str, int] = field(init=False)
    _issues: dict[str, int] = field(init=False)
    _candidates: list[BuildDecision] = field(init=False, default_factory=list)
    _per_project_max: int = field(init=False, default=0)
    _reference: int = field(init=False, default=0)
    _routed: int = field(init=False, default=0)
    _violations: list[str] = field(init=False, default_factory=list)
    _samples: dict[str, list[str]] = field(init=False)

    def __post_init__(self) -> None:
        self._digest = hashlib.sha256(
            json.dumps(self.settings, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        )
        self._counts = {
            "projects": 0,
            "builds": 0,
            "candidates": 0,
            "disagreements": 0,
            "unscanned": 0,
        }
        self._counts.update({str(c): 0 for c in Classification})
        self._keep = {str(r): 0 for r in KeepReason}
        self._issues = {str(i): 0 for i in ProjectIssue}
        self._samples = {"disagreements": [], "projectsWithoutActiveBuild": [], "unknown": []}

    def _sample(self, kind: str, value: str) -> None:
        if len(self._samples[kind]) < SAMPLE_SIZE:
            self._samples[kind].append(value)

    def add(self, project: ProjectDecisions) -> None:
        """Fold one project's decisions in; re-check every candidate's invariants."""
        self._counts["projects"] += 1
        if project.issue is not None:
            self._issues[str(project.issue)] += 1
            self._sample("projectsWithoutActiveBuild", f"{project.project_id} ({project.issue})")
        for build_id in project.disagreements:
            self._counts["disagreements"] += 1
            self._sample("disagreements", f"build {build_id} of project {project.project_id}")
        per_project = 0
        for decision in project.decisions:
            self._counts["builds"] += 1
            self._counts[str(decision.classification)] += 1
            if decision.classification in (Classification.ACTIVE, Classification.ROUTED):
                self._reference += 1
            if decision.route is not None and decision.route.routed:
                self._routed += 1
            elif decision.classification is Classification.UNKNOWN:
                self._sample("unknown", str(decision.build.id))
            for reason in decision.keep_reasons:
                self._keep[str(reason)] += 1
            if not decision.archive:
                continue
            problems = invariant_violations(
                decision.build, decision.active_build_id, decision.route
            )
            if problems:
                self._violations.append(f"build {decision.build.id}: " + "; ".join(problems))
                continue
            per_project += 1
            self._candidates.append(decision)
            self._digest.update(_candidate_line(decision))
        self._counts["candidates"] = len(self._candidates)
        self._per_project_max = max(self._per_project_max, per_project)

    def note_unscanned(self, count: int) -> None:
        """Builds with no project or no status: never candidates, but counted so they show."""
        self._counts["unscanned"] = count

    def reference(self) -> ReferenceCounts:
        return ReferenceCounts(
            self._counts[str(Classification.ACTIVE)], self._routed, self._reference
        )

    def finish(self, receipts: Iterable[LookupReceipt]) -> Plan:
        receipt_list = tuple(sorted(receipts, key=lambda r: r.index))
        failed = [r for r in receipt_list if not r.ok]
        thresholds = evaluate_thresholds(
            self.safety,
            candidates=len(self._candidates),
            inventory=self._counts["builds"],
            max_per_project=self._per_project_max,
            reference=self.reference(),
            previous=self.previous_reference,
        )
        reasons: list[tuple[VerdictReason, str]] = []
        if failed:
            shown = "; ".join(f"batch {r.index}: {r.error}" for r in failed[:5])
            more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
            reasons.append(
                (
                    VerdictReason.LOOKUPS_INCOMPLETE,
                    f"{len(failed)} of {len(receipt_list)} routing lookup batches failed, "
                    f"so nothing is archived: {shown}{more}",
                )
            )
        if self._violations:
            reasons.append(
                (
                    VerdictReason.INVARIANT_VIOLATED,
                    f"{len(self._violations)} candidates broke a hard invariant: "
                    + "; ".join(self._violations[:5]),
                )
            )
        broken = [t for t in thresholds if not t.passed]
        if broken:
            reasons.append(
                (
                    VerdictReason.THRESHOLD_EXCEEDED,
                    "safety thresholds exceeded: "
                    + "; ".join(f"{t.name} actual {t.actual} vs limit {t.limit}" for t in broken),
                )
            )
        if reasons:
            verdict, reason = Verdict.BLOCKED, reasons[0][0]
            message = " | ".join(text for _, text in reasons)
        elif self._candidates:
            verdict, reason = Verdict.READY, VerdictReason.PLAN_READY
            message = (
                f"{len(self._candidates)} builds can be archived; every lookup and check passed"
            )
        else:
            verdict, reason = Verdict.READY, VerdictReason.NOTHING_TO_ARCHIVE
            message = "every lookup and check passed; no build is eligible for archiving"
        return Plan(
            id="p-" + self._digest.copy().hexdigest()[:16],
            verdict=verdict,
            reason=reason,
            message=message,
            counts=dict(self._counts),
            keep_reasons=dict(self._keep),
            project_issues=dict(self._issues),
            thresholds=thresholds,
            receipts=receipt_list,
            candidates=tuple(self._candidates),
            reference=self.reference(),
            samples={k: tuple(v) for k, v in self._samples.items()},
            invariant_violations=tuple(self._violations),
        )


def plan_settings(
    retention: RetentionSpec,
    safety: SafetySpec,
    archived_status: str,
    table_settings: Mapping[str, object],
) -> dict[str, object]:
    """The settings that seed a plan id: anything that changes what gets archived."""
    return {
        "v": 1,
        "retention": retention.model_dump(mode="json", by_alias=True),
        "safety": safety.model_dump(mode="json", by_alias=True),
        "archivedStatus": archived_status,
        "tables": dict(table_settings),
    }
