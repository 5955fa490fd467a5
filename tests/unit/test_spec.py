"""Parsing and validating the DeploymentCleanup document."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from deployment_cleanup.spec import (
    ApprovalMode,
    Mode,
    SpecError,
    format_duration,
    load_cleanup,
    parse_cleanup,
    parse_duration,
)
from tests.support.documents import cleanup_document


def test_minimal_document_gets_safe_defaults() -> None:
    c = parse_cleanup(cleanup_document())
    assert c.spec.mode is Mode.PLAN  # apply must be asked for
    assert c.spec.approval.mode is ApprovalMode.MANUAL
    assert c.spec.routing.batch_size == 500
    assert c.spec.retention.min_age == timedelta(days=7)
    assert c.spec.database.builds.table == "builds"
    assert c.key == "platform/nightly"


def _with(path: str, value: Any) -> dict[str, Any]:
    doc = cleanup_document(routing={"http": {"url": "http://127.0.0.1:9/lookup"}})
    node = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return doc


BAD_INPUTS = [
    pytest.param("spec.bogus", 1, "spec.bogus: unknown field", id="unknown-field"),
    pytest.param("spec.routing.batchSize", "500", "spec.routing.batchSize", id="string-for-int"),
    pytest.param("spec.routing.batchSize", 0, "greater than or equal to 1", id="batch-size-zero"),
    pytest.param(
        "spec.safety.maxArchivedPerRun", -1, "spec.safety.maxArchivedPerRun", id="negative-count"
    ),
    pytest.param(
        "spec.safety.maxArchivedPercent", 100.5, "less than or equal to 100", id="percent-over-100"
    ),
    pytest.param(
        "spec.safety.maxArchivedPercent",
        -1,
        "spec.safety.maxArchivedPercent",
        id="percent-negative",
    ),
    pytest.param("spec.retention.minAge", "7 days", "not a duration", id="bad-duration"),
    pytest.param("spec.retention.minAge", 7, "spec.retention.minAge", id="number-for-duration"),
    pytest.param("spec.schedule", {"cron": "0 25 * * *"}, "spec.schedule.cron", id="bad-cron-hour"),
    pytest.param("spec.schedule", {"cron": "0 3 * *"}, "spec.schedule.cron", id="cron-four-fields"),
    pytest.param(
        "spec.schedule", {"cron": "0 3 * * *", "timeZone": "Nowhere/City"}, "time zone", id="bad-tz"
    ),
    pytest.param(
        "spec.database.builds",
        {"table": "builds; DROP TABLE builds"},
        "not a safe SQL identifier",
        id="injection-table",
    ),
    pytest.param(
        "spec.database.builds",
        {"status": 'status"--'},
        "spec.database.builds.status",
        id="quote-col",
    ),
    pytest.param(
        "spec.database.projects",
        {"id": "x" * 64},
        "not a safe SQL identifier",
        id="long-identifier",
    ),
    pytest.param("spec.mode", "Delete", "spec.mode", id="unknown-mode"),
    pytest.param(
        "spec.approval",
        {"approvedPlanId": "latest"},
        "spec.approval.approvedPlanId",
        id="bad-plan-id",
    ),
    pytest.param("spec.routing.http.url", "ftp://x", "not an http", id="non-http-url"),
    pytest.param(
        "spec.database",
        {"url": "sqlite://", "urlSecretRef": {"name": "db", "key": "url"}},
        "exactly one of url or urlSecretRef",
        id="two-db-sources",
    ),
    pytest.param("spec.database", {}, "exactly one of url or urlSecretRef", id="no-db-source"),
    pytest.param(
        "spec.database.urlSecretRef",
        {"name": "Bad_Name", "key": "url"},
        "Secret name",
        id="bad-secret-name",
    ),
    pytest.param(
        "spec.execution",
        {"batchSize": 10, "canaryBatchSize": 20},
        "canaryBatchSize",
        id="canary>batch",
    ),
    pytest.param("spec.routing.sql", {}, "exactly one of http or sql", id="two-routing-sources"),
    pytest.param("kind", "Deployment", "kind must be", id="wrong-kind"),
    pytest.param("apiVersion", "v1", "apiVersion must be", id="wrong-api-version"),
    pytest.param("metadata.name", "Not_A_Name", "metadata.name", id="bad-name"),
    pytest.param("spec.retention.keepNewest", True, "spec.retention.keepNewest", id="bool-for-int"),
]


@pytest.mark.parametrize(("path", "value", "expected"), BAD_INPUTS)
def test_bad_input_is_refused_with_its_field_path(path: str, value: Any, expected: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_cleanup(_with(path, value))
    assert expected in str(caught.value)
    assert all(p.path for p in caught.value.problems)


def test_every_problem_is_reported_at_once() -> None:
    doc = _with("spec.routing.batchSize", 0)
    doc["spec"]["retention"] = {"minAge": "soon", "keepNewest": -3}
    with pytest.raises(SpecError) as caught:
        parse_cleanup(doc)
    paths = {p.path for p in caught.value.problems}
    assert paths == {"spec.routing.batchSize", "spec.retention.minAge", "spec.retention.keepNewest"}


def test_huge_strings_are_refused_without_echoing_them_whole() -> None:
    doc = _with("spec.database.archivedStatus", "x" * 100_000)
    with pytest.raises(SpecError) as caught:
        parse_cleanup(doc)
    assert len(str(caught.value)) < 500


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", timedelta(milliseconds=500)),
        ("30s", timedelta(seconds=30)),
        ("1h30m", timedelta(minutes=90)),
        ("7d", timedelta(days=7)),
        ("0s", timedelta(0)),
    ],
)
def test_durations_round_trip(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected
    assert format_duration(expected) == text


@pytest.mark.parametrize("text", ["", "7", "1.5h", "-1s", "1h 30m", "3w", "99999d"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_yaml_must_hold_exactly_one_document() -> None:
    with pytest.raises(SpecError, match="expected one document, found 2"):
        load_cleanup("a: 1\n---\nb: 2\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_cleanup("spec: [unclosed\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_cleanup("- a list\n")


def test_kubernetes_metadata_is_accepted_as_kubectl_returns_it() -> None:
    doc = cleanup_document()
    doc["metadata"].update(uid="1234", resourceVersion="77", generation=4, managedFields=[{}])
    assert parse_cleanup(doc).metadata.generation == 4
