"""The Helm chart without a cluster: lint, rendering over several value sets, the values schema,
the CRD copies, the restricted Pod security settings and the operator's arguments.

Uses the pinned helm binary of the test control plane (tests/support/controlplane.py).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployment_cleanup.cli import _parser
from tests.support.chart import (
    CHART,
    NAMESPACED,
    RELEASE_NAMESPACE,
    SYNC_CRDS,
    VALUE_SETS,
    container,
    find,
    helm,
    operator_args,
    render,
    values_file,
)

Documents = list[dict[str, Any]]
RELEASE = "dcl"
FULLNAME = "dcl-deployment-cleanup"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chart")


@pytest.fixture(scope="module")
def rendered(folder: Path) -> dict[str, Documents]:
    return {name: render(values, folder=folder) for name, values in VALUE_SETS.items()}


def rules_of(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(r) for r in document["rules"]]


def grants(documents: Documents, resource: str) -> list[tuple[str, str | None, list[str]]]:
    """(kind, namespace, verbs) of every Role/ClusterRole rule naming this resource."""
    return [
        (d["kind"], d["metadata"].get("namespace"), rule["verbs"])
        for d in documents
        if d["kind"] in ("Role", "ClusterRole")
        for rule in d["rules"]
        if resource in rule["resources"]
    ]


# -- lint and render -------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_lints_cleanly(name: str, folder: Path) -> None:
    result = helm(
        "lint", "--strict", str(CHART), "--values", str(values_file(VALUE_SETS[name], folder))
    )
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_is_labelled_and_placed(name: str, rendered: dict[str, Documents]) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    for document in rendered[name]:
        labels = document["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        if document["kind"] in cluster_scoped:
            assert "namespace" not in document["metadata"]
        else:
            assert document["metadata"]["namespace"]


def test_defaults_make_the_clusterwide_operator(rendered: dict[str, Documents]) -> None:
    documents = rendered["defaults"]
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "ClusterRole",  # the operator's
            "ClusterRole",  # kopf's discovery
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "Role",  # the kill switch
            "RoleBinding",
            "Service",
            "Deployment",
            "ClusterKopfPeering",
        ]
    )
    assert container(documents)["image"] == "deployment-cleanup:0.1.0"  # appVersion
    assert find(documents, "ClusterKopfPeering")["metadata"]["name"] == FULLNAME


def test_optional_objects_render_when_enabled(rendered: dict[str, Documents]) -> None:
    documents = rendered["everything"]
    for kind in ("ServiceMonitor", "PrometheusRule", "NetworkPolicy", "PodDisruptionBudget"):
        find(documents, kind)
    assert container(documents)["image"] == (
        "registry.example.test/platform/deployment-cleanup@sha256:" + "a" * 64
    )
    for kind in ("ServiceMonitor", "PrometheusRule", "NetworkPolicy", "PodDisruptionBudget"):
        assert not [d for d in rendered["defaults"] if d["kind"] == kind]


# -- the operator's arguments ----------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_container_args_are_accepted_by_the_operator_cli(
    name: str, rendered: dict[str, Documents]
) -> None:
    args = _parser().parse_args(operator_args(rendered[name]))
    assert args.command == "operator"
    assert args.kill_switch == f"{RELEASE_NAMESPACE}/deployment-cleanup-kill-switch"
    assert args.liveness == "http://0.0.0.0:8081/healthz"
    assert args.metrics_port == 8080
    assert not args.standalone
    assert args.peering == FULLNAME


def test_clusterwide_args_watch_all_namespaces(rendered: dict[str, Documents]) -> None:
    args = _parser().parse_args(operator_args(rendered["defaults"]))
    assert args.all_namespaces
    assert args.namespace is None
    assert args.priority == 0
    assert args.tick_seconds is None


def test_namespaced_args_watch_each_listed_namespace(rendered: dict[str, Documents]) -> None:
    args = _parser().parse_args(operator_args(rendered["namespaced"]))
    assert not args.all_namespaces
    assert args.namespace == ["team-a", "team-b"]


def test_everything_args(rendered: dict[str, Documents]) -> None:
    args = _parser().parse_args(operator_args(rendered["everything"]))
    assert (args.priority, args.tick_seconds, args.verbose) == (10, 30.0, True)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param(
            {"peering": {"enabled": False}, "metrics": {"enabled": False}},
            {"standalone": True, "metrics_port": 0},
            id="standalone-without-metrics",
        ),
        pytest.param(
            {"peering": {"priority": -5, "name": "shared"}, "health": {"port": 9000}},
            {"priority": -5, "peering": "shared", "liveness": "http://0.0.0.0:9000/healthz"},
            id="negative-priority",
        ),
        pytest.param(
            {"killSwitch": {"configMapName": "stop"}, "operator": {"tickSeconds": 2.5}},
            {"kill_switch": f"{RELEASE_NAMESPACE}/stop", "tick_seconds": 2.5},
            id="kill-switch-and-tick",
        ),
    ],
)
def test_values_reach_the_operator_flags(
    values: dict[str, Any], expected: dict[str, Any], folder: Path
) -> None:
    documents = render(values, folder=folder)
    args = vars(_parser().parse_args(operator_args(documents)))
    assert {key: args[key] for key in expected} == expected
    if values.get("metrics", {}).get("enabled") is False:
        assert not [d for d in documents if d["kind"] == "Service"]
        assert [p["name"] for p in container(documents)["ports"]] == ["health"]


# -- security --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_deployment_meets_the_restricted_pod_security_standard(
    name: str, rendered: dict[str, Documents]
) -> None:
    deployment = find(rendered[name], "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["terminationGracePeriodSeconds"] == 60
    assert pod["serviceAccountName"] == FULLNAME
    (c,) = pod["containers"]
    security = c["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in security
    assert {"mountPath": "/tmp", "name": "tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert not any("hostPath" in v for v in pod["volumes"])
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert set(c["resources"]) == {"requests", "limits"}
    assert set(c["resources"]["requests"]) == {"cpu", "memory"}
    assert c["resources"]["limits"]["memory"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_probes_env_and_ports_match_the_operator(name: str, rendered: dict[str, Documents]) -> None:
    c = container(rendered[name])
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8081, "metrics": 8080}
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["DEPLOYMENT_CLEANUP_IDENTITY"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.name"}
    }


# -- RBAC ------------------------------------------------------------------------------------

OPERATOR_RULES = [
    {
        "apiGroups": ["deployment-cleanup.dev"],
        "resources": ["deploymentcleanups"],
        "verbs": ["list", "watch", "patch"],
    },
    {
        "apiGroups": ["deployment-cleanup.dev"],
        "resources": ["deploymentcleanups/status"],
        "verbs": ["patch"],
    },
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
]


def peering_rules(resource: str) -> list[dict[str, Any]]:
    return [
        {"apiGroups": ["kopf.dev"], "resources": [resource], "verbs": ["list", "watch"]},
        {
            "apiGroups": ["kopf.dev"],
            "resources": [resource],
            "resourceNames": [FULLNAME],
            "verbs": ["patch"],
        },
    ]


KILL_SWITCH_RULES = [
    {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": ["deployment-cleanup-kill-switch"],
        "verbs": ["get"],
    }
]


def test_clusterwide_rbac_is_exactly_what_the_operator_does(
    rendered: dict[str, Documents],
) -> None:
    documents = rendered["defaults"]
    operator_role = find(documents, "ClusterRole", FULLNAME)
    assert rules_of(operator_role) == OPERATOR_RULES + peering_rules("clusterkopfpeerings")
    assert rules_of(find(documents, "ClusterRole", f"{FULLNAME}-discovery")) == [
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["list", "watch"],
        }
    ]
    kill_switch = find(documents, "Role", f"{FULLNAME}-kill-switch")
    assert kill_switch["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert rules_of(kill_switch) == KILL_SWITCH_RULES
    for binding in ("ClusterRoleBinding", "RoleBinding"):
        for document in (d for d in documents if d["kind"] == binding):
            assert document["subjects"] == [
                {"kind": "ServiceAccount", "name": FULLNAME, "namespace": RELEASE_NAMESPACE}
            ]


def test_namespaced_rbac_has_a_role_per_watched_namespace_and_no_cluster_secrets(
    rendered: dict[str, Documents],
) -> None:
    documents = rendered["namespaced"]
    for namespace in NAMESPACED["watchNamespaces"]:
        (role,) = [
            d for d in documents if d["kind"] == "Role" and d["metadata"]["namespace"] == namespace
        ]
        assert rules_of(role) == OPERATOR_RULES + peering_rules("kopfpeerings")
        (binding,) = [
            d
            for d in documents
            if d["kind"] == "RoleBinding" and d["metadata"]["namespace"] == namespace
        ]
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert grants(documents, "secrets") == [
        ("Role", "team-a", ["get"]),
        ("Role", "team-b", ["get"]),
    ]
    (cluster_role,) = [d for d in documents if d["kind"] == "ClusterRole"]
    assert cluster_role["metadata"]["name"] == f"{FULLNAME}-discovery"
    assert {r["resources"][0]: r["verbs"] for r in rules_of(cluster_role)} == {
        "customresourcedefinitions": ["list", "watch"],
        "namespaces": ["list", "watch"],
    }
    peerings = [d for d in documents if d["kind"] == "KopfPeering"]
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]


def test_namespaced_without_discovery_has_no_cluster_scoped_rbac(folder: Path) -> None:
    documents = render(
        {**NAMESPACED, "rbac": {"clusterWide": False, "discovery": False}}, folder=folder
    )
    assert not [d for d in documents if d["kind"].startswith("Cluster")]
    # ... and the operator is told not to watch what it may no longer list.
    args = find(documents, "Deployment", FULLNAME)["spec"]["template"]["spec"]["containers"][0]
    assert "--static-discovery" in args["args"]
    with_discovery = find(render(NAMESPACED, folder=folder), "Deployment", FULLNAME)
    assert (
        "--static-discovery"
        not in with_discovery["spec"]["template"]["spec"]["containers"][0]["args"]
    )


@pytest.mark.parametrize("name", VALUE_SETS)
def test_no_rule_uses_a_wildcard_or_a_write_verb_beyond_patch(
    name: str, rendered: dict[str, Documents]
) -> None:
    for document in rendered[name]:
        for rule in document.get("rules", []) if document["kind"].endswith("Role") else []:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
            assert set(rule["verbs"]) <= {"get", "list", "watch", "patch", "create"}
            if "create" in rule["verbs"]:
                assert rule["resources"] == ["events"]


def test_rbac_and_service_account_can_be_left_out(folder: Path) -> None:
    documents = render(
        {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "existing"}},
        folder=folder,
    )
    assert {d["kind"] for d in documents} == {"Deployment", "Service", "ClusterKopfPeering"}
    pod = find(documents, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "existing"


# -- monitoring, network policy, disruption budget -------------------------------------------


def test_prometheus_rule_has_the_four_alerts(rendered: dict[str, Documents]) -> None:
    rule = find(rendered["everything"], "PrometheusRule")
    (group,) = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    job = f'job="{FULLNAME}-metrics"'
    blocked = alerts["DeploymentCleanupRunBlocked"]["expr"]
    assert 'deployment_cleanup_runs_total{outcome="Blocked",' + job in blocked
    assert "increase(" in blocked
    assert (
        "deployment_cleanup_lookup_batches_failed_total{" + job
        in (alerts["DeploymentCleanupLookupsFailing"]["expr"])
    )
    no_success = alerts["DeploymentCleanupNoRecentSuccess"]["expr"]
    assert "deployment_cleanup_last_success_timestamp_seconds{" + job in no_success
    assert no_success.strip().endswith("> 129600")  # 36h
    absent = alerts["DeploymentCleanupNoSuccessReported"]
    assert absent["expr"].strip().startswith("absent(deployment_cleanup_last_success_timestamp")
    assert absent["for"] == "36h"
    kill_switch = alerts["DeploymentCleanupKillSwitchOn"]
    assert "deployment_cleanup_kill_switch_enabled{" + job in kill_switch["expr"]
    assert kill_switch["expr"].strip().endswith("== 1")
    assert kill_switch["for"] == "1h"
    for alert in alerts.values():
        assert alert["labels"]["team"] == "platform"  # alertLabels
        assert alert["labels"]["severity"]
        assert alert["annotations"]["summary"]


@pytest.mark.parametrize(
    ("duration", "seconds"), [("36h", 129600), ("90m", 5400), ("2d", 172800), ("45s", 45)]
)
def test_no_success_threshold_is_converted_to_seconds(
    duration: str, seconds: int, folder: Path
) -> None:
    documents = render(
        {"prometheusRule": {"enabled": True, "noSuccessFor": duration}}, folder=folder
    )
    rules = find(documents, "PrometheusRule")["spec"]["groups"][0]["rules"]
    expr = next(r for r in rules if r["alert"] == "DeploymentCleanupNoRecentSuccess")["expr"]
    assert expr.strip().endswith(f"> {seconds}")


def test_service_monitor_scrapes_the_metrics_service(rendered: dict[str, Documents]) -> None:
    documents = rendered["everything"]
    monitor = find(documents, "ServiceMonitor")
    service = find(documents, "Service")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True


def test_network_policy_allows_only_the_listed_egress(rendered: dict[str, Documents]) -> None:
    policy = find(rendered["everything"], "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    egress = policy["spec"]["egress"]
    cidrs = [[t["ipBlock"]["cidr"] for t in rule.get("to", [])] for rule in egress]
    assert cidrs == [[], ["10.0.0.1/32"], ["10.20.0.0/16"], ["10.30.0.0/16"], ["10.40.0.0/16"]]
    dns = {(p["port"], p["protocol"]) for p in egress[0]["ports"]}
    assert dns == {(53, "UDP"), (53, "TCP")}
    assert egress[2]["ports"] == [{"port": 5432, "protocol": "TCP"}]
    metrics_rule = policy["spec"]["ingress"][1]
    assert metrics_rule["from"] == [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]


def test_pod_disruption_budget(rendered: dict[str, Documents], folder: Path) -> None:
    assert find(rendered["everything"], "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    documents = render(
        {"podDisruptionBudget": {"enabled": True, "minAvailable": 1, "maxUnavailable": None}},
        folder=folder,
    )
    spec = find(documents, "PodDisruptionBudget")["spec"]
    assert spec["minAvailable"] == 1
    assert "maxUnavailable" not in spec


# -- values and their schema -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "named"),
    [
        pytest.param({"replicas": 2}, "replicas", id="unknown-top-level-key"),
        pytest.param({"serviceAccount": {"craete": True}}, "craete", id="typo-in-an-object"),
        pytest.param({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy", id="enum"),
        pytest.param({"image": {"digest": "latest"}}, "digest", id="digest-pattern"),
        pytest.param({"rbac": {"clusterWide": "yes"}}, "clusterWide", id="string-for-boolean"),
        pytest.param({"rbac": {"clusterWide": False}}, "watchNamespaces", id="namespaced-no-ns"),
        pytest.param({"watchNamespaces": ["Team_A"]}, "watchNamespaces", id="bad-namespace"),
        pytest.param({"watchNamespaces": ["a", "a"]}, "watchNamespaces", id="duplicate-ns"),
        pytest.param({"metrics": {"port": 70000}}, "port", id="port-out-of-range"),
        pytest.param({"peering": {"priority": "high"}}, "priority", id="string-for-integer"),
        pytest.param({"operator": {"tickSeconds": 0}}, "tickSeconds", id="zero-tick"),
        pytest.param({"prometheusRule": {"noSuccessFor": "36 hours"}}, "noSuccessFor", id="dur"),
        pytest.param({"resources": {"limits": {"memory": []}}}, "memory", id="bad-quantity"),
        pytest.param({"networkPolicy": {"database": {"cidrs": ["db"]}}}, "cidrs", id="bad-cidr"),
        pytest.param({"killSwitch": {"configMapName": ""}}, "configMapName", id="empty-name"),
    ],
)
def test_schema_refuses_bad_values_naming_the_key(
    values: dict[str, Any], named: str, folder: Path
) -> None:
    result = helm(
        "template",
        RELEASE,
        str(CHART),
        "--values",
        str(values_file(values, folder)),
        check=False,
    )
    assert result.returncode != 0, result.stdout[:500]
    assert named in result.stderr, result.stderr


def test_namespaces_without_namespaced_mode_are_refused(folder: Path) -> None:
    result = helm(
        "template",
        RELEASE,
        str(CHART),
        "--values",
        str(values_file({"watchNamespaces": ["team-a"]}, folder)),
        check=False,
    )
    assert result.returncode != 0
    assert "watchNamespaces is set but rbac.clusterWide is true" in result.stderr


def test_kubernetes_older_than_1_28_is_refused() -> None:
    result = helm("template", RELEASE, str(CHART), "--kube-version", "1.27.0", check=False)
    assert result.returncode != 0
    assert ">=1.28.0-0" in result.stderr


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["kubeVersion"] == ">=1.28.0-0"
    assert chart["appVersion"] == "0.1.0"


def _keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return []
    found = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        found.append(path)
        found.extend(_keys(value, path + "."))
    return found


# Kubernetes objects passed through as they are: their own fields are Kubernetes' to document.
PASSED_THROUGH = ("resources.", "podSecurityContext.", "securityContext.")


def test_every_value_is_documented() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    stack: list[tuple[int, str]] = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w]*):", line)
        if not match:
            continue
        indent, key = len(match[1]), match[2]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        if path.startswith(PASSED_THROUGH):
            continue
        previous = next((p for p in reversed(lines[:number]) if p.strip()), "")
        if not previous.strip().startswith("#"):
            undocumented.append(path)
    assert undocumented == []


def test_values_and_schema_list_the_same_keys() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    def schema_keys(node: dict[str, Any], prefix: str = "") -> list[str]:
        found = []
        for key, sub in node.get("properties", {}).items():
            found.append(f"{prefix}{key}")
            if sub.get("additionalProperties") is False:
                found.extend(schema_keys(sub, f"{prefix}{key}."))
        return found

    in_schema = {k for k in schema_keys(schema) if not k.startswith(PASSED_THROUGH)} - {"global"}
    in_values = {k for k in _keys(values) if not k.startswith(PASSED_THROUGH) and k.count(".") <= 2}
    closed = {k for k in in_values if k.rsplit(".", 1)[0] in in_schema or "." not in k}
    assert closed - in_schema == set(), "in values.yaml but not in values.schema.json"
    assert in_schema - in_values == set(), "in values.schema.json but not in values.yaml"
    assert schema["additionalProperties"] is False


# -- CRDs ------------------------------------------------------------------------------------


def test_chart_crds_are_identical_to_the_repositorys() -> None:
    result = subprocess.run(
        [str(SYNC_CRDS), "--check"], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    names = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert names == sorted(p.name for p in (CHART.parents[1] / "crds").glob("*.yaml"))


def test_sync_check_fails_with_a_diff_when_a_copy_drifts(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "crds").mkdir()
    (repo / "charts" / "deployment-cleanup" / "crds").mkdir(parents=True)
    script = repo / "scripts" / "sync-chart-crds"
    script.write_text(SYNC_CRDS.read_text())
    script.chmod(0o755)
    (repo / "crds" / "a.yaml").write_text("kind: CustomResourceDefinition\n")
    assert (
        subprocess.run([str(script), "--check"], capture_output=True, check=False).returncode == 1
    )
    subprocess.run([str(script)], capture_output=True, check=True)
    assert (
        subprocess.run([str(script), "--check"], capture_output=True, check=False).returncode == 0
    )
    copy = repo / "charts" / "deployment-cleanup" / "crds" / "a.yaml"
    copy.write_text("kind: Changed\n")
    drifted = subprocess.run([str(script), "--check"], capture_output=True, text=True, check=False)
    assert drifted.returncode == 1
    assert "+kind: Changed" in drifted.stdout
