"""The CRD's spec schema mirrors the pydantic model in spec.py, field by field. No cluster needed.

spec.py is the source of truth. These tests walk ``CleanupSpec.model_fields`` (aliases, nested
models, ``Annotated`` constraints) alongside the CRD's openAPIV3Schema and fail on any drift:
a field on one side only, another type, default, bound or enum, a required flag, a missing
description, or a string that the CRD's pattern judges differently from the validators. The
status schema is checked against what build_status and the operator write. tests/e2e/test_crd.py
then shows that the real API server enforces all of it.

Two tests pin what spec.py once got wrong (trailing newlines, Unicode digits, crashing on odd
time zones and huge durations).
"""

from __future__ import annotations

import copy
import math
import re
import types
import zoneinfo
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import annotated_types
import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

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
from deployment_cleanup.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    CleanupSpec,
    RetentionSpec,
    SafetySpec,
    SpecError,
    format_duration,
    parse_cleanup,
)
from deployment_cleanup.status import build_status

CRD_PATH = Path(__file__).parents[2] / "crds" / "deploymentcleanups.deployment-cleanup.dev.yaml"
CRD: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
(VERSION,) = CRD["spec"]["versions"]
ROOT_SCHEMA: dict[str, Any] = VERSION["schema"]["openAPIV3Schema"]
SPEC_SCHEMA: dict[str, Any] = ROOT_SCHEMA["properties"]["spec"]
STATUS_SCHEMA: dict[str, Any] = ROOT_SCHEMA["properties"]["status"]

IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
SECRET_KEY = r"^[-._a-zA-Z0-9]{1,253}$"
HTTP_HEADER = r"^[A-Za-z0-9-]{1,64}$"
PLAN_ID = r"^p-[0-9a-f]{16}$"
DURATION = r"^([0-9]+(ms|s|m|h|d))+$"
HTTP_URL = r"^https?://[^\s/?#]+[^\s]*$"
CRON = r"^\s*\S+(\s+\S+){4}\s*$"
TIME_ZONE = r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$"

# A string field without a max_length in spec.py still gets a maxLength in the CRD (CEL cost
# estimates need one). For these patterns it is what the pattern allows anyway, and the probes
# below check the boundary against the validators:
LENGTH_IMPLIED_BY_PATTERN = {
    IDENTIFIER: 63,
    DNS_SUBDOMAIN: 253,
    SECRET_KEY: 253,
    HTTP_HEADER: 64,
    PLAN_ID: 18,
}
# For these, spec.py has no limit and the CRD sets one: longer values are refused by the API
# server only. Each is far beyond any sensible value.
LENGTH_ONLY_IN_THE_CRD = {DURATION: 64, HTTP_URL: 4096, CRON: 128, TIME_ZONE: 64}

# What the API server cannot check: spec.py parses the cron expression (CronSim) and loads the
# time zone (zoneinfo). The CRD only checks their shape; the operator refuses the rest.
CHECKED_ONLY_BY_THE_OPERATOR = {"spec.schedule.cron", "spec.schedule.timeZone"}

_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_TEN_YEARS_MS = 3650 * _UNIT_MS["d"]


