"""kopf wiring: startup settings, the kill-switch poller, one timer per DeploymentCleanup.

Thin on purpose: the decision is reconcile.next_step (pure) and the work is
controller.Controller. Run it with ``deployment-cleanup operator`` or with
``kopf run -m deployment_cleanup.handlers``; settings come from the
environment (see OperatorConfig), which the CLI fills from its flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import kopf

from .controller import Controller
from .kube import PLURAL, VERSION, KillSwitch, KubeApi, load_kube_config
from .metrics import KILL_SWITCH, forget_cleanup, serve_metrics
from .runs import Outcome, utc_now
from .spec import API_GROUP

__all__ = ["OperatorConfig"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatorConfig:
    """Operator-wide settings, one environment variable each."""

    tick_seconds: float
    """DEPLOYMENT_CLEANUP_TICK_SECONDS: how often each resource is reconciled (default 15)."""
    kill_switch_namespace: str
    """DEPLOYMENT_CLEANUP_KILL_SWITCH_NAMESPACE: where the kill-switch ConfigMap lives
    (default: POD_NAMESPACE, else "default")."""
    kill_switch_name: str
    """DEPLOYMENT_CLEANUP_KILL_SWITCH_NAME: its name (default deployment-cleanup-kill-switch)."""
    kill_switch_poll_seconds: float
    """DEPLOYMENT_CLEANUP_KILL_SWITCH_POLL_SECONDS: how often it is read (default 2)."""
    metrics_port: int
    """DEPLOYMENT_CLEANUP_METRICS_PORT: Prometheus metrics port; 0 turns them off (default 8080)."""
    identity: str
    """DEPLOYMENT_CLEANUP_IDENTITY: this replica's name in the archive lock (default: host name).
    Keep it stable across restarts of the same Pod, so a restart resumes its own apply at once."""
    static_discovery: bool
    """DEPLOYMENT_CLEANUP_STATIC_DISCOVERY: "true" serves the resources and namespaces found at
    start, without kopf's cluster-wide watch of CRDs and Namespaces (default false)."""

    @classmethod
    def from_env(cls) -> OperatorConfig:
        env = os.environ
        return cls(
            tick_seconds=float(env.get("DEPLOYMENT_CLEANUP_TICK_SECONDS", "15")),
            kill_switch_namespace=env.get(
                "DEPLOYMENT_CLEANUP_KILL_SWITCH_NAMESPACE", env.get("POD_NAMESPACE", "default")
            ),
            kill_switch_name=env.get(
                "DEPLOYMENT_CLEANUP_KILL_SWITCH_NAME", "deployment-cleanup-kill-switch"
            ),
            kill_switch_poll_seconds=float(
                env.get("DEPLOYMENT_CLEANUP_KILL_SWITCH_POLL_SECONDS", "2")
            ),
            metrics_port=int(env.get("DEPLOYMENT_CLEANUP_METRICS_PORT", "8080")),
            identity=env.get("DEPLOYMENT_CLEANUP_IDENTITY", socket.gethostname()),
            static_discovery=env.get("DEPLOYMENT_CLEANUP_STATIC_DISCOVERY", "").lower() == "true",
        )


CONFIG = OperatorConfig.from_env()


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf's own bookkeeping goes to annotations under our prefix, so the status
    # schema stays ours alone.
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    # Events carry only what this operator posts deliberately (redacted), not kopf's log lines.
    settings.posting.level = logging.ERROR
    # Without RBAC to list CRDs and Namespaces, kopf would retry those listings for a minute
    # (reconciling nothing meanwhile in namespaced mode) before falling back to this anyway.
    settings.scanning.disabled = CONFIG.static_discovery
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 70
    kube = KubeApi(await asyncio.to_thread(load_kube_config))
    kill_switch = KillSwitch(
        CONFIG.kill_switch_namespace,
        CONFIG.kill_switch_name,
        max_age=max(30.0, 10 * CONFIG.kill_switch_poll_seconds),
    )
    await asyncio.to_thread(kill_switch.refresh, kube)
    memo["controller"] = Controller(kube, kill_switch, CONFIG.identity, utc_now)
    memo["kill_switch_poller"] = asyncio.create_task(_poll_kill_switch(kube, kill_switch))
    if CONFIG.metrics_port:
        serve_metrics(CONFIG.metrics_port)
    logger.info("deployment-cleanup operator %s started", CONFIG.identity)


async def _poll_kill_switch(kube: KubeApi, kill_switch: KillSwitch) -> None:
    while True:
        await asyncio.to_thread(kill_switch.refresh, kube)
        KILL_SWITCH.set(1 if kill_switch.on else 0)
        await asyncio.sleep(CONFIG.kill_switch_poll_seconds)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    poller = memo.get("kill_switch_poller")
    if poller is not None:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller


# A tick that fails (say, the API server is down while status is written) is
# retried at the next tick, not after kopf's default backoff of a minute.
@kopf.timer(API_GROUP, VERSION, PLURAL, interval=CONFIG.tick_seconds, backoff=CONFIG.tick_seconds)
async def reconcile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    controller: Controller = memo["controller"]

    def post(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message)

    await controller.tick(body, post)


# optional: no finalizer of its own, so a deletion never waits for this operator.
@kopf.on.delete(API_GROUP, VERSION, PLURAL, optional=True)
async def deleted(namespace: str | None, name: str | None, **_: Any) -> None:
    forget_cleanup(str(namespace), str(name), [str(o) for o in Outcome])
