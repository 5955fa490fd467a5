"""One reconcile tick for one DeploymentCleanup: decide, act through the engine, report.

Called by the kopf timer (see handlers.py) with the resource as it is now.
The decision is :func:`reconcile.next_step` (pure); this module does the I/O
around it: connections, the engine run, the status subresource, Events,
metrics and webhook notifications. Every message that leaves goes through the
run's Redactor, so no secret reaches status, Events or logs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .archive import RestoreResult
from .db import Redactor
from .kube import KillSwitch, KubeApi, KubeSecrets, KubeUnavailable, unavailable
from .metrics import (
    BUILDS_ARCHIVED,
    BUILDS_RESTORED,
    LAST_SUCCESS,
    LOOKUP_BATCHES_FAILED,
    RUN_DURATION,
    RUNS,
    STATUS_WRITES,
)
from .notify import send_webhook
from .reconcile import Action, Step, failure_backoff, next_step, parse_time
from .runs import (
    ApplyRequest,
    Connections,
    Outcome,
    RunResult,
    apply,
    connect,
    plan_and_record,
    restore,
)
from .runstate import RunKind, RunRecord, RunState
from .spec import DeploymentCleanup, NotifyOn, SpecError, parse_cleanup
from .status import build_status, condition, timestamp

__all__ = ["Controller", "EventPoster"]

logger = logging.getLogger(__name__)

EventPoster = Callable[[str, str, str], None]
"""``post(type, reason, message)``: a Kubernetes Event on the resource."""

PROGRESS_STEPS = 10  # status writes while archiving, whatever the inventory size

_EVENTS: dict[Outcome, tuple[str, str]] = {
    Outcome.SUCCEEDED: ("Normal", "Planned"),
    Outcome.BLOCKED: ("Warning", "Blocked"),
    Outcome.AWAITING_APPROVAL: ("Normal", "AwaitingApproval"),
    Outcome.STOPPED: ("Warning", "Stopped"),
    Outcome.FAILED: ("Warning", "Failed"),
}


@dataclass
class Controller:
    """What every tick shares: the Kubernetes API, the kill switch, this operator's identity."""

    kube: KubeApi
    kill_switch: KillSwitch
    identity: str
    clock: Callable[[], datetime]
    # Resources (by uid) checked for an interrupted apply since this process started.
    _checked: set[str] = field(default_factory=set)

    async def tick(self, body: Mapping[str, Any], post: EventPoster) -> None:
        meta = body.get("metadata", {})
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        status: Mapping[str, Any] = body.get("status") or {}
        generation = int(meta.get("generation") or 1)
        now = self.clock()
        try:
            cleanup = parse_cleanup(
                {k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec")}
            )
        except SpecError as exc:
            await self._invalid(namespace, name, generation, status, str(exc), now, post)
            return
        uid = str(meta.get("uid"))
        resume = uid not in self._checked
        step = next_step(
            cleanup.spec,
            generation=generation,
            created=parse_time(meta.get("creationTimestamp")) or now,
            status=status,
            annotations=meta.get("annotations") or {},
            now=now,
            kill_switch=self.kill_switch.on,
        )
        if step.action is Action.NONE and not resume:
            await self._note_idle(cleanup, status, step)
            return
        if step.action is Action.SKIP_MISSED:
            assert step.slot is not None
            post("Warning", "MissedSchedule", step.reason)
            await self._patch(cleanup, {"schedule": self._schedule(step, status, step.slot)})
            return
        await self._act(cleanup, step, status, resume, post)
        self._checked.add(uid)

    # -- acting -------------------------------------------------------------

    async def _act(
        self,
        cleanup: DeploymentCleanup,
        step: Step,
        status: Mapping[str, Any],
        resume: bool,
        post: EventPoster,
    ) -> None:
        redact = Redactor()
        labels = {"namespace": cleanup.metadata.namespace, "name": cleanup.metadata.name}
        started = time.monotonic()
        conns: Connections | None = None
        try:
            secrets = KubeSecrets(self.kube, cleanup.metadata.namespace)
            conns = await asyncio.to_thread(connect, cleanup, secrets, redact)
            if resume and step.action is Action.NONE:
                unfinished = await asyncio.to_thread(conns.store.unfinished_apply, cleanup.key)
                if unfinished is None:
                    await self._note_idle(cleanup, status, step)
                    return
                step = Step(Action.APPLY, f"resuming the interrupted apply {unfinished.id}")
            if step.action is Action.RESTORE:
                assert step.restore_run is not None
                await self._restore(cleanup, conns, step.restore_run, post, labels)
                return
            result = await self._run(cleanup, conns, step)
            history = await asyncio.to_thread(conns.store.list_runs, cleanup.key)
        except Exception as exc:  # every failure becomes a Failed status, an Event and a retry
            message = redact(f"{type(exc).__name__}: {exc}")[:1000]
            if unavailable(exc):
                # The API server is away (restarting, overloaded): not this run's fault, so no
                # Failed status and no growing backoff; kopf retries at the next tick.
                logger.warning("%s: Kubernetes API unavailable: %s", cleanup.key, message)
                raise KubeUnavailable(message) from None
            logger.warning("%s: run failed: %s", cleanup.key, message)
            await self._failed(cleanup, status, message, post, labels)
            return
        finally:
            if conns is not None:
                conns.close()
        if result.outcome is Outcome.BUSY:
            # Another replica holds the archive lock and reports its own run.
            logger.info("%s: %s", cleanup.key, redact(result.message))
            return
        RUN_DURATION.labels(**labels).observe(time.monotonic() - started)
        await self._report(cleanup, step, status, result, history, redact, post, labels)

    async def _run(self, cleanup: DeploymentCleanup, conns: Connections, step: Step) -> RunResult:
        progress = _ProgressWriter(self, cleanup)
        try:
            if step.action is Action.APPLY:
                request = ApplyRequest(
                    approved_plan_id=step.approved_plan_id,
                    approve_current=step.approve_current,
                    holder=self.identity,
                    stop_requested=self.kill_switch.reason,
                )
                return await apply(conns, request, self.clock, progress)
            return await plan_and_record(conns, self.clock(), progress)
        finally:
            await progress.flush()

    async def _restore(
        self,
        cleanup: DeploymentCleanup,
        conns: Connections,
        run_id: str,
        post: EventPoster,
        labels: dict[str, str],
    ) -> None:
        now = self.clock()
        try:
            result = await restore(conns, run_id, None, now)
        except Exception as exc:
            message = conns.redact(f"{type(exc).__name__}: {exc}")[:1000]
            post("Warning", "RestoreFailed", f"restore of run {run_id} failed: {message}")
            await self._patch(
                cleanup, {"lastRestore": {"runId": run_id, "error": message, "at": timestamp(now)}}
            )
            return
        restored: RestoreResult | None = result.restore
        assert restored is not None
        BUILDS_RESTORED.labels(**labels).inc(restored.restored)
        post("Normal", "Restored", result.message)
        history = await asyncio.to_thread(conns.store.list_runs, cleanup.key)
        await self._patch(
            cleanup,
            {
                "lastRestore": {
                    "runId": run_id,
                    "restored": restored.restored,
                    "conflicts": len(restored.conflicts),
                    "at": timestamp(now),
                },
                "history": build_status(
                    generation=cleanup.metadata.generation,
                    now=now,
                    outcome="Succeeded",
                    message="",
                    plan=None,
                    run=None,
                    history=history,
                )["history"],
            },
        )

    # -- reporting ----------------------------------------------------------

    async def _report(
        self,
        cleanup: DeploymentCleanup,
        step: Step,
        previous: Mapping[str, Any],
        result: RunResult,
        history: list[RunRecord],
        redact: Redactor,
        post: EventPoster,
        labels: dict[str, str],
    ) -> None:
        now = self.clock()
        message = redact(result.message)
        status = build_status(
            generation=cleanup.metadata.generation,
            now=now,
            outcome=str(result.outcome),
            message=message,
            plan=result.plan,
            run=result.run,
            history=history,
            previous=previous,
        )
        status["failure"] = None
        status["killSwitch"] = self.kill_switch.on
        status["schedule"] = self._schedule(step, previous, step.slot)
        # An apply held back by the kill switch (only planned, or stopped between batches on
        # its request) runs again once it is off; one that stopped on its own checks does not.
        held = step.held_by_kill_switch or result.stopped_on_request
        status["heldApply"] = {"generation": cleanup.metadata.generation} if held else None
        await self._patch(cleanup, status)

        RUNS.labels(**labels, outcome=str(result.outcome)).inc()
        if result.plan is not None:
            LOOKUP_BATCHES_FAILED.labels(**labels).inc(len(result.plan.failed_receipts))
        run = result.run
        archived = run.archived if run is not None and run.kind is RunKind.APPLY else 0
        if archived:
            BUILDS_ARCHIVED.labels(**labels).inc(archived)
        if result.outcome is Outcome.SUCCEEDED:
            LAST_SUCCESS.labels(**labels).set(now.timestamp())
        kind, reason = _EVENTS[result.outcome]
        if result.outcome is Outcome.SUCCEEDED and run is not None and run.kind is RunKind.APPLY:
            reason = "Archived"
        post(kind, reason, message)

        notify = {
            Outcome.BLOCKED: NotifyOn.BLOCKED,
            Outcome.STOPPED: NotifyOn.BLOCKED,
            Outcome.FAILED: NotifyOn.FAILED,
        }.get(result.outcome)
        if reason == "Archived":
            notify = NotifyOn.APPLIED
        await self._notify(cleanup, notify, f"{cleanup.key}: {reason}: {message}", redact)

    async def _notify(
        self, cleanup: DeploymentCleanup, event: NotifyOn | None, text: str, redact: Redactor
    ) -> None:
        webhook = cleanup.spec.notifications.webhook
        if webhook is None or event is None or event not in webhook.events:
            return
        try:
            url = await asyncio.to_thread(
                KubeSecrets(self.kube, cleanup.metadata.namespace).resolve, webhook.url_secret_ref
            )
        except Exception as exc:
            logger.warning("%s: no webhook URL: %s", cleanup.key, redact(str(exc)))
            return
        redact.add(url)
        await send_webhook(url, text, redact)

    async def _failed(
        self,
        cleanup: DeploymentCleanup,
        previous: Mapping[str, Any],
        message: str,
        post: EventPoster,
        labels: dict[str, str],
    ) -> None:
        now = self.clock()
        generation = cleanup.metadata.generation
        old = previous.get("failure") or {}
        count = int(old.get("count", 0)) + 1 if old.get("generation") == generation else 1
        retry = now + failure_backoff(count)
        conditions = [
            condition(
                "Ready", False, "Failed", message, now, generation, previous.get("conditions") or []
            ),
        ]
        await self._patch(
            cleanup,
            {
                "conditions": _merge_conditions(previous.get("conditions") or [], conditions),
                "failure": {
                    "generation": generation,
                    "count": count,
                    "message": message,
                    "nextAttemptAt": timestamp(retry),
                },
            },
        )
        RUNS.labels(**labels, outcome=str(Outcome.FAILED)).inc()
        post("Warning", "Failed", f"{message} (attempt {count}; next at {timestamp(retry)})")
        redact = Redactor()
        await self._notify(cleanup, NotifyOn.FAILED, f"{cleanup.key}: Failed: {message}", redact)

    async def _invalid(
        self,
        namespace: str,
        name: str,
        generation: int,
        status: Mapping[str, Any],
        message: str,
        now: datetime,
        post: EventPoster,
    ) -> None:
        if status.get("observedGeneration") == generation:
            return  # already reported for this generation
        conditions = [
            condition(
                "Ready",
                False,
                "InvalidSpec",
                message,
                now,
                generation,
                status.get("conditions") or [],
            )
        ]
        patch = {
            "observedGeneration": generation,
            "conditions": _merge_conditions(status.get("conditions") or [], conditions),
        }
        await self._patch_named(namespace, name, patch)
        post("Warning", "InvalidSpec", message[:1000])

    async def _note_idle(
        self, cleanup: DeploymentCleanup, status: Mapping[str, Any], step: Step
    ) -> None:
        """Keep the cheap status fields current without writing on every tick."""
        schedule = self._schedule(step, status, None)
        kill = self.kill_switch.on
        # The API server drops null fields, so compare without them.
        unchanged = _without_nulls(schedule) == _without_nulls(status.get("schedule"))
        if not unchanged or bool(status.get("killSwitch")) != kill:
            await self._patch(cleanup, {"schedule": schedule, "killSwitch": kill})

    def _schedule(
        self, step: Step, status: Mapping[str, Any], slot: datetime | None
    ) -> dict[str, Any] | None:
        old = status.get("schedule") or {}
        last = timestamp(slot) if slot is not None else old.get("lastScheduleTime")
        nxt = None if step.next_schedule_time is None else timestamp(step.next_schedule_time)
        if last is None and nxt is None:
            return None
        return {"lastScheduleTime": last, "nextScheduleTime": nxt}

    async def _patch(self, cleanup: DeploymentCleanup, status: Mapping[str, Any]) -> None:
        await self._patch_named(cleanup.metadata.namespace, cleanup.metadata.name, status)

    async def _patch_named(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        STATUS_WRITES.labels(namespace=namespace, name=name).inc()
        await asyncio.to_thread(self.kube.patch_status, namespace, name, status)


def _without_nulls(value: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (value or {}).items() if v is not None}


def _merge_conditions(
    old: list[Mapping[str, Any]], new: list[dict[str, Any]]
) -> list[Mapping[str, Any]]:
    """Replace conditions of the same type, keep the others (a merge patch replaces lists)."""
    types = {c["type"] for c in new}
    return [c for c in old if c.get("type") not in types] + new


class _ProgressWriter:
    """Writes apply progress to status at most PROGRESS_STEPS times, off the event loop."""

    def __init__(self, controller: Controller, cleanup: DeploymentCleanup) -> None:
        self.controller = controller
        self.cleanup = cleanup
        self.step = -1
        self.pending: list[asyncio.Task[None]] = []

    def __call__(self, phase: str, done: int, total: int, run_id: str | None) -> None:
        if phase != "archive" or not total or run_id is None:
            return
        step = done * PROGRESS_STEPS // total
        if step == self.step:
            return
        self.step = step
        patch = {
            "run": {
                "id": run_id,
                "kind": str(RunKind.APPLY),
                "state": str(RunState.APPLYING),
                "candidates": total,
                "pending": total - done,
            }
        }
        self.pending.append(asyncio.ensure_future(self.controller._patch(self.cleanup, patch)))

    async def flush(self) -> None:
        # A failed progress write must not fail the run: the final write follows.
        for task in self.pending:
            try:
                await task
            except Exception as exc:
                logger.info("progress status write failed: %s", type(exc).__name__)