def _duration_ms(text: str) -> int:
    return sum(int(n) * _UNIT_MS[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h|d)", text))


# The CEL rules on string fields, emulated here so that the probes can judge them; the e2e
# tests show the API server agrees on the boundaries. Keys are the rules with whitespace
# collapsed.
CEL_STRING_RULES: dict[str, Callable[[str], bool]] = {
    "self.findAll('[0-9]+(ms|s|m|h|d)').map(p, p.endsWith('ms') ? double(p.substring(0, p.size()"
    " - 2)) : double(p.substring(0, p.size() - 1)) * (p.endsWith('d') ? 86400000.0 :"
    " p.endsWith('h') ? 3600000.0 : p.endsWith('m') ? 60000.0 : 1000.0) ).sum() <= 315360000000.0": (
        lambda value: _duration_ms(value) <= _TEN_YEARS_MS
    ),
    "self.matches('[1-9]')": lambda value: re.search("[1-9]", value) is not None,
}

# Valid documents that set every field of the spec between them (each value differs from its
# default), so that every string field can be probed in place, inside a whole valid spec.
FULL_DOCUMENTS: list[dict[str, Any]] = [
    {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": "full-http", "namespace": "platform"},
        "spec": {
            "mode": "Apply",
            "database": {
                "url": "postgresql://cleanup@db.internal:5432/builds",
                "schema": "hosting",
                "projects": {"table": "apps", "id": "app_id", "activeBuildId": "live_build"},
                "builds": {
                    "table": "deploys",
                    "id": "deploy_id",
                    "projectId": "app_id",
                    "status": "state",
                    "createdAt": "inserted_at",
                },
                "archivedStatus": "retired",
                "stateTablePrefix": "dc_",
            },
            "routing": {
                "http": {
                    "url": "https://routing.platform.internal/v1/routes/lookup",
                    "tokenSecretRef": {"name": "routing-api", "key": "token"},
                    "tokenHeader": "X-Api-Key",
                    "tokenPrefix": "",
                },
                "batchSize": 250,
                "concurrency": 8,
                "connectTimeout": "2s",
                "readTimeout": "20s",
                "batchDeadline": "1m30s",
                "retries": {"maxAttempts": 5, "initialBackoff": "250ms", "maxBackoff": "20s"},
                "stopAfterFailedBatches": 2,
            },
            "retention": {"keepNewest": 5, "minAge": "14d"},
            "safety": {
                "maxArchivedPerRun": 2000,
                "maxArchivedPercent": 12.5,
                "maxArchivedPerProject": 40,
                "referenceSet": {"maxDropPercent": 5, "minCount": 500},
            },
            "execution": {"batchSize": 50, "canaryBatchSize": 5, "pauseBetweenBatches": "2s"},
            "approval": {"mode": "Automatic", "approvedPlanId": "p-0123456789abcdef"},
            "schedule": {
                "cron": "30 2 * * 1-5",
                "timeZone": "Europe/Berlin",
                "suspend": True,
                "startingDeadline": "30m",
            },
            "notifications": {
                "webhook": {
                    "urlSecretRef": {"name": "slack-webhook", "key": "url"},
                    "events": ["Blocked", "Failed"],
                }
            },
        },
    },
    {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": "full-sql-url", "namespace": "platform"},
        "spec": {
            "database": {"urlSecretRef": {"name": "builds-db", "key": "url"}},
            "routing": {
                "sql": {
                    "url": "postgresql://cleanup@routes.internal/routing",
                    "schema": "edge",
                    "table": "routing_rules",
                    "buildId": "target_build",
                    "hostname": "host",
                }
            },
        },
    },
    {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": "full-sql-secret", "namespace": "platform"},
        "spec": {
            "database": {"url": "sqlite:///builds.sqlite"},
            "routing": {"sql": {"urlSecretRef": {"name": "routes-db", "key": "url"}}},
        },
    },
]

# Strings tried on every string field: pydantic (the whole document, through parse_cleanup)
# and the CRD (enum, length, pattern, CEL) must agree on each.
PROBES = [
    "",
    " ",
    "a",
    "builds",
    "_private",
    "Builds_2",
    "1builds",
    "builds; DROP TABLE builds",
    'status"--',
    "a-b",
    "a.b",
    "a b",
    "-a",
    "a-",
    "Bad_Name",
    "builds-db",
    "routing.api",
    "x" * 63,
    "x" * 64,
    "x" * 65,
    "a" * 253,
    "a" * 254,
    "A" * 64,
    "A" * 65,
    "a" * 32,
    "a" * 33,
    "Authorization",
    "X-Api-Key",
    "Bearer ",
    "p-0123456789abcdef",
    "p-0123456789ABCDEF",
    "p-0123456789abcde",
    "p-0123456789abcdef0",
    "latest",
    "http://127.0.0.1:9/lookup",
    "https://routing.internal/v1/routes/lookup?x=1",
    "ftp://routing.internal/",
    "http://",
    "http:// x",
    "https:///path",
    "sqlite:///builds.sqlite",
    "postgresql://u:p@h/db",
    "0s",
    "500ms",
    "30s",
    "15m",
    "1h30m",
    "7d",
    "00m0ms",
    "0000000000001s",
    "3649d24h",
    "3649d23h59m59s999ms",
    "3650d",
    "3650d1ms",
    "3651d",
    "99999999999999999999999d",
    "7 days",
    "7",
    "1.5h",
    "-1s",
    "3w",
    "1h 30m",
    "0 3 * * *",
    "30 2 * * 1-5",
    "*/15 * * * MON-FRI",
    " 0 3 * * * ",
    "0 3 * *",
    "0 3 * * * *",
    "0 25 * * *",
    "UTC",
    "Europe/Berlin",
    "America/Argentina/Buenos_Aires",
    "Etc/GMT+5",
    "Nowhere/City",
    "../etc/passwd",
    "/etc/localtime",
    "Plan",
    "Apply",
    "plan",
    "Delete",
    "Manual",
    "Automatic",
    "a" * 4096,
    "a" * 4097,
    "http://h/" + "a" * 4087,
    "http://h/" + "a" * 4088,
]

NO_DEFAULT = object()


@dataclass(frozen=True)
class FieldType:
    """A field's annotation with Optional and Annotated peeled off."""

    base: Any
    optional: bool
    constraints: tuple[Any, ...]


@dataclass(frozen=True)
class Pair:
    """One pydantic field and its CRD property."""

    path: str
    field: FieldInfo
    schema: Mapping[str, Any]

    @property
    def type(self) -> FieldType:
        return field_type(self.field)


@dataclass
class Walk:
    pairs: list[Pair] = field(default_factory=list)
    missing_in_crd: list[str] = field(default_factory=list)
    missing_in_model: list[str] = field(default_factory=list)
    required_mismatch: list[str] = field(default_factory=list)


def _peel(annotation: Any) -> tuple[Any, bool, list[Any]]:
    optional = False
    constraints: list[Any] = []
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            for item in annotation.__metadata__:
                constraints.extend(item.metadata if isinstance(item, FieldInfo) else [item])
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            assert len(args) == 1, f"unions other than Optional are not mapped: {annotation}"
            optional = True
            annotation = args[0]
        else:
            return annotation, optional, constraints


def field_type(info: FieldInfo) -> FieldType:
    base, optional, constraints = _peel(info.annotation)
    return FieldType(base, optional, tuple(info.metadata) + tuple(constraints))


def _is_model(base: Any) -> bool:
    return get_origin(base) is None and isinstance(base, type) and issubclass(base, BaseModel)


def _is_enum(base: Any) -> bool:
    return get_origin(base) is None and isinstance(base, type) and issubclass(base, Enum)


def _model(info: FieldInfo) -> type[BaseModel] | None:
    base = field_type(info).base
    return base if _is_model(base) else None


def walk(model: type[BaseModel], schema: Mapping[str, Any], path: str = "spec") -> Walk:
    """Pair every field of ``model`` (recursively) with its CRD property, by alias."""
    out = Walk()
    _walk(model, schema, path, out)
    return out


def _walk(model: type[BaseModel], schema: Mapping[str, Any], path: str, out: Walk) -> None:
    properties: Mapping[str, Any] = schema.get("properties", {})
    aliases = set()
    for name, info in model.model_fields.items():
        alias = info.alias or name
        aliases.add(alias)
        where = f"{path}.{alias}"
        if alias not in properties:
            out.missing_in_crd.append(where)
            continue
        out.pairs.append(Pair(where, info, properties[alias]))
        if info.is_required() != (alias in schema.get("required", [])):
            out.required_mismatch.append(where)
        nested = _model(info)
        if nested is not None:
            _walk(nested, properties[alias], where, out)
    out.missing_in_model.extend(f"{path}.{name}" for name in properties if name not in aliases)


SPEC_WALK = walk(CleanupSpec, SPEC_SCHEMA)
PAIRS = {pair.path: pair for pair in SPEC_WALK.pairs}
STRING_PATHS = [p for p, pair in PAIRS.items() if pair.schema.get("type") == "string"]


def _expected_crd_type(pair: Pair) -> str:
    base = pair.type.base
    if _is_model(base):
        return "object"
    if get_origin(base) is tuple:
        return "array"
    if base is bool:
        return "boolean"
    if base is int:
        return "integer"
    if base is float:
        return "number"
    if base in (str, timedelta) or _is_enum(base):
        return "string"
    raise AssertionError(f"{pair.path}: no CRD type known for {base!r}")


def type_problems(pair: Pair) -> list[str]:
    expected = _expected_crd_type(pair)
    problems = []
    if pair.schema.get("type") != expected:
        problems.append(f"{pair.path}: CRD type {pair.schema.get('type')}, spec.py {expected}")
    if pair.type.base is timedelta and pair.schema.get("pattern") != DURATION:
        problems.append(f"{pair.path}: a duration needs pattern {DURATION}")
    return problems


def _crd_value(value: Any) -> Any:
    """How a pydantic default is spelled in the CRD."""
    if isinstance(value, BaseModel):
        # `default: {}` lets the API server fill in the nested defaults, which are compared
        # field by field; that only works when the default is the all-defaults instance.
        fresh = type(value)()
        return {} if value == fresh else value.model_dump(by_alias=True, mode="json")
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_crd_value(v) for v in value]
    return value


