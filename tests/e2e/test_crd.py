"""The CRDs on a real kube-apiserver: defaults, validation, kubectl explain and get, the status.

Every refusal here comes from the API server itself (kubectl validates nothing on the client
side), and each bad input is refused by spec.py as well. The CRDs stay installed after the
module: they are the product's, and applying them again is a no-op.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployment_cleanup.runstate import RunState
from deployment_cleanup.spec import API_VERSION, KIND, SpecError, parse_cleanup
from deployment_cleanup.status import build_status
from tests.support.controlplane import ControlPlane
from tests.unit.test_crd_matches_spec import (
    FULL_DOCUMENTS,
    NOW,
    SAMPLE_STATUSES,
    sample_plan,
    sample_run,
)

REPO = Path(__file__).parents[2]
CRD_FILE = REPO / "crds" / "deploymentcleanups.deployment-cleanup.dev.yaml"
PEERING_FILE = REPO / "crds" / "kopf-peering.yaml"
EXAMPLE_FILE = REPO / "examples" / "nightly-plan-only.yaml"
CRD_NAME = "deploymentcleanups.deployment-cleanup.dev"
PEERING_CRD_SCOPES = {
    "clusterkopfpeerings.kopf.dev": "Cluster",
    "kopfpeerings.kopf.dev": "Namespaced",
}
CRD_SCHEMA: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"][
    "openAPIV3Schema"
]


@pytest.fixture(scope="module")
def plane(control_plane: ControlPlane) -> ControlPlane:
    """The control plane with both CRD files applied and every CRD Established."""
    control_plane.kubectl("apply", "-f", str(CRD_FILE), "-f", str(PEERING_FILE))
    names = [CRD_NAME, *PEERING_CRD_SCOPES]
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", *[f"crd/{n}" for n in names]
    )
    return control_plane


@pytest.fixture
def namespace(plane: ControlPlane) -> Iterator[str]:
    name = f"crd-{secrets.token_hex(4)}"
    plane.kubectl("create", "namespace", name)
    yield name
    # Without kube-controller-manager it stays Terminating, which is harmless in a test etcd.
    plane.kubectl("delete", "namespace", name, "--wait=false")


def cleanup(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": copy.deepcopy(dict(spec)),
    }


MINIMAL_SPEC = {"database": {"url": "sqlite:///builds.sqlite"}, "routing": {"sql": {}}}
VALID_SPEC = {
    "database": {"url": "sqlite:///builds.sqlite"},
    "routing": {"http": {"url": "http://127.0.0.1:9/lookup"}},
}


def create(
    plane: ControlPlane, namespace: str, document: Mapping[str, Any], *flags: str
) -> subprocess.CompletedProcess[str]:
    return plane.kubectl(
        "create", "-n", namespace, *flags, "-f", "-", input=json.dumps(document), check=False
    )


def stored(plane: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    result = plane.kubectl("get", CRD_NAME, name, "-n", namespace, "-o", "json")
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def dumped_spec(document: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as spec.py reads it, every default filled in, in the CRD's spelling."""
    return parse_cleanup(document).spec.model_dump(by_alias=True, mode="json", exclude_none=True)


def test_crds_are_established_under_their_names(plane: ControlPlane) -> None:
    crds = {
        name: json.loads(plane.kubectl("get", "crd", name, "-o", "json").stdout)
        for name in [CRD_NAME, *PEERING_CRD_SCOPES]
    }
    for name, crd in crds.items():
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True", name
        assert conditions["NamesAccepted"] == "True", name
    accepted = crds[CRD_NAME]["status"]["acceptedNames"]
    assert accepted["shortNames"] == ["dcl"]
    assert accepted["categories"] == ["deployment-cleanup"]
    assert crds[CRD_NAME]["spec"]["scope"] == "Namespaced"
    for name, scope in PEERING_CRD_SCOPES.items():
        assert crds[name]["spec"]["scope"] == scope


def test_minimal_resource_gets_every_default_from_the_server(
    plane: ControlPlane, namespace: str
) -> None:
    document = cleanup("minimal", MINIMAL_SPEC)
    create(plane, namespace, document).check_returncode()

    spec = stored(plane, namespace, "minimal")["spec"]

    assert spec["mode"] == "Plan"
    assert spec["routing"]["batchSize"] == 500
    assert spec["routing"]["retries"] == {
        "maxAttempts": 3,
        "initialBackoff": "500ms",
        "maxBackoff": "10s",
    }
    assert spec["retention"] == {"keepNewest": 3, "minAge": "7d"}
    assert spec["safety"]["referenceSet"] == {"maxDropPercent": 10, "minCount": 1}
    assert spec["approval"] == {"mode": "Manual"}
    assert spec["routing"]["sql"] == {
        "table": "routes",
        "buildId": "build_id",
        "hostname": "hostname",
    }
    # The server's defaults are spec.py's, all of them.
    assert spec == dumped_spec(document)


