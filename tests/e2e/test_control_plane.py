"""The test control plane itself: pinned versions, CRDs, authentication and RBAC, helm, restarts."""

from __future__ import annotations

import http.client
import json
import secrets
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.controlplane import ControlPlane, pinned_versions

PINS = pinned_versions()

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.test"},
    "spec": {
        "group": "example.test",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {"size": {"type": "integer", "minimum": 1}},
                            }
                        },
                    }
                },
            }
        ],
    },
}


def widget(name: str, size: int) -> str:
    return json.dumps(
        {
            "apiVersion": "example.test/v1",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": {"size": size},
        }
    )


def eventually(check: Callable[[], bool], timeout_seconds: float = 10.0) -> bool:
    """Poll ``check``: RBAC changes reach the authorizer through an informer, not at once."""
    deadline = time.monotonic() + timeout_seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    name = f"e2e-{secrets.token_hex(4)}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    # Without kube-controller-manager it stays Terminating, which is harmless in a test etcd.
    control_plane.kubectl("delete", "namespace", name, "--wait=false")


def test_kubectl_and_server_report_the_pinned_release(control_plane: ControlPlane) -> None:
    versions = json.loads(control_plane.kubectl("version", "-o", "json").stdout)

    expected = PINS["KUBERNETES_VERSION"]
    assert versions["clientVersion"]["gitVersion"] == expected
    assert versions["serverVersion"]["gitVersion"] == expected
    assert versions["serverVersion"]["minor"] == expected.split(".")[1]


def test_version_endpoint_is_served_with_a_certificate_from_ca_file(
    control_plane: ControlPlane,
) -> None:
    url = urllib.parse.urlsplit(control_plane.server)
    assert url.hostname is not None
    tls = ssl.create_default_context(cafile=str(control_plane.ca_file))
    connection = http.client.HTTPSConnection(url.hostname, url.port, context=tls, timeout=10)
    try:
        # /version is public (system:public-info-viewer), so no credentials are needed.
        connection.request("GET", "/version")
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()

    assert response.status == 200
    assert body["gitVersion"] == PINS["KUBERNETES_VERSION"]


def test_custom_resource_definition_becomes_established_and_validates(
    control_plane: ControlPlane, namespace: str
) -> None:
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(WIDGET_CRD))
    try:
        control_plane.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "crd/widgets.example.test"
        )
        control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=widget("small", 3))
        stored = control_plane.kubectl(
            "get", "widgets.example.test", "small", "-n", namespace, "-o", "jsonpath={.spec.size}"
        )
        rejected = control_plane.kubectl(
            "apply", "-n", namespace, "-f", "-", input=widget("empty", 0), check=False
        )
    finally:
        control_plane.kubectl("delete", "crd", "widgets.example.test", "--wait=false")

    assert stored.stdout == "3"
    assert rejected.returncode != 0
    assert "spec.size" in rejected.stderr


def test_service_account_token_is_authenticated_but_needs_rbac(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    token = control_plane.create_service_account_token(namespace, "reader")
    as_reader = control_plane.write_token_kubeconfig(token, tmp_path / "reader.kubeconfig")
    as_stranger = control_plane.write_token_kubeconfig("not-a-token", tmp_path / "bad.kubeconfig")

    def reader_can_list_secrets() -> bool:
        answer = control_plane.kubectl(
            "auth", "can-i", "list", "secrets", "-n", namespace, kubeconfig=as_reader, check=False
        )
        return answer.stdout.strip() == "yes"

    whoami = control_plane.kubectl("auth", "whoami", "-o", "json", kubeconfig=as_reader)
    username = json.loads(whoami.stdout)["status"]["userInfo"]["username"]
    assert username == f"system:serviceaccount:{namespace}:reader"

    forbidden = control_plane.kubectl(
        "get", "secrets", "-n", namespace, kubeconfig=as_reader, check=False
    )
    assert forbidden.returncode != 0
    assert "Forbidden" in forbidden.stderr
    assert not reader_can_list_secrets()

    unauthenticated = control_plane.kubectl(
        "get", "secrets", "-n", namespace, kubeconfig=as_stranger, check=False
    )
    assert unauthenticated.returncode != 0
    assert "Unauthorized" in unauthenticated.stderr

    control_plane.kubectl(
        "create", "role", "secret-reader", "--verb=list", "--resource=secrets", "-n", namespace
    )
    control_plane.kubectl(
        "create",
        "rolebinding",
        "reader-lists-secrets",
        "--role=secret-reader",
        f"--serviceaccount={namespace}:reader",
        "-n",
        namespace,
    )
    assert eventually(reader_can_list_secrets)


def test_helm_is_the_pinned_release_and_installs_a_chart(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    version = control_plane.helm("version", "--template", "{{.Version}}")
    assert version.stdout.strip() == PINS["HELM_VERSION"]

    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    # A server reporting v0.0.0-master would fail this kubeVersion constraint.
    (chart / "Chart.yaml").write_text(
        "apiVersion: v2\nname: probe\nversion: 0.1.0\nkubeVersion: '>=1.30.0-0'\n"
    )
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: probe\n"
        "data:\n  kubeVersion: {{ .Capabilities.KubeVersion.Version | quote }}\n"
    )
    control_plane.helm("install", "probe", str(chart), "-n", namespace)

    rendered = control_plane.kubectl(
        "get", "configmap", "probe", "-n", namespace, "-o", "jsonpath={.data.kubeVersion}"
    )
    assert rendered.stdout == PINS["KUBERNETES_VERSION"]


@pytest.mark.slow
def test_apiserver_restarts_on_the_same_port_with_the_same_data(
    control_plane: ControlPlane, namespace: str
) -> None:
    if control_plane.use_existing_cluster:
        pytest.skip("an existing cluster's API server is not ours to stop")
    control_plane.kubectl(
        "create", "configmap", "survivor", "-n", namespace, "--from-literal=key=value"
    )

    control_plane.stop_apiserver()
    try:
        while_down = control_plane.kubectl(
            "get", "configmap", "survivor", "-n", namespace, "--request-timeout=5s", check=False
        )
    finally:
        control_plane.start_apiserver()

    assert while_down.returncode != 0
    assert "refused" in while_down.stderr
    survivor = control_plane.kubectl(
        "get", "configmap", "survivor", "-n", namespace, "-o", "jsonpath={.data.key}"
    )
    assert survivor.stdout == "value"