def _expected_default(info: FieldInfo) -> Any:
    default = info.get_default(call_default_factory=True, validated_data={})
    if default is PydanticUndefined or default is None:
        return NO_DEFAULT
    return _crd_value(default)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    return type(a) is type(b) or (isinstance(a, int | float) and isinstance(b, int | float))


def default_problems(pair: Pair) -> list[str]:
    expected = _expected_default(pair.field)
    actual = pair.schema.get("default", NO_DEFAULT)
    if expected is NO_DEFAULT or actual is NO_DEFAULT:
        if expected is actual:
            return []
        shown = ["none" if v is NO_DEFAULT else repr(v) for v in (actual, expected)]
        return [f"{pair.path}: CRD default {shown[0]}, spec.py default {shown[1]}"]
    if not (_same_value(actual, expected) and actual == expected):
        return [f"{pair.path}: CRD default {actual!r}, spec.py default {expected!r}"]
    return []


def _bounds(constraints: tuple[Any, ...]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in constraints:
        if isinstance(item, annotated_types.Ge):
            found["minimum"] = item.ge
        elif isinstance(item, annotated_types.Gt):
            found["minimum"], found["exclusiveMinimum"] = item.gt, True
        elif isinstance(item, annotated_types.Le):
            found["maximum"] = item.le
        elif isinstance(item, annotated_types.Lt):
            found["maximum"], found["exclusiveMaximum"] = item.lt, True
        elif isinstance(item, annotated_types.MinLen):
            found["minLength"] = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            found["maxLength"] = item.max_length
    return found


BOUND_KEYWORDS = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
)