def test_example_is_accepted_with_its_values_and_the_rest_defaulted(
    plane: ControlPlane, namespace: str
) -> None:
    example = yaml.safe_load(EXAMPLE_FILE.read_text())
    example["metadata"]["namespace"] = namespace
    plane.kubectl("apply", "-f", "-", input=json.dumps(example))

    result = stored(plane, namespace, example["metadata"]["name"])

    spec = result["spec"]
    assert spec["retention"] == {"keepNewest": 3, "minAge": "14d"}
    assert spec["schedule"] == {
        "cron": "30 2 * * *",
        "timeZone": "Europe/Berlin",
        "suspend": False,
        "startingDeadline": "1h",
    }
    assert spec["routing"]["http"]["tokenHeader"] == "Authorization"
    assert spec["execution"] == {
        "batchSize": 250,
        "canaryBatchSize": 10,
        "pauseBetweenBatches": "0s",
    }
    assert spec == dumped_spec(example)
    assert parse_cleanup(result).spec == parse_cleanup(example).spec


@pytest.mark.parametrize(
    "document", FULL_DOCUMENTS, ids=[d["metadata"]["name"] for d in FULL_DOCUMENTS]
)
def test_a_resource_setting_every_field_is_stored_unchanged(
    plane: ControlPlane, namespace: str, document: dict[str, Any]
) -> None:
    # Nothing is pruned (every field is in the schema) and nothing set is overwritten.
    body = cleanup(document["metadata"]["name"], document["spec"])
    create(plane, namespace, body).check_returncode()

    spec = stored(plane, namespace, body["metadata"]["name"])["spec"]

    assert spec == dumped_spec(body)
    assert _without_defaults_added(spec, body["spec"]) == body["spec"]


def _without_defaults_added(value: Any, sent: Any) -> Any:
    if isinstance(value, dict) and isinstance(sent, dict):
        return {k: _without_defaults_added(v, sent[k]) for k, v in value.items() if k in sent}
    return value


_ABSENT = object()


def _with(path: str, value: Any) -> dict[str, Any]:
    """A valid document with ``value`` at ``path`` (or nothing there, for _ABSENT)."""
    document = cleanup("bad", VALID_SPEC)
    node = document
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if value is _ABSENT:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return document


