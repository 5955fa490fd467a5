"""The DeploymentCleanup document as typed, validated objects.

This module is pure: it parses the same YAML a user applies with kubectl and
either returns a frozen :class:`DeploymentCleanup` or raises :class:`SpecError`
listing every problem with its field path. Nothing is read or written before a
spec is valid, so callers parse first and connect later.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from cronsim import CronSim, CronSimError
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "KIND",
    "ApprovalMode",
    "ApprovalSpec",
    "BuildsTable",
    "CleanupSpec",
    "DatabaseSpec",
    "DeploymentCleanup",
    "ExecutionSpec",
    "HttpRoutingSpec",
    "Metadata",
    "Mode",
    "NotificationsSpec",
    "NotifyOn",
    "ProjectsTable",
    "ReferenceSetSpec",
    "RetentionSpec",
    "RetrySpec",
    "RoutingSpec",
    "SafetySpec",
    "ScheduleSpec",
    "SecretKeyRef",
    "SpecError",
    "SpecProblem",
    "SqlRoutingSpec",
    "WebhookSpec",
    "format_duration",
    "load_cleanup",
    "parse_cleanup",
    "parse_duration",
]

API_GROUP = "deployment-cleanup.dev"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND = "DeploymentCleanup"

# Identifiers are quoted when used, but we still refuse anything that is not a
# plain identifier: a name with quotes or semicolons in a cleanup spec is far
# more likely an injection attempt or a typo than a real table.
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")
_HTTP_HEADER = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_PLAN_ID = re.compile(r"^p-[0-9a-f]{16}$")
_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h|d)")
_DURATION_UNITS = {
    "d": timedelta(days=1),
    "h": timedelta(hours=1),
    "m": timedelta(minutes=1),
    "s": timedelta(seconds=1),
    "ms": timedelta(milliseconds=1),
}
_MAX_DURATION = timedelta(days=3650)


class SpecProblem(BaseModel):
    """One thing wrong with a document: where, and what."""

    model_config = ConfigDict(frozen=True)

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SpecError(ValueError):
    """The document is invalid. ``problems`` names every field that is wrong."""

    def __init__(self, problems: list[SpecProblem]) -> None:
        self.problems = problems
        super().__init__("invalid DeploymentCleanup:\n" + "\n".join(f"  {p}" for p in problems))


def _shown(value: object) -> str:
    """A value as an error message shows it: never more than 60 characters of it."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_duration(value: object) -> timedelta:
    """Parse ``90s``, ``15m``, ``1h30m``, ``7d`` or ``500ms`` into a timedelta."""
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a duration string like '30s', '15m', '7d' (got {_shown(value)})")
    parts = _DURATION_PART.findall(value)
    if not value or len(value) > 64 or "".join(n + u for n, u in parts) != value:
        raise ValueError(
            f"not a duration: {_shown(value)} (use e.g. '500ms', '30s', '15m', '1h30m', '7d')"
        )
    try:
        total = sum((int(n) * _DURATION_UNITS[u] for n, u in parts), timedelta())
    except OverflowError:
        total = _MAX_DURATION + timedelta(days=1)
    if total > _MAX_DURATION:
        raise ValueError(f"duration {_shown(value)} is longer than 10 years")
    return total


def format_duration(value: timedelta) -> str:
    """The shortest canonical spelling of a duration, e.g. ``1h30m``."""
    millis = round(value.total_seconds() * 1000)
    if millis == 0:
        return "0s"
    out = []
    for unit in ("d", "h", "m", "s", "ms"):
        size = round(_DURATION_UNITS[unit].total_seconds() * 1000)
        count, millis = divmod(millis, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out)


def _identifier(value: str) -> str:
    if not _IDENTIFIER.fullmatch(value):
        raise ValueError(
            f"{_shown(value)} is not a safe SQL identifier "
            "(letters, digits and underscores, not starting with a digit, at most 63)"
        )
    return value


def _matches(pattern: re.Pattern[str], what: str) -> AfterValidator:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"{_shown(value)} is not a valid {what}")
        return value

    return AfterValidator(check)


def _cron(value: str) -> str:
    if len(value) > 128:
        raise ValueError("a cron expression is at most 128 characters")
    try:
        CronSim(value, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        raise ValueError(f"{_shown(value)} is not a valid cron expression: {exc}") from None
    if len(value.split()) != 5:
        raise ValueError(
            f"{_shown(value)} must have exactly five fields (minute hour day month weekday)"
        )
    return value


def _time_zone(value: str) -> str:
    try:
        if len(value) > 64:
            raise ValueError(value)
        ZoneInfo(value)
    # zoneinfo raises OSError subclasses for names that are folders or too long.
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"{_shown(value)} is not a known IANA time zone") from None
    return value


