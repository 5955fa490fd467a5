"""The operator's own calls to the Kubernetes API: Secrets, status, the kill switch.

Every call is synchronous (the official client) and made from a worker
thread by the caller, so kopf's event loop never blocks. Events are posted
through kopf itself, which owns that queue.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .db import ConfigurationError
from .spec import API_GROUP, SecretKeyRef

__all__ = ["KillSwitch", "KubeApi", "KubeSecrets", "load_kube_config"]

VERSION = "v1alpha1"
PLURAL = "deploymentcleanups"
_TRUE = {"true", "1", "yes", "on"}


def load_kube_config() -> client.ApiClient:
    """In-cluster credentials when running in a Pod, else the current kubeconfig."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


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
            API_GROUP, VERSION, namespace, PLURAL, name, {"status": dict(status)}
        )

    def read_flag(self, namespace: str, name: str, key: str) -> bool:
        """Whether a ConfigMap's key says true; a missing ConfigMap or key is false."""
        try:
            cm = self.core.read_namespaced_config_map(name, namespace)
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
            secret = self.kube.core.read_namespaced_secret(ref.name, self.namespace)
        except ApiException as exc:
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
    """The global kill switch, as last read. Fails closed: an unreadable switch counts as on."""

    def __init__(self, namespace: str, name: str, key: str = "enabled") -> None:
        self.namespace = namespace
        self.name = name
        self.key = key
        self._lock = threading.Lock()
        self._on = True
        self._why = "not read yet"

    def refresh(self, kube: KubeApi) -> None:
        try:
            on = kube.read_flag(self.namespace, self.name, self.key)
            why = f"ConfigMap {self.namespace}/{self.name} has {self.key}=true" if on else ""
        except Exception as exc:  # any failure to read it must stop destructive work
            on, why = True, f"the kill switch ConfigMap cannot be read ({type(exc).__name__})"
        with self._lock:
            self._on, self._why = on, why

    @property
    def on(self) -> bool:
        with self._lock:
            return self._on

    def reason(self) -> str | None:
        """For the engine's stop check: why to stop, or None to go on."""
        with self._lock:
            return f"kill switch: {self._why}" if self._on else None