REFUSED = [
    pytest.param(
        "spec.routing.batchSize",
        "500",
        ["spec.routing.batchSize", "must be of type integer"],
        id="string-for-integer",
    ),
    pytest.param(
        "spec.retention.keepNewest",
        True,
        ["spec.retention.keepNewest", "must be of type integer"],
        id="boolean-for-integer",
    ),
    pytest.param(
        "spec.safety.maxArchivedPercent",
        "10",
        ["spec.safety.maxArchivedPercent", "must be of type number"],
        id="string-for-number",
    ),
    pytest.param(
        "spec.safety.maxArchivedPerRun",
        -1,
        ["spec.safety.maxArchivedPerRun", "greater than or equal to 0"],
        id="negative-count",
    ),
    pytest.param(
        "spec.safety.maxArchivedPercent",
        100.5,
        ["spec.safety.maxArchivedPercent", "less than or equal to 100"],
        id="percent-over-100",
    ),
    pytest.param(
        "spec.routing.batchSize",
        5001,
        ["spec.routing.batchSize", "less than or equal to 5000"],
        id="batch-size-over-limit",
    ),
    pytest.param(
        "spec.retention.minAge",
        "7 days",
        ["spec.retention.minAge", "should match"],
        id="bad-duration",
    ),
    pytest.param(
        "spec.retention.minAge",
        "3650d1ms",
        ["spec.retention.minAge", "must be at most 3650d (10 years)"],
        id="duration-over-ten-years",
    ),
    pytest.param(
        "spec.routing.batchDeadline",
        "0s",
        ["spec.routing.batchDeadline", "must be longer than 0s"],
        id="zero-batch-deadline",
    ),
    pytest.param(
        "spec.database.builds",
        {"table": "builds; DROP TABLE builds"},
        ["spec.database.builds.table", "should match"],
        id="bad-identifier",
    ),
    pytest.param(
        "spec.database.projects",
        {"id": "x" * 64},
        ["spec.database.projects.id", "Too long"],
        id="identifier-too-long",
    ),
    pytest.param(
        "spec.database",
        {"url": "sqlite://", "urlSecretRef": {"name": "builds-db", "key": "url"}},
        ["spec.database", "set exactly one of spec.database.url or spec.database.urlSecretRef"],
        id="both-url-and-url-secret-ref",
    ),
    pytest.param(
        "spec.database",
        {},
        ["spec.database", "set exactly one of spec.database.url or spec.database.urlSecretRef"],
        id="neither-url-nor-url-secret-ref",
    ),
    pytest.param(
        "spec.database.urlSecretRef",
        {"name": "Bad_Name", "key": "url"},
        ["spec.database.urlSecretRef.name", "should match"],
        id="bad-secret-name",
    ),
    pytest.param(
        "spec.routing",
        {"batchSize": 100},
        ["spec.routing", "set exactly one of spec.routing.http or spec.routing.sql"],
        id="neither-http-nor-sql",
    ),
    pytest.param(
        "spec.routing.sql",
        {},
        ["spec.routing", "set exactly one of spec.routing.http or spec.routing.sql"],
        id="both-http-and-sql",
    ),
    pytest.param(
        "spec.routing",
        {"sql": {"url": "sqlite://", "urlSecretRef": {"name": "routes-db", "key": "url"}}},
        ["spec.routing.sql", "spec.routing.sql.url or spec.routing.sql.urlSecretRef"],
        id="sql-both-url-and-url-secret-ref",
    ),
    pytest.param(
        "spec.routing.http.url",
        "ftp://routing.internal/",
        ["spec.routing.http.url", "should match"],
        id="non-http-url",
    ),
    pytest.param(
        "spec.execution",
        {"batchSize": 10, "canaryBatchSize": 20},
        [
            "spec.execution.canaryBatchSize",
            "spec.execution.canaryBatchSize must not be larger than spec.execution.batchSize",
        ],
        id="canary-larger-than-batch",
    ),
    pytest.param(
        "spec.execution",
        {"canaryBatchSize": 251},
        ["spec.execution.canaryBatchSize", "must not be larger than spec.execution.batchSize"],
        id="canary-larger-than-default-batch",
    ),
    pytest.param(
        "spec.mode",
        "Delete",
        ["spec.mode", 'Unsupported value: "Delete"', '"Plan", "Apply"'],
        id="unknown-mode",
    ),
    pytest.param(
        "spec.approval",
        {"mode": "Yolo"},
        ["spec.approval.mode", 'Unsupported value: "Yolo"'],
        id="unknown-approval-mode",
    ),
    pytest.param(
        "spec.approval",
        {"approvedPlanId": "latest"},
        ["spec.approval.approvedPlanId", "should match '^p-[0-9a-f]{16}$'"],
        id="bad-plan-id",
    ),
    pytest.param(
        "spec.approval",
        {"approvedPlanId": "p-0123456789ABCDEF"},
        ["spec.approval.approvedPlanId", "should match"],
        id="upper-case-plan-id",
    ),
    pytest.param(
        "spec.schedule",
        {"cron": "0 3 * *"},
        ["spec.schedule.cron", "should match"],
        id="cron-with-four-fields",
    ),
    pytest.param(
        "spec.schedule",
        {"timeZone": "UTC"},
        ["spec.schedule.cron", "Required value"],
        id="schedule-without-cron",
    ),
    pytest.param(
        "spec.notifications",
        {"webhook": {"urlSecretRef": {"name": "hook", "key": "url"}, "events": []}},
        ["spec.notifications.webhook.events", "at least 1 items"],
        id="webhook-events-none",
    ),
    pytest.param(
        "spec.notifications",
        {"webhook": {"urlSecretRef": {"name": "hook", "key": "url"}, "events": ["Exploded"]}},
        ["spec.notifications.webhook.events[0]", 'Unsupported value: "Exploded"'],
        id="webhook-events-unknown-outcome",
    ),
    pytest.param(
        "spec.database",
        _ABSENT,
        ["spec.database", "Required value"],
        id="missing-database",
    ),
    pytest.param("spec", _ABSENT, ["spec", "Required value"], id="missing-spec"),
]


