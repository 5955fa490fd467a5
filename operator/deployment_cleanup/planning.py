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

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import NamedTuple

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


_ACTIVE, _ROUTED = Classification.ACTIVE, Classification.ROUTED
_NOT_ROUTED, _UNKNOWN = Classification.NOT_ROUTED, Classification.UNKNOWN


class ProjectIssue(StrEnum):
    """Why a project keeps every build, reported so a human can look."""

    NO_ACTIVE_BUILD = "noActiveBuild"
    ACTIVE_BUILD_NOT_IN_INVENTORY = "activeBuildNotInInventory"
    PROJECT_MISSING = "projectRowMissing"


# Build, RouteAnswer and BuildDecision are made once per build, a million times in a
# big plan: named tuples are immutable like frozen dataclasses and build twice as fast.
class Build(NamedTuple):
    id: BuildId
    project_id: ProjectId
    status: str
    created_at: datetime | None


class RouteAnswer(NamedTuple):
    """Positive evidence from one lookup: this build is (or is not) routed."""

    routed: bool
    source: str
    batch: int
    detail: str | None = None


class BuildDecision(NamedTuple):
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

    def evidence_json(self) -> str:
        """``json.dumps(self.evidence(), sort_keys=True)``, built directly: it is written for
        every candidate, and the generic encoder dominated recording a million of them."""
        return _evidence_json(
            self.classification, self.active_build_id, self.route, self.keep_reasons
        )


# A project's candidates share their active build and a lookup batch's answer, so most
# candidates find their evidence here already made.
@functools.lru_cache(maxsize=4096)
def _evidence_json(
    classification: Classification,
    active_build_id: BuildId | None,
    route: RouteAnswer | None,
    keep_reasons: tuple[KeepReason, ...],
) -> str:
    routing = "null" if route is None else _routing_json(route)
    active = "null" if active_build_id is None else _json_str(str(active_build_id))
    reasons = ", ".join(f'"{r.value}"' for r in keep_reasons)
    return (
        f'{{"classification": "{classification.value}", "keepReasons": [{reasons}], '
        f'"projectActiveBuild": {active}, "routing": {routing}}}'
    )


@functools.lru_cache(maxsize=1024)
def _routing_json(route: RouteAnswer) -> str:
    # Answers are shared per lookup batch (see routing), so this is computed once per batch.
    detail = "" if route.detail is None else f'"detail": {_json_str(route.detail)}, '
    routed = "true" if route.routed else "false"
    return (
        f'{{"batch": {route.batch:d}, {detail}"routed": {routed}, '
        f'"source": {_json_str(route.source)}}}'
    )


def _json_str(value: str) -> str:
    # Plain ASCII letters and digits need no escaping; anything else goes through json.
    return f'"{value}"' if value.isascii() and value.isalnum() else json.dumps(value)


@dataclass(frozen=True, slots=True)
class ProjectDecisions:
    project_id: ProjectId
    decisions: tuple[BuildDecision, ...]
    issue: ProjectIssue | None
    # Routed builds that are not the project's active build: kept, and reported
    # because the two sources disagree about what is live.
    disagreements: tuple[BuildId, ...]


def _newest_first_key(build: Build) -> tuple[bool, datetime, str]:
    return (build.created_at is not None, build.created_at or datetime.min, str(build.id))