def bound_problems(pair: Pair) -> list[str]:
    expected = _bounds(pair.type.constraints)
    if pair.schema.get("type") == "array":
        # min_length/max_length of a tuple are minItems/maxItems.
        renamed = {"minLength": "minItems", "maxLength": "maxItems"}
        expected = {renamed.get(k, k): v for k, v in expected.items()}
    if (
        pair.schema.get("type") == "string"
        and "maxLength" not in expected
        and "enum" not in pair.schema
    ):
        pattern = pair.schema.get("pattern")
        limits = LENGTH_IMPLIED_BY_PATTERN | LENGTH_ONLY_IN_THE_CRD
        if pattern not in limits:
            return [f"{pair.path}: no maxLength in spec.py and no known limit for its pattern"]
        expected["maxLength"] = limits[pattern]
    actual = {k: pair.schema[k] for k in BOUND_KEYWORDS if k in pair.schema}
    if actual != expected:
        return [f"{pair.path}: CRD bounds {actual}, spec.py bounds {expected}"]
    return []


def _enum_values(base: Any) -> list[str] | None:
    return [member.value for member in base] if _is_enum(base) else None


def enum_problems(pair: Pair) -> list[str]:
    base = pair.type.base
    schema = pair.schema
    if get_origin(base) is tuple:
        item_base, _, _ = _peel(get_args(base)[0])
        expected, actual = _enum_values(item_base), schema.get("items", {}).get("enum")
    else:
        expected, actual = _enum_values(base), schema.get("enum")
    if expected != actual:
        return [f"{pair.path}: CRD enum {actual}, spec.py enum {expected}"]
    return []