def _http_url(value: str) -> str:
    if len(value) > 4096 or not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", value):
        raise ValueError(f"{_shown(value)} is not an http:// or https:// URL")
    return value


Identifier = Annotated[str, AfterValidator(_identifier)]
Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
Percent = Annotated[float, Field(ge=0, le=100)]
Count = Annotated[int, Field(ge=0, le=100_000_000)]


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        strict=True,
        alias_generator=to_camel,
        populate_by_name=True,
    )


class Mode(StrEnum):
    PLAN = "Plan"
    APPLY = "Apply"


class ApprovalMode(StrEnum):
    MANUAL = "Manual"
    AUTOMATIC = "Automatic"


class SecretKeyRef(_Model):
    """A key in a Secret in the cleanup's namespace."""

    name: Annotated[str, _matches(_DNS_SUBDOMAIN, "Secret name")]
    key: Annotated[str, _matches(_SECRET_KEY, "Secret key")]


class ProjectsTable(_Model):
    table: Identifier = "projects"
    id: Identifier = "id"
    active_build_id: Identifier = "active_build_id"


class BuildsTable(_Model):
    table: Identifier = "builds"
    id: Identifier = "id"
    project_id: Identifier = "project_id"
    status: Identifier = "status"
    created_at: Identifier = "created_at"


class DatabaseSpec(_Model):
    """Where the builds database is and how its tables are named."""

    url: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    url_secret_ref: SecretKeyRef | None = None
    db_schema: Annotated[Identifier | None, Field(alias="schema")] = None
    projects: ProjectsTable = ProjectsTable()
    builds: BuildsTable = BuildsTable()
    archived_status: Annotated[str, Field(min_length=1, max_length=64)] = "archived"
    state_table_prefix: Identifier = "deployment_cleanup_"

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.url is None) == (self.url_secret_ref is None):
            raise ValueError("set exactly one of url or urlSecretRef")
        return self


class HttpRoutingSpec(_Model):
    """The routing API: POST {"ids": [...]} -> {"results": [{"id", "routed"}]}."""

    url: Annotated[str, AfterValidator(_http_url)]
    token_secret_ref: SecretKeyRef | None = None
    token_header: Annotated[str, _matches(_HTTP_HEADER, "HTTP header name")] = "Authorization"  # noqa: S105
    token_prefix: Annotated[str, Field(max_length=32)] = "Bearer "  # noqa: S105


class SqlRoutingSpec(_Model):
    """A routes table: a build is routed if and only if a row names it."""

    url: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    url_secret_ref: SecretKeyRef | None = None
    db_schema: Annotated[Identifier | None, Field(alias="schema")] = None
    table: Identifier = "routes"
    build_id: Identifier = "build_id"
    hostname: Identifier = "hostname"

    @model_validator(mode="after")
    def _at_most_one_source(self) -> Self:
        if self.url is not None and self.url_secret_ref is not None:
            raise ValueError(
                "set at most one of url or urlSecretRef (neither: the builds database)"
            )
        return self


class RetrySpec(_Model):
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    initial_backoff: Duration = timedelta(milliseconds=500)
    max_backoff: Duration = timedelta(seconds=10)


class RoutingSpec(_Model):
    """How every build's routing is confirmed. Exactly one of http or sql."""

    http: HttpRoutingSpec | None = None
    sql: SqlRoutingSpec | None = None
    batch_size: Annotated[int, Field(ge=1, le=5000)] = 500
    concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    connect_timeout: Duration = timedelta(seconds=5)
    read_timeout: Duration = timedelta(seconds=10)
    batch_deadline: Duration = timedelta(seconds=30)
    retries: RetrySpec = RetrySpec()
    stop_after_failed_batches: Annotated[int, Field(ge=1, le=1000)] = 3

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.http is None) == (self.sql is None):
            raise ValueError("set exactly one of http or sql")
        if self.batch_deadline <= timedelta(0):
            raise ValueError("batchDeadline must be longer than 0s")
        return self


class RetentionSpec(_Model):
    keep_newest: Annotated[int, Field(ge=0, le=10_000)] = 3
    min_age: Duration = timedelta(days=7)


class ReferenceSetSpec(_Model):
    """Guards against the reference set (active or routed builds) collapsing."""

    max_drop_percent: Percent = 10.0
    min_count: Count = 1


class SafetySpec(_Model):
    max_archived_per_run: Count = 500
    max_archived_percent: Percent = 10.0
    max_archived_per_project: Count = 50
    reference_set: ReferenceSetSpec = ReferenceSetSpec()


