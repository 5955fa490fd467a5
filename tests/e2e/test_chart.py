"""The Helm chart on a real kube-apiserver: every rendered object passes server-side validation,
`helm install` works in both RBAC modes, the ServiceAccount may do exactly what the operator
needs, and the operator running with that ServiceAccount's token reconciles a cleanup.

This module starts its own control plane: the cluster-wide operator watches every namespace,
and must not meet other modules' resources. There is no controller-manager, so the chart's
Deployment exists but never gets a Pod; the operator runs as a local subprocess instead, with
the chart's arguments, the Pod's environment and the chart's ServiceAccount token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.chart import (
    CHART,
    NAMESPACED,
    VALUE_SETS,
    chart_operator,
    render,
    values_file,
)
from tests.support.controlplane import ControlPlane
from tests.support.inventory import Seeded, seed
from tests.support.operator import Cluster, cleanup_resource, cluster_spec, wait_for

CRD_NAMES = [
    "deploymentcleanups.deployment-cleanup.dev",
    "kopfpeerings.kopf.dev",
    "clusterkopfpeerings.kopf.dev",
]
WATCHED = list(NAMESPACED["watchNamespaces"])  # team-a, team-b
UNWATCHED = "other"
APPS = "apps"  # where the cluster-wide test puts its cleanup
RENDER_NAMESPACE = "deployment-cleanup-system"  # what tests.support.chart.render uses


@dataclass(frozen=True)
class Release:
    mode: str
    name: str
    namespace: str
    values: dict[str, Any]
    notes: str

    @property
    def fullname(self) -> str:
        return f"{self.name}-deployment-cleanup"

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.fullname}"


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlane]:
    with ControlPlane() as cp:
        for namespace in [RENDER_NAMESPACE, "cw-system", "ns-system", *WATCHED, UNWATCHED, APPS]:
            cp.kubectl("create", "namespace", namespace)
        yield cp


@pytest.fixture(scope="module")
def releases(plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Release]:
    """Both modes installed with `helm install`; the first install creates the CRDs."""
    folder = tmp_path_factory.mktemp("releases")
    if not plane.use_existing_cluster:  # a fresh cluster: helm's crds/ install is what is tested
        assert "deploymentcleanups" not in plane.kubectl("get", "crd", "-o", "name").stdout
    modes = {
        "clusterwide": ("cw", "cw-system", {}),
        "namespaced": ("ns", "ns-system", NAMESPACED),
    }
    installed = {}
    for mode, (name, namespace, values) in modes.items():
        result = plane.helm(
            "install",
            name,
            str(CHART),
            "--namespace",
            namespace,
            "--values",
            str(values_file(values, folder)),
        )
        installed[mode] = Release(mode, name, namespace, values, result.stdout)
    plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", *[f"crd/{n}" for n in CRD_NAMES]
    )
    return installed


@pytest.fixture(scope="module")
def monitoring_crds(plane: ControlPlane) -> None:
    """Minimal prometheus-operator CRDs, so ServiceMonitor and PrometheusRule can be validated."""
    for kind, plural in (
        ("ServiceMonitor", "servicemonitors"),
        ("PrometheusRule", "prometheusrules"),
    ):
        crd = {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.monitoring.coreos.com"},
            "spec": {
                "group": "monitoring.coreos.com",
                "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "listKind": f"{kind}List"},
                "versions": [
                    {
                        "name": "v1",
                        "served": True,
                        "storage": True,
                        "schema": {
                            "openAPIV3Schema": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": True,
                            }
                        },
                    }
                ],
            },
        }
        plane.kubectl("apply", "-f", "-", input=json.dumps(crd))
        plane.kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            f"crd/{plural}.monitoring.coreos.com",
        )


# -- every rendered object is valid ----------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_objects_pass_server_side_dry_run(
    name: str,
    plane: ControlPlane,
    releases: dict[str, Release],
    monitoring_crds: None,
    tmp_path: Path,
) -> None:
    plane.kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
    documents = render(VALUE_SETS[name], folder=tmp_path)
    result = plane.kubectl(
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        "-",
        input=yaml.safe_dump_all(documents),
    )
    created = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
    assert len(created) == len(documents), result.stdout
    assert "Warning" not in result.stderr, result.stderr


EXAMPLES = CHART.parents[1] / "examples"


def test_examples_pass_server_side_dry_run(
    plane: ControlPlane, releases: dict[str, Release]
) -> None:
    """The DeploymentCleanup examples against the chart's CRD, and the Argo CD health check's
    ConfigMap (Argo CD's and Flux's own kinds have no CRD here)."""
    for namespace in ("platform", "argocd"):
        plane.kubectl("create", "namespace", namespace, check=False)
    checked = 0
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if not document or document["kind"] not in ("DeploymentCleanup", "ConfigMap"):
                continue
            result = plane.kubectl(
                "apply",
                "--dry-run=server",
                "--validate=strict",
                "-f",
                "-",
                input=yaml.safe_dump(document),
                check=False,
            )
            assert result.returncode == 0, f"{path.name}: {result.stderr}"
            checked += 1
    assert checked >= 3


# -- helm install ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["clusterwide", "namespaced"])
def test_install_creates_every_object_but_no_pod(
    mode: str, plane: ControlPlane, releases: dict[str, Release]
) -> None:
    release = releases[mode]
    status = json.loads(
        plane.helm("status", release.name, "-n", release.namespace, "-o", "json").stdout
    )
    assert status["info"]["status"] == "deployed"
    manifest = plane.helm("get", "manifest", release.name, "-n", release.namespace).stdout
    objects = [d for d in yaml.safe_load_all(manifest) if d]
    found = plane.kubectl("get", "-f", "-", "-o", "name", input=manifest).stdout.split()
    assert len(found) == len(objects)  # kubectl fails on any object that does not exist
    kinds = {d["kind"] for d in objects}
    peering = "ClusterKopfPeering" if mode == "clusterwide" else "KopfPeering"
    assert {"Deployment", "ServiceAccount", "Service", peering} <= kinds
    deployment = json.loads(
        plane.kubectl(
            "get", "deployment", release.fullname, "-n", release.namespace, "-o", "json"
        ).stdout
    )
    assert deployment["spec"]["replicas"] == 1
    # No controller-manager: nothing turns the Deployment into Pods here, as expected.
    pods = plane.kubectl("get", "pods", "-n", release.namespace, "-o", "name").stdout
    assert pods.strip() == ""


@pytest.mark.parametrize("mode", ["clusterwide", "namespaced"])
def test_install_notes_tell_how_to_check_and_start(mode: str, releases: dict[str, Release]) -> None:
    release = releases[mode]
    notes = release.notes
    assert f"kubectl -n {release.namespace} logs deployment/{release.fullname}" in notes
    assert f"service/{release.fullname}-metrics" in notes
    assert "mode: Plan" in notes
    assert "approvedPlanId" in notes
    assert (
        f"kubectl -n {release.namespace} create configmap deployment-cleanup-kill-switch "
        "--from-literal=enabled=true"
    ) in notes
    assert "kubectl apply --server-side -f crds/" in notes
    if mode == "namespaced":
        assert "kubectl -n team-a create secret generic builds-db" in notes


def test_documented_crd_upgrade_path_works(
    plane: ControlPlane, releases: dict[str, Release]
) -> None:
    release = releases["clusterwide"]
    plane.kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
    result = plane.helm(
        "upgrade",
        release.name,
        str(CHART),
        "-n",
        release.namespace,
        "--reuse-values",
        "--set",
        "operator.tickSeconds=20",
    )
    assert "STATUS: deployed" in result.stdout
    args = deployment_args(plane, release)
    assert "--tick-seconds=20" in args


# -- RBAC: exactly what the operator needs ---------------------------------------------------

# (verb, resource, namespace or None for cluster scope, extra kubectl flags)
Check = tuple[str, str, str | None, tuple[str, ...]]
DCL = "deploymentcleanups.deployment-cleanup.dev"


def operator_needs(namespace: str) -> list[Check]:
    return [
        ("list", DCL, namespace, ()),
        ("watch", DCL, namespace, ()),
        ("patch", DCL, namespace, ()),
        ("patch", DCL, namespace, ("--subresource=status",)),
        ("create", "events", namespace, ()),
        ("get", "secrets/builds-db", namespace, ()),
    ]


def operator_must_not(namespace: str) -> list[Check]:
    return [
        ("create", DCL, namespace, ()),
        ("update", DCL, namespace, ()),
        ("delete", DCL, namespace, ()),
        ("update", DCL, namespace, ("--subresource=status",)),
        ("list", "secrets", namespace, ()),
        ("watch", "secrets", namespace, ()),
        ("create", "secrets", namespace, ()),
        ("patch", "secrets/builds-db", namespace, ()),
        ("delete", "secrets/builds-db", namespace, ()),
        ("patch", "events", namespace, ()),
        ("delete", "events", namespace, ()),
        ("create", "pods", namespace, ()),
        ("list", "pods", namespace, ()),
        ("get", "configmaps/anything", namespace, ()),
        ("create", "deployments.apps", namespace, ()),
        ("create", "roles.rbac.authorization.k8s.io", namespace, ()),
    ]


def rbac_expectations(release: Release) -> tuple[list[Check], list[Check]]:
    """What the release's ServiceAccount may and may not do, per mode."""
    kill_switch = ("get", "configmaps/deployment-cleanup-kill-switch", release.namespace, ())
    allowed: list[Check] = [kill_switch, ("list", "customresourcedefinitions", None, ())]
    denied: list[Check] = [
        ("list", "configmaps", release.namespace, ()),
        ("get", "configmaps/other", release.namespace, ()),
        ("update", "configmaps/deployment-cleanup-kill-switch", release.namespace, ()),
        ("get", "configmaps/deployment-cleanup-kill-switch", UNWATCHED, ()),
        ("create", "customresourcedefinitions", None, ()),
        ("list", "nodes", None, ()),
        ("create", "clusterroles.rbac.authorization.k8s.io", None, ()),
        ("impersonate", "serviceaccounts", release.namespace, ()),
    ]
    if release.mode == "clusterwide":
        peering = "clusterkopfpeerings.kopf.dev"
        allowed += [
            ("list", DCL, None, ("--all-namespaces",)),
            ("watch", DCL, None, ("--all-namespaces",)),
            ("list", peering, None, ()),
            ("watch", peering, None, ()),
            ("patch", f"{peering}/{release.fullname}", None, ()),
        ]
        for namespace in (APPS, UNWATCHED):
            allowed += operator_needs(namespace)
            denied += operator_must_not(namespace)
        denied += [
            ("patch", f"{peering}/someone-else", None, ()),
            ("delete", f"{peering}/{release.fullname}", None, ()),
            ("list", "namespaces", None, ()),  # kopf does not list them in cluster-wide mode
        ]
    else:
        peering = "kopfpeerings.kopf.dev"
        allowed += [("list", "namespaces", None, ()), ("watch", "namespaces", None, ())]
        for namespace in WATCHED:
            allowed += operator_needs(namespace)
            allowed += [
                ("list", peering, namespace, ()),
                ("watch", peering, namespace, ()),
                ("patch", f"{peering}/{release.fullname}", namespace, ()),
            ]
            denied += operator_must_not(namespace)
            denied.append(("patch", f"{peering}/someone-else", namespace, ()))
        denied += [
            *[(verb, res, UNWATCHED, flags) for verb, res, _, flags in operator_needs(UNWATCHED)],
            ("list", peering, UNWATCHED, ()),
            ("list", DCL, None, ("--all-namespaces",)),
            ("get", "secrets/builds-db", None, ("--all-namespaces",)),
            ("list", "clusterkopfpeerings.kopf.dev", None, ()),
        ]
    return allowed, denied


