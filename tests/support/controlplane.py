"""A real kube-apiserver and etcd for tests, run the way controller-runtime's envtest runs them.

Binaries are found by the envtest conventions:

- ``TEST_ASSET_KUBE_APISERVER``, ``TEST_ASSET_ETCD``, ``TEST_ASSET_KUBECTL`` (and
  ``TEST_ASSET_HELM``) name one binary each;
- otherwise ``KUBEBUILDER_ASSETS`` names a folder holding ``kube-apiserver``, ``etcd``,
  ``kubectl`` (and ``helm``);
- otherwise ``scripts/build-control-plane`` builds them from Go modules, caches them outside
  the repo and prints that folder (a cold build takes ~20 minutes on 2 cores, then ~0.1 s).

``USE_EXISTING_CLUSTER=true`` starts nothing: the current kubeconfig context (``KUBECONFIG``
or ``~/.kube/config``) is used as it is, flattened into a private copy. Its cluster entry
must carry a CA, and ``stop_apiserver()``/``start_apiserver()`` are unavailable.

Without kube-controller-manager there is no garbage collection, no namespace finalization,
no Deployment controller and no default ServiceAccount: tests create what they need.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-control-plane"

STARTUP_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 15.0
POLL_INTERVAL_SECONDS = 0.1
COMMAND_TIMEOUT_SECONDS = 120.0
LOG_TAIL_CHARS = 4000


class ControlPlaneError(RuntimeError):
    """The control plane could not be found, started or reached."""


class CommandError(subprocess.CalledProcessError):
    """A failed kubectl/helm run whose message includes what the command printed to stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr:\n{self.stderr}"


def pinned_versions() -> dict[str, str]:
    """The versions pinned at the top of the build script, e.g. ``{"HELM_VERSION": "v3.22.0"}``."""
    pins = re.findall(r"^([A-Z]+_VERSION)=(v\S+)$", BUILD_SCRIPT.read_text(), re.MULTILINE)
    return dict(pins)