@pytest.mark.parametrize(("path", "value", "expected"), REFUSED)
def test_invalid_resource_is_refused_by_the_api_server_naming_the_field(
    plane: ControlPlane, namespace: str, path: str, value: Any, expected: list[str]
) -> None:
    document = _with(path, value)
    with pytest.raises(SpecError):
        parse_cleanup(document)

    # --validate=false: kubectl checks nothing itself, so the refusal is the server's.
    result = create(plane, namespace, document, "--validate=false")

    assert result.returncode != 0
    assert result.stderr.startswith('The DeploymentCleanup "bad" is invalid:'), result.stderr
    for fragment in expected:
        assert fragment in result.stderr
    missing = plane.kubectl("get", CRD_NAME, "bad", "-n", namespace, check=False)
    assert "NotFound" in missing.stderr


def test_unknown_fields_are_refused_with_strict_field_validation(
    plane: ControlPlane, namespace: str
) -> None:
    document = cleanup("typo", VALID_SPEC)
    document["spec"]["bogus"] = 1
    document["spec"]["routing"]["http"]["tokenHedaer"] = "X-Api-Key"
    unknown = ['unknown field "spec.bogus"', 'unknown field "spec.routing.http.tokenHedaer"']

    strict = create(plane, namespace, document, "--validate=strict")
    by_default = create(plane, namespace, document)
    raw = plane.kubectl(
        "create",
        "--raw",
        f"/apis/deployment-cleanup.dev/v1alpha1/namespaces/{namespace}/deploymentcleanups"
        "?fieldValidation=Strict",
        "-f",
        "-",
        input=json.dumps(document),
        check=False,
    )

    for refused in (strict, by_default, raw):
        assert refused.returncode != 0
        assert "strict decoding error" in refused.stderr
        for fragment in unknown:
            assert fragment in refused.stderr
    assert "NotFound" in plane.kubectl("get", CRD_NAME, "typo", "-n", namespace, check=False).stderr

    # Without strict validation the unknown fields are pruned, silently.
    create(plane, namespace, document, "--validate=false").check_returncode()
    spec = stored(plane, namespace, "typo")["spec"]
    assert "bogus" not in spec
    assert "tokenHedaer" not in spec["routing"]["http"]


def _normalized(text: str) -> str:
    return " ".join(text.split())


def _schema_at(path: str) -> dict[str, Any]:
    node = CRD_SCHEMA
    for part in path.split("."):
        node = node["properties"][part]
    return node


@pytest.mark.parametrize(
    "path", ["spec.safety", "spec.routing.http", "spec.routing.retries", "spec.execution"]
)
def test_kubectl_explain_prints_the_field_descriptions(plane: ControlPlane, path: str) -> None:
    explained = plane.kubectl("explain", f"deploymentcleanup.{path}").stdout
    text = _normalized(explained)

    schema = _schema_at(path)
    assert _normalized(schema["description"]) in text
    for name, child in schema["properties"].items():
        assert re.search(rf"^\s+{name}\s+<", explained, re.MULTILINE), name
        assert _normalized(child["description"]) in text, name


