"""The Helm chart in charts/deployment-cleanup: rendering it, its value sets, and running the
operator with the arguments and credentials the chart gives it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .controlplane import ControlPlane, find_binary
from .operator import OperatorProcess

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "deployment-cleanup"
SYNC_CRDS = REPO / "scripts" / "sync-chart-crds"
RELEASE_NAMESPACE = "deployment-cleanup-system"

# The value sets every rendering test goes through.
DEFAULTS: dict[str, Any] = {}
NAMESPACED: dict[str, Any] = {
    "rbac": {"clusterWide": False},
    "watchNamespaces": ["team-a", "team-b"],
}
EVERYTHING: dict[str, Any] = {
    "image": {
        "repository": "registry.example.test/platform/deployment-cleanup",
        "digest": "sha256:" + "a" * 64,
        "pullPolicy": "Always",
    },
    "imagePullSecrets": [{"name": "registry"}],
    "commonLabels": {"team": "platform"},
    "serviceAccount": {"annotations": {"example.test/role": "operator"}},
    "peering": {"priority": 10},
    "operator": {"tickSeconds": 30, "verbose": True, "extraEnv": [{"name": "TZ", "value": "UTC"}]},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "prometheusRule": {"enabled": True, "alertLabels": {"team": "platform"}},
    "networkPolicy": {
        "enabled": True,
        "apiServer": {"cidrs": ["10.0.0.1/32"], "ports": [443]},
        "database": {"cidrs": ["10.20.0.0/16"], "ports": [5432]},
        "routing": {"cidrs": ["10.30.0.0/16"], "ports": [443]},
        "extraEgress": [{"to": [{"ipBlock": {"cidr": "10.40.0.0/16"}}], "ports": [{"port": 443}]}],
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
    },
    "podDisruptionBudget": {"enabled": True},
    "podAnnotations": {"example.test/scrape": "true"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops"}],
    "priorityClassName": "platform-critical",
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": DEFAULTS,
    "namespaced": NAMESPACED,
    "everything": EVERYTHING,
    "everything-namespaced": {**EVERYTHING, **NAMESPACED},
}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The pinned helm, without a cluster, its caches in a throwaway folder."""
    with tempfile.TemporaryDirectory(prefix="helm-home-") as home:
        env = dict(
            os.environ,
            HELM_CACHE_HOME=f"{home}/cache",
            HELM_CONFIG_HOME=f"{home}/config",
            HELM_DATA_HOME=f"{home}/data",
        )
        return subprocess.run(
            [str(find_binary("helm")), *args],
            capture_output=True,
            text=True,
            check=check,
            env=env,
            timeout=120,
        )


def values_file(values: dict[str, Any], folder: Path) -> Path:
    path = folder / f"values-{len(list(folder.glob('values-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def render(
    values: dict[str, Any],
    *,
    release: str = "dcl",
    namespace: str = RELEASE_NAMESPACE,
    folder: Path,
) -> list[dict[str, Any]]:
    """``helm template`` of the chart with these values: the objects it would create."""
    result = helm(
        "template",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--values",
        str(values_file(values, folder)),
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [
        d
        for d in documents
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, got {len(matches)}"
    return matches[0]


def container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = find(documents, "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def operator_args(documents: list[dict[str, Any]]) -> list[str]:
    """The container arguments the chart gives ``deployment-cleanup``."""
    return [str(a) for a in container(documents)["args"]]


def chart_operator(
    cp: ControlPlane,
    args: list[str],
    *,
    log: Path,
    kubeconfig: Path,
    release_namespace: str,
    pod_name: str,
    tick_seconds: float = 0.5,
) -> OperatorProcess:
    """The operator as the chart's Pod would run it: the chart's arguments and the Pod's
    environment (POD_NAMESPACE, the identity from the Pod name), with the given credentials.

    Only what cannot be the same outside a Pod changes: the health and metrics ports (free
    loopback ports instead of 8081/8080 on every address) and a short tick, so tests are quick.
    """
    process = OperatorProcess(cp, release_namespace, log, kubeconfig=kubeconfig)
    local = [
        a for a in args if not a.startswith(("--liveness", "--metrics-port", "--tick-seconds"))
    ]
    assert local[0] == "operator", args
    process.command = [
        sys.executable,
        "-m",
        "deployment_cleanup.cli",
        *local,
        f"--liveness=http://127.0.0.1:{process.health_port}/healthz",
        f"--metrics-port={process.metrics_port}",
        f"--tick-seconds={tick_seconds}",
    ]
    process.env |= {"POD_NAMESPACE": release_namespace, "DEPLOYMENT_CLEANUP_IDENTITY": pod_name}
    return process


def json_of(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)
