"""The operator's own calls to the Kubernetes API: Secrets, status, the kill switch.

Every call is synchronous (the official client) and made from a worker
thread by the caller, so kopf's event loop never blocks. Events are posted
through kopf itself, which owns that queue.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .db import ConfigurationError
from .spec import API_GROUP, SecretKeyRef

__all__ = [
    "KillSwitch",
    "KubeApi",
    "KubeSecrets",
    "KubeUnavailable",
    "load_kube_config",
    "unavailable",
]

VERSION = "v1alpha1"
PLURAL = "deploymentcleanups"
_TRUE = {"true", "1", "yes", "on"}
# (connect, read) seconds for every call: a call that never returns would freeze a tick.
REQUEST_TIMEOUT = (5.0, 10.0)


class KubeUnavailable(Exception):
    """The API server could not be reached or answered 429/5xx: retry soon, it is not the run."""


def unavailable(exc: BaseException) -> bool:
    """Whether an error from the Kubernetes client means the API server is away or overloaded."""
    if isinstance(exc, KubeUnavailable | urllib3.exceptions.HTTPError | ConnectionError):
        return True
    return isinstance(exc, ApiException) and (exc.status == 429 or (exc.status or 0) >= 500)


def load_kube_config() -> client.ApiClient:
    """In-cluster credentials when running in a Pod, else the current kubeconfig."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    configuration = client.Configuration.get_default_copy()
    # No retries inside a call: urllib3's three retries of a read timeout could hold one tick
    # for minutes while an API server starts up; the next tick is the retry.
    configuration.retries = urllib3.Retry(total=0, redirect=0)
    return client.ApiClient(configuration)


@dataclass
class KubeApi:
    api: client.ApiClient

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """A merge patch of the status subresource; the spec is never touched."""
        self.custom.patch_namespaced_custom_object_status(
            API_GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": dict(status)},
            _request_timeout=REQUEST_TIMEOUT,
        )

    def read_flag(self, namespace: str, name: str, key: str) -> bool:
        """Whether a ConfigMap's key says true; a missing ConfigMap or key is false."""
        try:
            cm = self.core.read_namespaced_config_map(
                name, namespace, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return str((cm.data or {}).get(key, "")).strip().lower() in _TRUE


class KubeSecrets:
    """Resolves secret references from Secrets in the cleanup's own namespace."""

    def __init__(self, kube: KubeApi, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace

    def resolve(self, ref: SecretKeyRef) -> str:
        where = f"Secret {self.namespace}/{ref.name}"
        try:
            secret = self.kube.core.read_namespaced_secret(
                ref.name, self.namespace, _request_timeout=REQUEST_TIMEOUT
            )
        except Exception as exc:
            if unavailable(exc):
                raise KubeUnavailable(f"cannot read {where}: {type(exc).__name__}") from None
            if not isinstance(exc, ApiException):
                raise
            if exc.status == 404:
                raise ConfigurationError(f"{where} does not exist") from None
            if exc.status == 403:
                raise ConfigurationError(f"the operator may not read {where}") from None
            raise ConfigurationError(f"cannot read {where}: HTTP {exc.status}") from None
        data = secret.data or {}
        if ref.key not in data:
            raise ConfigurationError(f"{where} has no key {ref.key!r}")
        return base64.b64decode(data[ref.key]).decode().strip()


class KillSwitch:
    """The global kill switch, as last read. Fails closed: a switch that cannot be read, or
    whose last good read is older than ``max_age`` seconds (a stuck poller), counts as on."""

    def __init__(
        self,
        namespace: str,
        name: str,
        key: str = "enabled",
        *,
        max_age: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.key = key
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._on = True
        self._why = "not read yet"
        self._read_at: float | None = None

    def refresh(self, kube: KubeApi) -> None:
        read_at: float | None = self._clock()
        try:
            on = kube.read_flag(self.namespace, self.name, self.key)
            why = f"ConfigMap {self.namespace}/{self.name} has {self.key}=true" if on else ""
        except Exception as exc:  # any failure to read it must stop destructive work
            on, why = True, f"the kill switch ConfigMap cannot be read ({type(exc).__name__})"
            read_at = None
        with self._lock:
            self._on, self._why = on, why
            if read_at is not None:
                self._read_at = read_at

    def _state(self) -> tuple[bool, str]:
        with self._lock:
            on, why, read_at = self._on, self._why, self._read_at
        age = None if read_at is None else self._clock() - read_at
        if not on and age is not None and age > self.max_age:
            return True, f"last read {age:.0f}s ago, more than {self.max_age:g}s (stale)"
        return on, why

    @property
    def on(self) -> bool:
        return self._state()[0]

    def reason(self) -> str | None:
        """For the engine's stop check: why to stop, or None to go on."""
        on, why = self._state()
        return f"kill switch: {why}" if on else None