def _without_nulls(value: Any) -> Any:
    """What a JSON merge patch stores of ``value``: the API server's implementation drops every
    null, also in objects inside lists (RFC 7386 would keep those)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _patch_status(
    plane: ControlPlane, namespace: str, name: str, status: Mapping[str, Any]
) -> subprocess.CompletedProcess[str]:
    return plane.kubectl(
        "patch",
        CRD_NAME,
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
        check=False,
    )


def test_status_subresource_keeps_everything_the_operator_writes(
    plane: ControlPlane, namespace: str
) -> None:
    create(plane, namespace, cleanup("nightly", MINIMAL_SPEC)).check_returncode()
    before = stored(plane, namespace, "nightly")
    status = SAMPLE_STATUSES["blocked-while-applying"]
    # It exercises the nullable parts of the schema and the maps.
    assert status["plan"]["thresholds"][-1]["actual"] is None
    assert status["run"]["finishedAt"] is None
    assert status["plan"]["lookups"]["failedBatches"]
    assert status["plan"]["samples"]
    assert status["plan"]["projectIssues"]

    _patch_status(plane, namespace, "nightly", status).check_returncode()
    after = stored(plane, namespace, "nightly")

    assert after["status"] == _without_nulls(status)
    assert after["spec"] == before["spec"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"] == 1

    # An update (PUT) of the status keeps every null where the schema says nullable.
    for replacement in [status | {"lastSuccessfulRun": None}, *SAMPLE_STATUSES.values()]:
        current = stored(plane, namespace, "nightly")
        plane.kubectl(
            "replace",
            "--subresource=status",
            "-f",
            "-",
            input=json.dumps(current | {"status": replacement}),
        )
        assert stored(plane, namespace, "nightly")["status"] == replacement

    # The main resource ignores status, and the status subresource ignores spec.
    _patch_status(plane, namespace, "nightly", {"killSwitch": False}).check_returncode()
    for subresource, change in [
        ([], {"status": {"killSwitch": True}}),
        (["--subresource=status"], {"spec": {"mode": "Apply"}}),
    ]:
        plane.kubectl(
            "patch",
            CRD_NAME,
            "nightly",
            "-n",
            namespace,
            *subresource,
            "--type=merge",
            "-p",
            json.dumps(change),
        )
    unchanged = stored(plane, namespace, "nightly")
    assert unchanged["status"]["killSwitch"] is False
    assert unchanged["spec"]["mode"] == "Plan"

    # The status schema is enforced too.
    bad = _patch_status(
        plane,
        namespace,
        "nightly",
        {"conditions": [{**status["conditions"][0], "status": "Maybe"}]},
    )
    assert bad.returncode != 0
    assert "status.conditions[0].status" in bad.stderr


def test_kubectl_get_prints_the_printer_columns(plane: ControlPlane, namespace: str) -> None:
    create(plane, namespace, cleanup("nightly", MINIMAL_SPEC)).check_returncode()
    plan = sample_plan(failed_batches=0)
    assert plan.ready
    assert len(plan.candidates) > 0
    done = sample_run(RunState.SUCCEEDED, plan, archived=len(plan.candidates) - 1)
    status = build_status(
        generation=1, now=NOW, outcome="Succeeded", message="archived", plan=plan, run=done
    )
    _patch_status(plane, namespace, "nightly", status).check_returncode()

    table = plane.kubectl("get", "dcl", "-n", namespace).stdout.splitlines()
    wide = plane.kubectl("get", "dcl", "-n", namespace, "-o", "wide").stdout.splitlines()
    by_category = plane.kubectl("get", "deployment-cleanup", "-n", namespace, "-o", "name").stdout

    assert table[0].split() == ["NAME", "READY", "REASON", "MODE", "CANDIDATES", "ARCHIVED", "AGE"]
    ready = status["conditions"][0]
    assert ready["type"] == "Ready"
    assert ready["status"] == "True"
    assert table[1].split()[:-1] == [
        "nightly",
        "True",
        ready["reason"],
        "Plan",
        str(len(plan.candidates)),
        str(len(plan.candidates) - 1),
    ]
    assert re.fullmatch(r"\d+s", table[1].split()[-1])
    assert wide[0].split()[:5] == ["NAME", "READY", "REASON", "MODE", "PLAN"]
    assert wide[1].split()[4] == plan.id
    assert by_category.split() == ["deploymentcleanup.deployment-cleanup.dev/nightly"]


def test_kopf_peering_objects_keep_what_kopf_writes_to_status(
    plane: ControlPlane, namespace: str
) -> None:
    # kopf patches the peering object itself (there is no status subresource) with one record
    # per operator, keyed by its identity.
    record = {
        "deployment-cleanup@host-1/a1b2": {
            "priority": 0,
            "lifetime": 60,
            "lastseen": "2026-12-04T03:00:00.000000",
            "namespace": None,
        }
    }
    cluster_name = f"deployment-cleanup-{secrets.token_hex(4)}"
    peerings = [
        ("kopfpeerings.kopf.dev", "default", ["-n", namespace]),
        ("clusterkopfpeerings.kopf.dev", cluster_name, []),
    ]
    try:
        for resource, name, where in peerings:
            kind = "KopfPeering" if resource.startswith("kopf") else "ClusterKopfPeering"
            body = {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": {"name": name}}
            plane.kubectl("create", *where, "-f", "-", input=json.dumps(body))
            plane.kubectl(
                "patch",
                resource,
                name,
                *where,
                "--type=merge",
                "-p",
                json.dumps({"status": record}),
            )
            got = json.loads(plane.kubectl("get", resource, name, *where, "-o", "json").stdout)
            assert got["status"] == _without_nulls(record), resource
    finally:
        plane.kubectl("delete", "clusterkopfpeerings.kopf.dev", cluster_name, "--ignore-not-found")