def can(plane: ControlPlane, release: Release, check: Check) -> bool:
    verb, resource, namespace, flags = check
    where = ["-n", namespace] if namespace else []
    result = plane.kubectl(
        "auth", "can-i", verb, resource, *where, *flags, f"--as={release.user}", check=False
    )
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), result.stdout + result.stderr
    return answer == "yes"


@pytest.mark.parametrize("mode", ["clusterwide", "namespaced"])
def test_service_account_may_do_exactly_what_the_operator_needs(
    mode: str, plane: ControlPlane, releases: dict[str, Release]
) -> None:
    release = releases[mode]
    allowed, denied = rbac_expectations(release)
    checks = allowed + denied
    with ThreadPoolExecutor(max_workers=8) as pool:  # one kubectl each: run them side by side
        answers = dict(zip(checks, pool.map(lambda c: can(plane, release, c), checks), strict=True))
    refused = [check for check in allowed if not answers[check]]
    granted = [check for check in denied if answers[check]]
    assert refused == [], "the operator needs these"
    assert granted == [], "more than the operator needs"


def test_namespaced_mode_reads_secrets_only_through_roles(
    plane: ControlPlane, releases: dict[str, Release]
) -> None:
    release = releases["namespaced"]
    bindings = json.loads(plane.kubectl("get", "clusterrolebindings", "-o", "json").stdout)
    ours = [
        b
        for b in bindings["items"]
        if any(s.get("name") == release.fullname for s in b.get("subjects") or [])
    ]
    for binding in ours:
        role = json.loads(
            plane.kubectl("get", "clusterrole", binding["roleRef"]["name"], "-o", "json").stdout
        )
        resources = {r for rule in role["rules"] for r in rule["resources"]}
        assert resources <= {"customresourcedefinitions", "namespaces"}
        assert {v for rule in role["rules"] for v in rule["verbs"]} == {"list", "watch"}