def _dated_key(build: Build) -> tuple[datetime | None, str]:
    return (build.created_at, str(build.id))


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

    # Builds without a date sort last; when every build has one (the usual case) the
    # shorter key gives the same order.
    dated = all(b.created_at is not None for b in builds)
    newest_first = sorted(builds, key=_dated_key if dated else _newest_first_key, reverse=True)
    retained = {b.id for b in newest_first[: retention.keep_newest]}
    # Too young: now - created_at < minAge, that is created_at > now - minAge.
    young_after = now - retention.min_age

    decisions = []
    disagreements = []
    for build in newest_first:
        route = routes.get(build.id)
        reasons: list[KeepReason] = []
        if active_build_id is not None and build.id == active_build_id:
            classification = _ACTIVE
            reasons.append(KeepReason.ACTIVE_BUILD)
        elif route is None:
            classification = _UNKNOWN
            reasons.append(KeepReason.ROUTING_UNKNOWN)
        elif route.routed:
            classification = _ROUTED
            reasons.append(KeepReason.ROUTED)
            disagreements.append(build.id)
        else:
            classification = _NOT_ROUTED
        if issue is not None:
            reasons.append(KeepReason.PROJECT_WITHOUT_ACTIVE_BUILD)
        if build.id in retained:
            reasons.append(KeepReason.NEWEST)
        if build.created_at is None:
            reasons.append(KeepReason.AGE_UNKNOWN)
        elif build.created_at > young_after:
            reasons.append(KeepReason.TOO_YOUNG)
        decisions.append(
            BuildDecision(
                build, classification, active_build_id, route, tuple(reasons) if reasons else ()
            )
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
    """Everything decided for one run.

    ``candidates`` are in inventory order: all of them, or only the first
    ``SAMPLE_SIZE`` when the builder streamed them out (see PlanBuilder);
    ``counts["candidates"]`` is always the full number.
    """

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
    def candidate_count(self) -> int:
        return self.counts["candidates"]

    @property
    def failed_receipts(self) -> tuple[LookupReceipt, ...]:
        return tuple(r for r in self.receipts if not r.ok)


def _candidate_line(decision: BuildDecision) -> str:
    # repr keeps the line unambiguous (strings are quoted and escaped) and is far cheaper
    # than json.dumps, which showed in profiles at a million builds.
    b = decision.build
    return f"{b.id!r}\t{b.project_id!r}\t{b.status!r}\n"


@dataclass
class PlanBuilder:
    """Folds projects, in inventory order, into a Plan.

    ``settings`` is the canonical JSON of every setting that changes what is
    archived; it seeds the plan id so that the same data and the same settings
    give the same id, and anything else gives another.

    With ``keep_candidates`` off, :meth:`add` still returns each project's
    candidates (for the caller to record as it goes), but the Plan keeps only
    the first ``SAMPLE_SIZE`` of them, so memory does not grow with the inventory.
    """

    safety: SafetySpec
    settings: Mapping[str, object]
    previous_reference: ReferenceCounts | None = None
    keep_candidates: bool = True
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

    def add(self, project: ProjectDecisions) -> list[BuildDecision]:
        """Fold one project's decisions in; re-check every candidate's invariants.

        Returns the project's candidates (those that also passed the invariants).
        """
        counts, keep = self._counts, self._keep
        counts["projects"] += 1
        if project.issue is not None:
            self._issues[project.issue] += 1
            self._sample("projectsWithoutActiveBuild", f"{project.project_id} ({project.issue})")
        for build_id in project.disagreements:
            counts["disagreements"] += 1
            self._sample("disagreements", f"build {build_id} of project {project.project_id}")
        counts["builds"] += len(project.decisions)
        accepted: list[BuildDecision] = []
        for decision in project.decisions:
            # StrEnum members hash and compare as their values, so they index the str-keyed counts.
            classification = decision.classification
            counts[classification] += 1
            if classification is _ACTIVE or classification is _ROUTED:
                self._reference += 1
            route = decision.route
            if route is not None and route.routed:
                self._routed += 1
            elif classification is _UNKNOWN:
                self._sample("unknown", str(decision.build.id))
            if decision.keep_reasons:
                for reason in decision.keep_reasons:
                    keep[reason] += 1
                continue
            problems = invariant_violations(decision.build, decision.active_build_id, route)
            if problems:
                self._violations.append(f"build {decision.build.id}: " + "; ".join(problems))
                continue
            accepted.append(decision)
        if accepted:
            self._digest.update("".join(map(_candidate_line, accepted)).encode())
            counts["candidates"] += len(accepted)
            room = len(accepted) if self.keep_candidates else SAMPLE_SIZE - len(self._candidates)
            self._candidates.extend(accepted[: max(room, 0)])
            self._per_project_max = max(self._per_project_max, len(accepted))
        return accepted

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
        candidates = self._counts["candidates"]
        thresholds = evaluate_thresholds(
            self.safety,
            candidates=candidates,
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
        elif candidates:
            verdict, reason = Verdict.READY, VerdictReason.PLAN_READY
            message = f"{candidates} builds can be archived; every lookup and check passed"
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
        "v": 2,
        "retention": retention.model_dump(mode="json", by_alias=True),
        "safety": safety.model_dump(mode="json", by_alias=True),
        "archivedStatus": archived_status,
        "tables": dict(table_settings),
    }
