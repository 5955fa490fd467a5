"""The operator as a real subprocess against the test control plane, and helpers to watch it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import pytest
import yaml

from deployment_cleanup.spec import API_VERSION, KIND

from .controlplane import ControlPlane

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "deploymentcleanups.deployment-cleanup.dev.yaml"
PEERING_CRDS = REPO / "crds" / "kopf-peering.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    check: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.2, what: str = ""
) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}; last: {last!r}")


class OperatorProcess:
    """``deployment-cleanup operator`` in its own process group, logging to a file."""

    def __init__(
        self,
        cp: ControlPlane,
        namespace: str,
        log: Path,
        *,
        identity: str = "replica-a",
        peering: str | None = None,
        priority: int = 0,
        tick: float = 0.5,
        kill_switch: str | None = None,
        kubeconfig: Path | None = None,
    ) -> None:
        self.cp = cp
        self.log = log
        self.metrics_port = free_port()
        self.health_port = free_port()
        scope = (
            ["--standalone"]
            if peering is None
            else ["--peering", peering, "--priority", str(priority)]
        )
        self.command = [
            sys.executable,
            "-m",
            "deployment_cleanup.cli",
            "operator",
            "-n",
            namespace,
            *scope,
            "--identity",
            identity,
            "--tick-seconds",
            str(tick),
            "--metrics-port",
            str(self.metrics_port),
            "--liveness",
            f"http://127.0.0.1:{self.health_port}/healthz",
            "--kill-switch",
            kill_switch or f"{namespace}/deployment-cleanup-kill-switch",
        ]
        self.env = dict(
            os.environ,
            KUBECONFIG=str(kubeconfig or cp.kubeconfig),
            DEPLOYMENT_CLEANUP_KILL_SWITCH_POLL_SECONDS="0.5",
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self._healthy, timeout=30, what=f"operator health on :{self.health_port}")
        return self

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"operator exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.health_port}/healthz", timeout=1
            ) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            return str(r.read().decode())

    def kill(self) -> None:
        """SIGKILL: no cleanup, no status write, as a crash."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


class Cluster:
    """kubectl helpers for one test namespace."""

    def __init__(self, cp: ControlPlane, namespace: str) -> None:
        self.cp = cp
        self.namespace = namespace

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.cp.kubectl("-n", self.namespace, *args, input=input, check=check)

    def apply(self, document: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump(document))

    def secret(self, name: str, **data: str) -> None:
        literals = [f"--from-literal={k}={v}" for k, v in data.items()]
        manifest = self.kubectl(
            "create", "secret", "generic", name, *literals, "--dry-run=client", "-o", "yaml"
        ).stdout
        self.kubectl("apply", "-f", "-", input=manifest)

    def get(self, name: str = "nightly") -> dict[str, Any]:
        return dict(json.loads(self.kubectl("get", "dcl", name, "-o", "json").stdout))

    def status(self, name: str = "nightly") -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def condition(self, type_: str, name: str = "nightly") -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), {})

    def events(self) -> list[dict[str, Any]]:
        return list(json.loads(self.kubectl("get", "events", "-o", "json").stdout)["items"])

    def event_reasons(self) -> list[str]:
        return [e["reason"] for e in self.events()]


@pytest.fixture(scope="session")
def crds(control_plane: ControlPlane) -> ControlPlane:
    """The control plane with the project's CRDs installed and established."""
    for path in (CRD, PEERING_CRDS):
        control_plane.kubectl("apply", "--server-side", "-f", str(path))
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/deploymentcleanups.deployment-cleanup.dev",
        "crd/kopfpeerings.kopf.dev",
    )
    return control_plane


@pytest.fixture
def cluster(crds: ControlPlane) -> Cluster:
    """A fresh namespace of its own for one test."""
    namespace = f"t-{uuid.uuid4().hex[:10]}"
    crds.kubectl("create", "namespace", namespace)
    return Cluster(crds, namespace)


def cluster_spec(**sections: Any) -> dict[str, Any]:
    """A spec as deployed: the database URL from Secret builds-db, the routes table, and
    thresholds wide enough that only the behaviour under test can block a run."""
    body: dict[str, Any] = {
        "database": {"urlSecretRef": {"name": "builds-db", "key": "url"}},
        "routing": {"sql": {}},
        "retention": {"keepNewest": 2, "minAge": "7d"},
        "safety": {
            "maxArchivedPerRun": 100_000,
            "maxArchivedPercent": 100,
            "maxArchivedPerProject": 1000,
        },
        "execution": {"batchSize": 20, "canaryBatchSize": 5},
    }
    body.update(sections)
    return body


def cleanup_resource(spec: dict[str, Any], name: str = "nightly") -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}
