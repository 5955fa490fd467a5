"""DeploymentCleanup documents for tests, built from a valid base."""

from __future__ import annotations

import copy
from typing import Any

from deployment_cleanup.spec import API_VERSION, KIND, DeploymentCleanup, parse_cleanup


def cleanup_document(
    database_url: str = "sqlite:///builds.sqlite",
    routing: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A valid document; keyword arguments replace whole spec sections."""
    body: dict[str, Any] = {
        "database": {"url": database_url},
        "routing": routing or {"sql": {}},
    }
    body.update(copy.deepcopy(spec))
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": "nightly", "namespace": "platform"},
        "spec": body,
    }


def cleanup(database_url: str = "sqlite:///builds.sqlite", **kwargs: Any) -> DeploymentCleanup:
    return parse_cleanup(cleanup_document(database_url, **kwargs))