def _schemas(schema: Mapping[str, Any], path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every property schema below ``schema`` (array items and map values included)."""
    for name, child in schema.get("properties", {}).items():
        yield f"{path}.{name}", child
        yield from _schemas(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _schemas(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _schemas(schema["additionalProperties"], f"{path}{{}}")


def _cel_accepts(schema: Mapping[str, Any], value: str, path: str) -> bool:
    accepted = True
    for rule in schema.get("x-kubernetes-validations", []):
        text = " ".join(rule["rule"].split())
        assert text in CEL_STRING_RULES, f"{path}: emulate CEL rule {text!r} in CEL_STRING_RULES"
        accepted = accepted and CEL_STRING_RULES[text](value)
    return accepted


def crd_accepts(schema: Mapping[str, Any], value: str, path: str) -> bool:
    """What the API server says about ``value``, emulated (its patterns are anchored RE2)."""
    if "enum" in schema:
        return value in schema["enum"]
    if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf):
        return False
    pattern = schema.get("pattern")
    # re.fullmatch, unlike re.match with $, does not let $ match before a final newline: the
    # same as Go's regexp, which the API server uses.
    if pattern is not None and re.fullmatch(pattern, value) is None:
        return False
    return _cel_accepts(schema, value, path)


def _document_with(path: str, value: Any) -> dict[str, Any]:
    """A copy of the first full document that sets ``path``, with ``value`` there instead."""
    parts = path.split(".")
    for document in FULL_DOCUMENTS:
        node: Any = document
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and parts[-1] in node:
            changed = copy.deepcopy(document)
            target = changed
            for part in parts[:-1]:
                target = target[part]
            target[parts[-1]] = value
            return changed
    raise AssertionError(f"no document in FULL_DOCUMENTS sets {path}")


def spec_accepts(path: str, value: Any) -> bool:
    try:
        parse_cleanup(_document_with(path, value))
    except SpecError:
        return False
    except (OSError, OverflowError):
        # Refused too, if not the way it should be: see test_spec_py_reports_every_bad_value.
        return False
    return True


def test_names_scope_and_version_are_the_ones_spec_py_uses() -> None:
    assert CRD["apiVersion"] == "apiextensions.k8s.io/v1"
    assert CRD["kind"] == "CustomResourceDefinition"
    assert CRD["metadata"]["name"] == f"deploymentcleanups.{API_GROUP}"
    assert CRD["spec"]["group"] == API_GROUP
    assert CRD["spec"]["scope"] == "Namespaced"
    assert CRD["spec"]["names"] == {
        "kind": KIND,
        "listKind": f"{KIND}List",
        "plural": "deploymentcleanups",
        "singular": "deploymentcleanup",
        "shortNames": ["dcl"],
        "categories": ["deployment-cleanup"],
    }
    assert f"{API_GROUP}/{VERSION['name']}" == API_VERSION
    assert VERSION["served"] is True
    assert VERSION["storage"] is True
    assert VERSION["subresources"] == {"status": {}}
    assert ROOT_SCHEMA["required"] == ["spec"]


def test_every_spec_field_is_in_the_crd_and_every_crd_property_in_spec_py() -> None:
    assert SPEC_WALK.missing_in_crd == []
    assert SPEC_WALK.missing_in_model == []
    assert len(SPEC_WALK.pairs) > 60


def test_required_fields_agree() -> None:
    assert SPEC_WALK.required_mismatch == []


def test_types_agree() -> None:
    assert [p for pair in SPEC_WALK.pairs for p in type_problems(pair)] == []


def test_defaults_agree_with_durations_in_their_string_form() -> None:
    assert [p for pair in SPEC_WALK.pairs for p in default_problems(pair)] == []
    assert PAIRS["spec.retention.minAge"].schema["default"] == "7d"
    assert PAIRS["spec.routing.retries.initialBackoff"].schema["default"] == "500ms"


def test_numeric_and_length_bounds_agree() -> None:
    assert [p for pair in SPEC_WALK.pairs for p in bound_problems(pair)] == []


def test_enums_agree() -> None:
    assert [p for pair in SPEC_WALK.pairs for p in enum_problems(pair)] == []
    assert PAIRS["spec.mode"].schema["enum"] == ["Plan", "Apply"]


def test_every_property_has_a_description() -> None:
    undescribed = [
        path
        for path, schema in _schemas(ROOT_SCHEMA, "")
        # The API server allows nothing but type on metadata, not even a description.
        if path != ".metadata" and not schema.get("description")
    ]
    assert undescribed == []


def test_every_spec_string_has_a_length_limit_and_every_pattern_is_anchored() -> None:
    for path, schema in _schemas(SPEC_SCHEMA, "spec"):
        if schema.get("type") == "string":
            assert "maxLength" in schema or "enum" in schema, path
        if "pattern" in schema:
            assert schema["pattern"].startswith("^"), path
            assert schema["pattern"].endswith("$"), path


def test_cross_field_rules_are_cel_rules_naming_their_fields() -> None:
    def rules(path: str) -> list[tuple[str, str]]:
        schema = PAIRS[path].schema
        return [(r["rule"], r["message"]) for r in schema.get("x-kubernetes-validations", [])]

    assert rules("spec.database") == [
        (
            "has(self.url) != has(self.urlSecretRef)",
            "set exactly one of spec.database.url or spec.database.urlSecretRef",
        )
    ]
    assert rules("spec.routing") == [
        (
            "has(self.http) != has(self.sql)",
            "set exactly one of spec.routing.http or spec.routing.sql",
        )
    ]
    ((sql_rule, sql_message),) = rules("spec.routing.sql")
    assert sql_rule == "!(has(self.url) && has(self.urlSecretRef))"
    assert "spec.routing.sql.url or spec.routing.sql.urlSecretRef" in sql_message
    ((canary_rule, canary_message),) = rules("spec.execution")
    assert canary_rule.endswith("self.canaryBatchSize <= self.batchSize")
    assert "spec.execution.canaryBatchSize" in canary_message
    assert "spec.execution.batchSize" in canary_message
    deadline_rules = rules("spec.routing.batchDeadline")
    assert ("self.matches('[1-9]')", "spec.routing.batchDeadline must be longer than 0s") in (
        deadline_rules
    )


def test_every_duration_is_limited_to_ten_years_like_parse_duration() -> None:
    durations = [pair for pair in SPEC_WALK.pairs if pair.type.base is timedelta]
    assert len(durations) == 8
    for pair in durations:
        messages = [r["message"] for r in pair.schema.get("x-kubernetes-validations", [])]
        assert "must be at most 3650d (10 years)" in messages, pair.path


def test_full_documents_are_valid_and_set_every_field() -> None:
    for document in FULL_DOCUMENTS:
        parse_cleanup(document)
    set_paths = {
        path
        for document in FULL_DOCUMENTS
        for path, _ in _paths_in_document(document["spec"], "spec")
    }
    assert set(PAIRS) <= set_paths


def _paths_in_document(node: Mapping[str, Any], path: str) -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        yield f"{path}.{key}", value
        if isinstance(value, dict):
            yield from _paths_in_document(value, f"{path}.{key}")


@pytest.mark.parametrize("path", STRING_PATHS)
def test_the_crd_judges_strings_like_the_validators(path: str) -> None:
    schema = PAIRS[path].schema
    accepted_by_spec_only = []
    accepted_by_crd_only = []
    crd_only_limit = LENGTH_ONLY_IN_THE_CRD.get(schema.get("pattern", ""), math.inf)
    for probe in PROBES:
        by_spec = spec_accepts(path, probe)
        by_crd = crd_accepts(schema, probe, path)
        if by_spec and not by_crd and len(probe) <= crd_only_limit:
            accepted_by_spec_only.append(probe[:40])
        if by_crd and not by_spec and path not in CHECKED_ONLY_BY_THE_OPERATOR:
            accepted_by_crd_only.append(probe[:40])
    # A valid spec must never be refused by the API server, and what the API server accepts
    # should not fail only later in the operator.
    assert accepted_by_spec_only == []
    assert accepted_by_crd_only == []


def test_every_iana_time_zone_is_accepted_by_the_crd() -> None:
    schema = PAIRS["spec.schedule.timeZone"].schema
    refused = [
        zone
        for zone in zoneinfo.available_timezones()
        if not crd_accepts(schema, zone, "spec.schedule.timeZone")
    ]
    assert refused == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param("spec.database.builds.table", "builds\n", id="identifier-newline"),
        pytest.param("spec.approval.approvedPlanId", "p-0123456789abcdef\n", id="plan-id-newline"),
        pytest.param("spec.database.urlSecretRef.name", "builds-db\n", id="secret-name-newline"),
        pytest.param("spec.routing.http.url", "https://routing.internal/\n", id="url-newline"),
        pytest.param("spec.routing.http.tokenHeader", "X-Api-Key\n", id="header-newline"),
        pytest.param("spec.retention.minAge", " 7d ", id="duration-spaces"),
        pytest.param("spec.retention.minAge", "\u0667d", id="duration-arabic-indic-digit"),
    ],
)
def test_spec_py_refuses_what_the_api_server_refuses(path: str, value: str) -> None:
    # Python's `$` also matches before a trailing newline and `\d` takes any Unicode digit;
    # Go's regexp (the API server) does neither, so spec.py must use fullmatch and [0-9].
    assert not crd_accepts(PAIRS[path].schema, value, path)
    with pytest.raises(SpecError):
        parse_cleanup(_document_with(path, value))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param("spec.schedule.timeZone", "Europe", id="time-zone-is-a-folder"),
        pytest.param("spec.schedule.timeZone", "a" * 300, id="time-zone-name-too-long"),
        pytest.param("spec.retention.minAge", "9" * 30 + "d", id="duration-overflows"),
    ],
)
def test_spec_py_reports_every_bad_value(path: str, value: str) -> None:
    # zoneinfo raises IsADirectoryError for "Europe" and OSError for an overlong name, and
    # timedelta overflows on a huge duration: each must become a SpecError naming the field.
    with pytest.raises(SpecError, match=path):
        parse_cleanup(_document_with(path, value))


def test_printer_columns() -> None:
    columns = {c["name"]: c for c in VERSION["additionalPrinterColumns"]}
    assert list(columns) == ["Ready", "Reason", "Mode", "Plan", "Candidates", "Archived", "Age"]
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Reason"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].reason'
    assert columns["Plan"]["priority"] == 1
    assert columns["Candidates"]["type"] == columns["Archived"]["type"] == "integer"
    assert columns["Age"] == {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
    }
    for column in columns.values():
        if column["name"] != "Age":
            assert _resolve(column["jsonPath"]) is not None, column["jsonPath"]


def _resolve(json_path: str) -> Mapping[str, Any] | None:
    """The schema a printer column's JSONPath points at (a filter steps into the list items)."""
    node: Mapping[str, Any] = ROOT_SCHEMA
    for step in re.findall(r"\.(\w+)|\[\?\([^)]*\)\]", json_path):
        if not step:
            node = node["items"]
        elif step in node.get("properties", {}):
            node = node["properties"][step]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return None
    return node


def test_status_schema_keeps_what_build_status_may_write_as_null() -> None:
    status = ROOT_SCHEMA["properties"]["status"]["properties"]
    plan = status["plan"]["properties"]
    nullable = {
        "plan": status["plan"],
        "run": status["run"],
        "lastSuccessfulRun": status["lastSuccessfulRun"],
        "run.finishedAt": status["run"]["properties"]["finishedAt"],
        "thresholds[].actual": plan["thresholds"]["items"]["properties"]["actual"],
        "candidatesSample[].createdAt": plan["candidatesSample"]["items"]["properties"][
            "createdAt"
        ],
        "schedule.lastScheduleTime": status["schedule"]["properties"]["lastScheduleTime"],
        "schedule.nextScheduleTime": status["schedule"]["properties"]["nextScheduleTime"],
    }
    assert [name for name, schema in nullable.items() if schema.get("nullable") is not True] == []
    assert status["conditions"]["x-kubernetes-list-type"] == "map"
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert status["conditions"]["items"]["properties"]["status"]["enum"] == [
        "True",
        "False",
        "Unknown",
    ]
    for name in ("counts", "keepReasons", "projectIssues"):
        assert plan[name]["additionalProperties"] == {"type": "integer"}


# The status: what build_status and the operator write must fit the status schema, or the API
# server drops it (unknown fields) or refuses the whole patch (a wrong type).

NOW = datetime(2026, 12, 4, 3, 0, tzinfo=UTC)
_RETENTION = RetentionSpec(keep_newest=1, min_age=timedelta(0))
_SAFETY = SafetySpec.model_validate({"maxArchivedPercent": 100, "maxArchivedPerProject": 100})
_DATE_TIME = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})"