@functools.cache
def assets_dir() -> Path:
    """The folder of control-plane binaries; the build script honours KUBEBUILDER_ASSETS."""
    # stderr is inherited so that build progress shows up (pytest captures it per test).
    result = subprocess.run([str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise ControlPlaneError(f"{BUILD_SCRIPT} failed with exit code {result.returncode}")
    return Path(result.stdout.strip().splitlines()[-1])


def find_binary(name: str) -> Path:
    """Path of one control-plane binary (``kube-apiserver``, ``etcd``, ``kubectl``, ``helm``)."""
    override = os.environ.get("TEST_ASSET_" + name.upper().replace("-", "_"))
    path = Path(override) if override else assets_dir() / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ControlPlaneError(f"{name}: no executable at {path}")
    return path


class ControlPlane:
    """etcd and kube-apiserver as subprocesses on free 127.0.0.1 ports, with an admin kubeconfig.

    Use as a context manager, or call ``start()`` and always ``stop()``. The attributes
    ``kubeconfig``, ``server``, ``ca_file`` and ``logs_dir`` are set by ``start()``.
    """

    kubeconfig: Path
    server: str
    ca_file: Path
    logs_dir: Path
    _dir: Path
    _kubectl_binary: Path

    def __init__(self, *, use_existing_cluster: bool | None = None) -> None:
        if use_existing_cluster is None:
            use_existing_cluster = os.environ.get("USE_EXISTING_CLUSTER", "").lower() == "true"
        self.use_existing_cluster = use_existing_cluster
        self._cleanup = contextlib.ExitStack()
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._apiserver_command: list[str] = []
        self._apiserver_port = 0
        self._admin_tls: ssl.SSLContext | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start etcd and kube-apiserver (or adopt an existing cluster) and wait until usable."""
        self._dir = Path(tempfile.mkdtemp(prefix="deployment-cleanup-control-plane-"))
        self._cleanup.callback(shutil.rmtree, self._dir, ignore_errors=True)
        try:
            self.logs_dir = self._dir / "logs"
            self.logs_dir.mkdir()
            self.kubeconfig = self._dir / "kubeconfig"
            self.ca_file = self._dir / "ca.crt"
            self._kubectl_binary = find_binary("kubectl")
            if self.use_existing_cluster:
                self._adopt_existing_cluster()
            else:
                self._start_local()
        except BaseException:
            # Whatever was started so far is stopped, even when startup fails halfway.
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate the processes this object started (newest first) and remove its files."""
        self._cleanup.close()
        self._apiserver = None

    def stop_apiserver(self) -> None:
        """Terminate kube-apiserver only; etcd and its data stay, for outage tests."""
        self._require_local("stop_apiserver")
        if self._apiserver is not None:
            _terminate(self._apiserver)
            self._apiserver = None

    def start_apiserver(self) -> None:
        """(Re)start kube-apiserver on the same port and data, and wait until it is ready."""
        self._require_local("start_apiserver")
        if self._apiserver is not None:
            raise ControlPlaneError("kube-apiserver is already running")
        process = self._spawn("kube-apiserver", self._apiserver_command)
        try:
            _wait_until(self._apiserver_ready, process, self.logs_dir / "kube-apiserver.log")
        except BaseException:
            _terminate(process)
            raise
        self._apiserver = process

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against this cluster (as admin unless ``kubeconfig`` is given)."""
        command = [str(self._kubectl_binary), "--kubeconfig", str(kubeconfig or self.kubeconfig)]
        return _run([*command, *args], input=input, check=check)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the pinned helm as admin, with its caches and config kept in the temp dir."""
        helm_home = self._dir / "helm"
        env = {
            "HELM_CACHE_HOME": str(helm_home / "cache"),
            "HELM_CONFIG_HOME": str(helm_home / "config"),
            "HELM_DATA_HOME": str(helm_home / "data"),
        }
        command = [str(find_binary("helm")), "--kubeconfig", str(self.kubeconfig), *args]
        return _run(command, check=check, env=env)

    def create_service_account_token(self, namespace: str, name: str, duration: str = "1h") -> str:
        """A TokenRequest token for ServiceAccount ``namespace/name``, created if missing.

        The namespace must exist. No controller-manager runs, so nothing else creates
        ServiceAccounts or their tokens.
        """
        service_account = {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace},
        }
        self.kubectl("apply", "-f", "-", input=json.dumps(service_account))
        token = self.kubectl("create", "token", name, "-n", namespace, f"--duration={duration}")
        return token.stdout.strip()

    def write_token_kubeconfig(self, token: str, path: Path) -> Path:
        """Write a kubeconfig that authenticates with ``token`` only (no client certificate)."""
        _write_kubeconfig(path, self.server, self.ca_file, {"token": token})
        return path

    def _start_local(self) -> None:
        certs = self._dir / "certs"
        certs.mkdir()
        _generate_certificates(certs)
        etcd_port, etcd_peer_port, self._apiserver_port = _free_ports(3)
        etcd_data = self._dir / "etcd"
        peer_url = f"http://127.0.0.1:{etcd_peer_port}"
        client_url = f"http://127.0.0.1:{etcd_port}"
        etcd = self._spawn(
            "etcd",
            [
                str(find_binary("etcd")),
                f"--data-dir={etcd_data}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                # Test data is thrown away: durability only costs time.
                "--unsafe-no-fsync=true",
            ],
        )
        _wait_until(lambda: _etcd_healthy(etcd_port), etcd, self.logs_dir / "etcd.log")

        self.server = f"https://127.0.0.1:{self._apiserver_port}"
        shutil.copyfile(certs / "ca.crt", self.ca_file)
        self._apiserver_command = [
            str(find_binary("kube-apiserver")),
            f"--etcd-servers={client_url}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self._apiserver_port}",
            # Advertise loopback, not the machine's address (a network namespace may have no
            # default route to derive one from). Endpoints reject loopback IPs, so the default
            # reconciler would log an error every 10 s: turn it off.
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",
            f"--tls-cert-file={certs / 'apiserver.crt'}",
            f"--tls-private-key-file={certs / 'apiserver.key'}",
            f"--client-ca-file={certs / 'ca.crt'}",
            f"--service-account-issuer={self.server}",
            f"--service-account-key-file={certs / 'service-accounts.pub'}",
            f"--service-account-signing-key-file={certs / 'service-accounts.key'}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--authorization-mode=RBAC",
            # That plugin rejects Pods whose ServiceAccount (`default` if unset) does not exist,
            # and only kube-controller-manager creates the `default` ones.
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
        ]
        self._admin_tls = ssl.create_default_context(cafile=str(self.ca_file))
        self._admin_tls.load_cert_chain(certs / "admin.crt", certs / "admin.key")
        _write_kubeconfig(
            self.kubeconfig,
            self.server,
            self.ca_file,
            {
                "client-certificate": str(certs / "admin.crt"),
                "client-key": str(certs / "admin.key"),
            },
        )
        self.start_apiserver()

    def _adopt_existing_cluster(self) -> None:
        # No --kubeconfig: kubectl merges KUBECONFIG (or ~/.kube/config) as usual.
        flattened = _run(
            [
                str(self._kubectl_binary),
                "config",
                "view",
                "--minify",
                "--flatten",
                "--raw",
                "-o",
                "json",
            ]
        ).stdout
        cluster = json.loads(flattened)["clusters"][0]["cluster"]
        ca_data = cluster.get("certificate-authority-data")
        if not ca_data:
            raise ControlPlaneError("USE_EXISTING_CLUSTER: the current cluster has no CA")
        self.server = cluster["server"]
        self.ca_file.write_bytes(base64.b64decode(ca_data))
        self.kubeconfig.write_text(flattened)

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        # Appending keeps the logs of earlier runs when kube-apiserver is restarted.
        with (self.logs_dir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                # Out of the terminal's process group: a Ctrl-C reaches pytest, which then
                # stops the processes in order.
                start_new_session=True,
            )
        self._cleanup.callback(_terminate, process)
        return process

    def _apiserver_ready(self) -> bool:
        port, tls = self._apiserver_port, self._admin_tls
        assert tls is not None, "set up by _start_local"
        return (
            _get_status(port, "/readyz", tls) == 200
            and _get_status(port, "/api/v1/namespaces/default", tls) == 200
        )

    def _require_local(self, operation: str) -> None:
        if self.use_existing_cluster:
            raise ControlPlaneError(f"{operation} is unavailable with USE_EXISTING_CLUSTER=true")


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """One control plane for the whole test session."""
    with ControlPlane() as plane:
        yield plane


def _run(
    command: list[str],
    *,
    input: str | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        command,
        input=input,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
        env={**os.environ, **env} if env else None,
        check=False,
    )
    if check and result.returncode != 0:
        raise CommandError(result.returncode, command, result.stdout, result.stderr)
    return result


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_until(ready: Callable[[], bool], process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not ready():
        if process.poll() is not None:
            raise ControlPlaneError(
                f"{log.stem} exited with code {process.returncode}:\n{_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise ControlPlaneError(
                f"{log.stem} not ready after {STARTUP_TIMEOUT_SECONDS:.0f} s:\n{_tail(log)}"
            )
        time.sleep(POLL_INTERVAL_SECONDS)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-LOG_TAIL_CHARS:]


def _free_ports(count: int) -> list[int]:
    # All sockets stay open until every port is chosen, so the ports differ.
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _get_status(port: int, path: str, tls: ssl.SSLContext | None = None) -> int | None:
    """HTTP status of a GET to 127.0.0.1 (no proxy is ever involved), or None if unreachable."""
    connection = (
        http.client.HTTPSConnection("127.0.0.1", port, context=tls, timeout=5)
        if tls
        else http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    )
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
    except (OSError, http.client.HTTPException):
        return None
    else:
        return response.status
    finally:
        connection.close()


def _etcd_healthy(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/health")
        health = json.loads(connection.getresponse().read())
    except (OSError, http.client.HTTPException, ValueError):
        return False
    finally:
        connection.close()
    return bool(health.get("health") == "true")


def _generate_certificates(certs: Path) -> None:
    """A CA, kube-apiserver's serving certificate, an admin client certificate and a
    service-account signing key pair, all made with the openssl CLI."""
    _issue_certificate(
        certs,
        "ca",
        "/CN=deployment-cleanup-test-ca",
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
        issuer=None,
    )
    _issue_certificate(
        certs,
        "apiserver",
        "/CN=kube-apiserver",
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        issuer="ca",
    )
    # system:masters is the group RBAC always allows everything.
    _issue_certificate(
        certs,
        "admin",
        "/O=system:masters/CN=admin",
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\n",
        issuer="ca",
    )
    signing_key = certs / "service-accounts.key"
    _openssl(
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        str(signing_key),
    )
    _openssl(
        "pkey", "-in", str(signing_key), "-pubout", "-out", str(certs / "service-accounts.pub")
    )


def _issue_certificate(
    certs: Path, name: str, subject: str, extensions: str, issuer: str | None
) -> None:
    """Make ``<name>.key`` and ``<name>.crt``, signed by ``<issuer>`` or self-signed if None."""
    key, request, extension_file = (certs / f"{name}.{suffix}" for suffix in ("key", "csr", "ext"))
    _openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(request),
        "-subj",
        subject,
    )
    extension_file.write_text(extensions)
    signer = (
        ["-signkey", str(key)]
        if issuer is None
        else [
            "-CA",
            str(certs / f"{issuer}.crt"),
            "-CAkey",
            str(certs / f"{issuer}.key"),
            "-set_serial",
            str(secrets.randbits(63)),
        ]
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(request),
        "-out",
        str(certs / f"{name}.crt"),
        "-days",
        "7",
        "-extfile",
        str(extension_file),
        *signer,
    )


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ControlPlaneError(f"openssl {args[0]} failed:\n{result.stderr}")


def _write_kubeconfig(path: Path, server: str, ca_file: Path, user: Mapping[str, str]) -> None:
    # JSON is valid YAML, and kubectl, helm and kopf all read it.
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "test", "cluster": {"server": server, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": "test", "user": dict(user)}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        "current-context": "test",
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