class ExecutionSpec(_Model):
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 250
    canary_batch_size: Annotated[int, Field(ge=1, le=10_000)] = 10
    pause_between_batches: Duration = timedelta(0)

    @model_validator(mode="after")
    def _canary_fits(self) -> Self:
        if self.canary_batch_size > self.batch_size:
            raise ValueError("canaryBatchSize must not be larger than batchSize")
        return self


class ApprovalSpec(_Model):
    # strict=False lets the enum take its string value, as YAML spells it.
    mode: Annotated[ApprovalMode, Field(strict=False)] = ApprovalMode.MANUAL
    approved_plan_id: (
        Annotated[str, _matches(_PLAN_ID, "plan id (p- and 16 hex digits)")] | None
    ) = None


class ScheduleSpec(_Model):
    cron: Annotated[str, AfterValidator(_cron)]
    time_zone: Annotated[str, AfterValidator(_time_zone)] = "UTC"
    suspend: bool = False
    starting_deadline: Duration = timedelta(hours=1)


class NotifyOn(StrEnum):
    BLOCKED = "Blocked"
    FAILED = "Failed"
    APPLIED = "Applied"


class WebhookSpec(_Model):
    """A Slack-compatible incoming webhook: POST {"text": ...}."""

    url_secret_ref: SecretKeyRef
    # Not "on": YAML 1.1 reads an unquoted `on:` key as the boolean true.
    events: Annotated[
        tuple[Annotated[NotifyOn, Field(strict=False)], ...],
        Field(strict=False, min_length=1, max_length=3),
    ] = (NotifyOn.BLOCKED, NotifyOn.FAILED, NotifyOn.APPLIED)


class NotificationsSpec(_Model):
    webhook: WebhookSpec | None = None


class CleanupSpec(_Model):
    mode: Annotated[Mode, Field(strict=False)] = Mode.PLAN
    database: DatabaseSpec
    routing: RoutingSpec
    retention: RetentionSpec = RetentionSpec()
    safety: SafetySpec = SafetySpec()
    execution: ExecutionSpec = ExecutionSpec()
    approval: ApprovalSpec = ApprovalSpec()
    schedule: ScheduleSpec | None = None
    notifications: NotificationsSpec = NotificationsSpec()


class Metadata(BaseModel):
    """The parts of Kubernetes metadata the engine uses; the rest is ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    name: Annotated[str, _matches(_DNS_SUBDOMAIN, "resource name")]
    namespace: Annotated[str, _matches(_DNS_SUBDOMAIN, "namespace")] = "default"
    generation: int = 1


class DeploymentCleanup(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, populate_by_name=True)

    api_version: Annotated[str, Field(alias="apiVersion")]
    kind: str
    metadata: Metadata
    spec: CleanupSpec

    @model_validator(mode="after")
    def _type(self) -> Self:
        if self.api_version != API_VERSION:
            raise ValueError(f"apiVersion must be {API_VERSION!r}")
        if self.kind != KIND:
            raise ValueError(f"kind must be {KIND!r}")
        return self

    @property
    def key(self) -> str:
        """``namespace/name``: how runs of this cleanup are recorded."""
        return f"{self.metadata.namespace}/{self.metadata.name}"


def _problem(error: Mapping[str, Any]) -> SpecProblem:
    path = ".".join(str(part) for part in error["loc"]) or "(document)"
    kind = error["type"]
    if kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "missing":
        message = "required field is missing"
    else:
        message = str(error["msg"]).removeprefix("Value error, ")
        if "input" in error and kind not in ("value_error", "assertion_error"):
            shown = repr(error["input"])
            message += f" (got {shown[:80]}{'...' if len(shown) > 80 else ''})"
    return SpecProblem(path=path, message=message)


def parse_cleanup(document: object) -> DeploymentCleanup:
    """Validate a parsed YAML/JSON document; raise SpecError naming every bad field."""
    if not isinstance(document, Mapping):
        raise SpecError([SpecProblem(path="(document)", message="must be a mapping")])
    try:
        return DeploymentCleanup.model_validate(document, by_alias=True)
    except ValidationError as exc:
        raise SpecError([_problem(e) for e in exc.errors()]) from None


def load_cleanup(text: str) -> DeploymentCleanup:
    """Parse YAML text holding exactly one DeploymentCleanup."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError(
            [SpecProblem(path="(document)", message=f"not valid YAML: {exc}")]
        ) from None
    if len(documents) != 1:
        raise SpecError(
            [
                SpecProblem(
                    path="(document)", message=f"expected one document, found {len(documents)}"
                )
            ]
        )
    return parse_cleanup(documents[0])