def sample_plan(failed_batches: int) -> Plan:
    """Four projects of four builds; project p's lookups are batch p; project 3 has no active build."""
    builder = PlanBuilder(_SAFETY, plan_settings(_RETENTION, _SAFETY, "archived", {}))
    for p in range(4):
        builds = [Build(p * 10 + i, p, "ready", NOW - timedelta(days=30 + i)) for i in range(4)]
        answered = p >= failed_batches
        answers = {b.id: RouteAnswer(b.id % 10 == 1, "http", p) for b in builds if answered}
        active = None if p == 3 else p * 10
        builder.add(classify_project(p, active, True, builds, answers, _RETENTION, NOW))
    receipts = [
        LookupReceipt(
            p,
            4,
            p >= failed_batches,
            1 if p >= failed_batches else 3,
            0.2,
            None if p >= failed_batches else "read timeout after 10s",
        )
        for p in range(4)
    ]
    return builder.finish(receipts)


def sample_run(state: RunState, plan: Plan, archived: int) -> RunRecord:
    finished = None if state is RunState.APPLYING else NOW
    kind = RunKind.PLAN if state in (RunState.PLANNED, RunState.BLOCKED) else RunKind.APPLY
    return RunRecord(
        "r-20261204T030000-ab12cd",
        "ns/nightly",
        kind,
        plan.id,
        state,
        NOW,
        finished,
        5,
        len(plan.candidates),
        archived,
        0,
        0,
        "a message",
    )