# -- the operator with the chart's ServiceAccount --------------------------------------------


def deployment_args(plane: ControlPlane, release: Release) -> list[str]:
    deployment = json.loads(
        plane.kubectl(
            "get", "deployment", release.fullname, "-n", release.namespace, "-o", "json"
        ).stdout
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return [str(a) for a in container["args"]]


def reconciled(cluster: Cluster, name: str) -> dict[str, Any] | None:
    status = cluster.status(name)
    return status if status.get("observedGeneration") == 1 and status.get("plan") else None


def planned_event(cluster: Cluster, name: str) -> bool:
    return any(
        e["reason"] == "Planned" and e["involvedObject"]["name"] == name for e in cluster.events()
    )


@pytest.mark.parametrize(
    ("mode", "namespace"),
    [
        pytest.param("clusterwide", APPS, id="clusterwide"),
        pytest.param("namespaced", WATCHED[1], id="namespaced"),
    ],
)
def test_operator_with_the_charts_service_account_reconciles_a_plan_only_cleanup(
    mode: str,
    namespace: str,
    plane: ControlPlane,
    releases: dict[str, Release],
    tmp_path: Path,
) -> None:
    release = releases[mode]
    path = tmp_path / "builds.sqlite"
    path.touch()
    builds: Seeded = seed(f"sqlite:///{path}")
    cluster = Cluster(plane, namespace)
    cluster.secret("builds-db", url=builds.url)
    token = plane.create_service_account_token(release.namespace, release.fullname)
    kubeconfig = plane.write_token_kubeconfig(token, tmp_path / "kubeconfig")
    args = deployment_args(plane, release)
    operator = chart_operator(
        plane,
        args,
        log=tmp_path / "operator.log",
        kubeconfig=kubeconfig,
        release_namespace=release.namespace,
        pod_name=f"{release.fullname}-5d8f7c9b4-x2x7q",
    )
    before = builds.statuses()
    name = f"nightly-{mode}"
    with operator:
        cluster.apply(cleanup_resource(cluster_spec(mode="Plan"), name=name))
        status = wait_for(lambda: reconciled(cluster, name), timeout=60, what="a recorded plan")
        wait_for(lambda: planned_event(cluster, name), what="a Planned Event")
        peering = peering_object(plane, release, namespace)
        metrics = operator.metrics()
    log = operator.log.read_text()

    assert status["plan"]["verdict"] == "Ready"
    assert status["plan"]["counts"]["candidates"] == len(builds.expected_candidates())
    assert status["run"]["state"] == "Planned"
    assert cluster.condition("Ready", name)["reason"] == "PlanReady"
    assert builds.statuses() == before  # plan-only
    # The kill switch was readable (an unreadable one counts as on).
    assert status["killSwitch"] is False
    assert "deployment_cleanup_kill_switch_enabled 0.0" in metrics
    # kopf peering wrote its keep-alive into the chart's peering object.
    assert peering.get("status"), peering
    forbidden = [line for line in log.splitlines() if re.search(r"\b403\b|[Ff]orbidden", line)]
    assert forbidden == []
    assert "Not enough permissions" not in log


def peering_object(plane: ControlPlane, release: Release, namespace: str) -> dict[str, Any]:
    if release.mode == "clusterwide":
        command = ["get", "clusterkopfpeering", release.fullname, "-o", "json"]
    else:
        command = ["get", "kopfpeering", release.fullname, "-n", namespace, "-o", "json"]
    return dict(json.loads(plane.kubectl(*command).stdout))


def test_namespaced_without_discovery_needs_no_cluster_grant_and_reconciles_at_once(
    plane: ControlPlane, releases: dict[str, Release], tmp_path: Path
) -> None:
    # rbac.discovery=false: no cluster-scoped RBAC at all, so kopf must not try to watch CRDs
    # or Namespaces (it used to retry those listings for about a minute before reconciling).
    namespace, system = "team-static", "static-system"
    for created in (namespace, system):
        plane.kubectl("create", "namespace", created)
    values = {"rbac": {"clusterWide": False, "discovery": False}, "watchNamespaces": [namespace]}
    result = plane.helm(
        "install",
        "st",
        str(CHART),
        "--namespace",
        system,
        "--values",
        str(values_file(values, tmp_path)),
    )
    release = Release("namespaced", "st", system, values, result.stdout)
    assert not can(plane, release, ("list", "customresourcedefinitions", None, ()))
    path = tmp_path / "builds.sqlite"
    path.touch()
    builds: Seeded = seed(f"sqlite:///{path}")
    cluster = Cluster(plane, namespace)
    cluster.secret("builds-db", url=builds.url)
    token = plane.create_service_account_token(release.namespace, release.fullname)
    operator = chart_operator(
        plane,
        deployment_args(plane, release),
        log=tmp_path / "operator.log",
        kubeconfig=plane.write_token_kubeconfig(token, tmp_path / "kubeconfig"),
        release_namespace=release.namespace,
        pod_name=f"{release.fullname}-5d8f7c9b4-x2x7q",
    )
    with operator:
        cluster.apply(cleanup_resource(cluster_spec(mode="Plan"), name="nightly-static"))
        status = wait_for(
            lambda: reconciled(cluster, "nightly-static"), timeout=20, what="a recorded plan"
        )
    assert status["plan"]["verdict"] == "Ready"
    log = operator.log.read_text()
    forbidden = [line for line in log.splitlines() if re.search(r"\b403\b|[Ff]orbidden", line)]
    assert forbidden == []