def sample_statuses() -> dict[str, dict[str, Any]]:
    """Status objects as the operator writes them: build_status plus its own fields."""
    blocked = sample_plan(failed_batches=2)
    applying = sample_run(RunState.APPLYING, blocked, archived=1)
    ready = sample_plan(failed_batches=0)
    applied = sample_run(RunState.SUCCEEDED, ready, archived=len(ready.candidates))
    last_success = {
        "id": "r-20261203T030000-000000",
        "planId": "p-0123456789abcdef",
        "finishedAt": "2026-12-03T03:00:00Z",
        "referenceCount": 5,
    }
    # The fields controller.py writes next to build_status's (see _report, _failed, _restore).
    operator_fields: dict[str, Any] = {
        "schedule": {"lastScheduleTime": "2026-12-04T02:30:00Z", "nextScheduleTime": None},
        "lastRestore": {
            "runId": "r-20261201T030000-ffffff",
            "restored": 3,
            "conflicts": 1,
            "at": "2026-12-02T10:00:00Z",
        },
        "killSwitch": False,
        "failure": {
            "generation": 1,
            "count": 2,
            "message": "OperationalError: could not connect to server",
            "nextAttemptAt": "2026-12-04T03:10:00Z",
        },
    }
    return {
        "blocked-while-applying": build_status(
            generation=1,
            now=NOW,
            outcome="Blocked",
            message=blocked.message,
            plan=blocked,
            run=applying,
            history=[applying, applied],
            previous={"lastSuccessfulRun": last_success},
        )
        | operator_fields,
        "applied": build_status(
            generation=2, now=NOW, outcome="Succeeded", message="ok", plan=ready, run=applied
        )
        | operator_fields
        | {"failure": None, "schedule": None},
        "failed-without-plan": build_status(
            generation=3, now=NOW, outcome="Failed", message="x", plan=None, run=None
        )
        | {
            "lastRestore": {
                "runId": "r-1",
                "error": "no such run",
                "at": "2026-12-04T03:00:00Z",
            }
        },
    }


def status_problems(value: Any, schema: Mapping[str, Any], path: str = "status") -> list[str]:
    """Where ``value`` does not fit ``schema`` the way the API server checks it."""
    if value is None:
        return [] if schema.get("nullable") is True else [f"{path}: null, but not nullable"]
    kind = str(schema.get("type"))
    checks: dict[str, Callable[[Any], bool]] = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    if not checks[kind](value):
        return [f"{path}: {value!r} is not of type {kind}"]
    problems = []
    if kind == "object":
        properties = schema.get("properties", {})
        for key, child in value.items():
            if key in properties:
                problems += status_problems(child, properties[key], f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                problems += status_problems(child, schema["additionalProperties"], f"{path}.{key}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                problems.append(f"{path}.{key}: not in the schema, the API server drops it")
        problems += [f"{path}.{k}: required" for k in schema.get("required", []) if k not in value]
    elif kind == "array":
        for i, item in enumerate(value):
            problems += status_problems(item, schema["items"], f"{path}[{i}]")
    elif kind == "string":
        if "enum" in schema and value not in schema["enum"]:
            problems.append(f"{path}: {value!r} is not one of {schema['enum']}")
        if "pattern" in schema and re.fullmatch(schema["pattern"], value) is None:
            problems.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if schema.get("format") == "date-time" and re.fullmatch(_DATE_TIME, value) is None:
            problems.append(f"{path}: {value!r} is not an RFC 3339 date-time")
    return problems


SAMPLE_STATUSES = sample_statuses()


@pytest.mark.parametrize("name", list(SAMPLE_STATUSES))
def test_the_status_the_operator_writes_fits_the_status_schema(name: str) -> None:
    assert status_problems(SAMPLE_STATUSES[name], STATUS_SCHEMA) == []


def test_the_status_check_notices_a_field_the_schema_lacks() -> None:
    status = copy.deepcopy(SAMPLE_STATUSES["applied"])
    status["plan"]["lookups"]["retried"] = 2
    status["run"]["archived"] = "6"
    assert status_problems(status, STATUS_SCHEMA) == [
        "status.plan.lookups.retried: not in the schema, the API server drops it",
        "status.run.archived: '6' is not of type integer",
    ]


# The checks themselves: each must notice the drift it is there for.


class _RetentionWithAnExtraField(RetentionSpec):
    keep_tagged: bool = True


class _SafetyWithAnotherDefault(SafetySpec):
    max_archived_per_run: Annotated[int, annotated_types.Ge(0), annotated_types.Le(10**8)] = 400


def test_the_walk_notices_a_field_missing_on_either_side() -> None:
    schema = PAIRS["spec.retention"].schema
    assert walk(_RetentionWithAnExtraField, schema, "spec.retention").missing_in_crd == [
        "spec.retention.keepTagged"
    ]
    trimmed = copy.deepcopy(schema)
    trimmed["properties"]["keepForever"] = {"type": "boolean", "description": "x"}
    assert walk(RetentionSpec, trimmed, "spec.retention").missing_in_model == [
        "spec.retention.keepForever"
    ]


def test_the_default_and_bound_checks_notice_a_change() -> None:
    schema = PAIRS["spec.safety"].schema
    changed = walk(_SafetyWithAnotherDefault, schema, "spec.safety")
    per_run = next(p for p in changed.pairs if p.path == "spec.safety.maxArchivedPerRun")
    assert default_problems(per_run) == [
        "spec.safety.maxArchivedPerRun: CRD default 500, spec.py default 400"
    ]
    loosened = Pair(per_run.path, per_run.field, {**per_run.schema, "maximum": 10**9})
    assert bound_problems(loosened) != []
