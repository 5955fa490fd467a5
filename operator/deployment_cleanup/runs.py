"""One run end to end: scan, look up, plan, record, and (when approved) archive.

The I/O pieces come in through :class:`Connections`, made once by
:func:`connect` and closed by the caller, so the CLI and the operator share
every step and tests can hand in real servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets as random_tokens
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Engine, MetaData, Table, exists

from .archive import Fence, FencingLost, LockHeld, PendingItem, RestoreResult, StateStore
from .db import ConfigurationError, Redactor, SecretResolver, make_engine, resolve_url
from .inventory import BuildsSchema, ProjectBuilds, check_not_a_standby, reflect_builds_schema
from .planning import (
    BuildId,
    LookupReceipt,
    Plan,
    PlanBuilder,
    ReferenceCounts,
    RouteAnswer,
    classify_project,
    plan_settings,
)
from .recording import PlanRecorder
from .routing import HttpRouting, RoutingLookup, SqlRouting
from .runstate import RunKind, RunRecord, RunState
from .spec import DeploymentCleanup

__all__ = [
    "ApplyRequest",
    "Connections",
    "Outcome",
    "Progress",
    "RunResult",
    "RunRow",
    "apply",
    "connect",
    "make_plan",
    "new_run_id",
    "plan_and_record",
    "plan_and_record_run",
    "restore",
    "utc_now",
]

LOCK_TTL = timedelta(minutes=5)
RECORD_CHUNK = 5000
# Pending items read per query during an apply (several batches).
PENDING_PAGE = 1000
PLAN_RUNS_WITH_ITEMS = 10

Progress = Callable[[str, int, int, str | None], None]
"""Called as ``progress(phase, done, total, run_id)``; total is 0 when unknown."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_run_id(now: datetime) -> str:
    return f"r-{now:%Y%m%dT%H%M%S}-{random_tokens.token_hex(3)}"


@dataclass
class Connections:
    """The engines and the routing source one cleanup needs; close() releases the engines.

    HTTP clients live only inside ``async with conns.routing`` (one run), since
    they belong to the event loop that runs them.
    """

    cleanup: DeploymentCleanup
    engine: Engine
    schema: BuildsSchema
    store: StateStore
    routing: RoutingLookup
    redact: Redactor
    # A NOT EXISTS over a routes table in the builds database itself, so the
    # archive UPDATE re-checks routing atomically; None for other sources.
    routes_guard: Any = None
    _extra_engines: list[Engine] = field(default_factory=list)

    def close(self) -> None:
        self.engine.dispose()
        for engine in self._extra_engines:
            engine.dispose()


def connect(
    cleanup: DeploymentCleanup, secrets: SecretResolver, redact: Redactor | None = None
) -> Connections:
    """Resolve secrets, open engines and clients, and check the configured tables exist."""
    redact = redact or Redactor()
    spec = cleanup.spec
    url = resolve_url(spec.database.url, spec.database.url_secret_ref, secrets)
    redact.add(url)
    engine = make_engine(url)
    extra: list[Engine] = []
    try:
        schema = reflect_builds_schema(engine, spec.database)
        store = StateStore(engine, schema)
        routing: RoutingLookup
        guard = None
        if spec.routing.http is not None:
            ref = spec.routing.http.token_secret_ref
            token = None if ref is None else secrets.resolve(ref)
            routing = HttpRouting(spec.routing, token, redact)
        else:
            sql = spec.routing.sql
            assert sql is not None
            if sql.url is None and sql.url_secret_ref is None:
                routes_engine = engine
            else:
                routes_url = resolve_url(sql.url, sql.url_secret_ref, secrets)
                redact.add(routes_url)
                routes_engine = make_engine(routes_url)
                extra.append(routes_engine)
            routing = SqlRouting(spec.routing, routes_engine, redact)
            if routes_engine is engine:
                routes = Table(sql.table, MetaData(), schema=sql.db_schema, autoload_with=engine)
                guard = exists().where(routes.c[sql.build_id] == schema.build_id)
    except BaseException:
        engine.dispose()
        for e in extra:
            e.dispose()
        raise
    return Connections(cleanup, engine, schema, store, routing, redact, guard, extra)


@dataclass
class _Unit:
    """Whole projects whose builds are looked up together, in one or more batches."""

    groups: list[ProjectBuilds]
    tasks: list[asyncio.Task[tuple[LookupReceipt, dict[BuildId, RouteAnswer]]]]


def _units(groups: Iterator[ProjectBuilds], batch_size: int) -> Iterator[list[ProjectBuilds]]:
    """Whole projects packed into units of at most ``batch_size`` builds.

    A project larger than a batch gets a unit of its own, looked up in several
    batches; a project is never split across units, so it is decided once all
    of its answers are in.
    """
    unit: list[ProjectBuilds] = []
    size = 0
    for group in groups:
        if unit and size + len(group.builds) > batch_size:
            yield unit
            unit, size = [], 0
        unit.append(group)
        size += len(group.builds)
    if unit:
        yield unit


async def make_plan(
    conns: Connections,
    now: datetime,
    previous_reference: ReferenceCounts | None,
    progress: Progress | None = None,
) -> Plan:
    """Scan the inventory, look every build up, and decide. Writes nothing."""
    plan, _ = await _make_plan(conns, now, previous_reference, progress, None)
    return plan


@dataclass(frozen=True)
class RunRow:
    """How a finished plan is recorded: decided from the plan alone."""

    kind: RunKind
    state: RunState
    message: str


@dataclass(frozen=True)
class _Recording:
    run_id: str
    outcome: str  # the items' outcome as written: "pending" for an apply, else "planned"
    decide: Callable[[Plan], RunRow]


async def plan_and_record_run(
    conns: Connections,
    now: datetime,
    progress: Progress | None,
    outcome: str,
    decide: Callable[[Plan], RunRow],
) -> tuple[Plan, RunRow, RunRecord]:
    """Plan, recording candidates as they are found and the run row last (one transaction)."""
    store = conns.store
    await asyncio.to_thread(store.ensure_tables)
    previous = await asyncio.to_thread(store.last_successful_reference, conns.cleanup.key)
    recording = _Recording(new_run_id(now), outcome, decide)
    plan, row = await _make_plan(conns, now, previous, progress, recording)
    assert row is not None
    run = await asyncio.to_thread(store.get_run, recording.run_id)
    assert run is not None
    return plan, row, run


async def _make_plan(
    conns: Connections,
    now: datetime,
    previous_reference: ReferenceCounts | None,
    progress: Progress | None,
    recording: _Recording | None,
) -> tuple[Plan, RunRow | None]:
    """The plan, and with ``recording`` the row it was recorded as (see PlanRecorder)."""
    spec = conns.cleanup.spec
    routing = spec.routing
    builder = PlanBuilder(
        spec.safety,
        plan_settings(
            spec.retention, spec.safety, spec.database.archived_status, conns.schema.settings()
        ),
        previous_reference,
        keep_candidates=recording is None,
    )
    loop = asyncio.get_running_loop()
    # One thread owns the scan's connection (SQLite connections refuse other threads) and
    # the recorder's writes (see recording: on SQLite they share that connection).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inventory-scan") as scan_thread:
        conn = await loop.run_in_executor(scan_thread, conns.engine.connect)
        recorder: PlanRecorder | None = None
        row: RunRow | None = None
        try:
            await loop.run_in_executor(scan_thread, check_not_a_standby, conn)
            if recording is not None:
                recorder = await loop.run_in_executor(
                    scan_thread,
                    PlanRecorder,
                    conns.store,
                    conn,
                    recording.run_id,
                    conns.cleanup.key,
                    recording.outcome,
                    now,
                )
            units = _units(conns.schema.iter_project_builds(conn), routing.batch_size)
            async with conns.routing:
                receipts = await _lookup_and_classify(
                    conns, builder, units, scan_thread, now, progress, recorder
                )
            unscanned = await loop.run_in_executor(scan_thread, conns.schema.count_unscanned, conn)
            builder.note_unscanned(unscanned)
            plan = builder.finish(receipts)
            if recorder is not None and recording is not None:
                row = recording.decide(plan)
                await loop.run_in_executor(
                    scan_thread, recorder.finish, plan, row.kind, row.state, row.message
                )
        finally:
            # Closing without a commit rolls back whatever a failed plan had written.
            if recorder is not None:
                await loop.run_in_executor(scan_thread, recorder.close)
            await loop.run_in_executor(scan_thread, conn.close)
    return plan, row


def _next_unit(
    units: Iterator[list[ProjectBuilds]], recorder: PlanRecorder | None
) -> list[ProjectBuilds] | None:
    """On the scan thread: write queued candidates in chunks, then read the next unit."""
    if recorder is not None:
        recorder.flush(at_least=RECORD_CHUNK)
    return next(units, None)


async def _lookup_and_classify(
    conns: Connections,
    builder: PlanBuilder,
    units: Iterator[list[ProjectBuilds]],
    scan_thread: ThreadPoolExecutor,
    now: datetime,
    progress: Progress | None,
    recorder: PlanRecorder | None,
) -> list[LookupReceipt]:
    spec = conns.cleanup.spec
    routing = spec.routing
    loop = asyncio.get_running_loop()
    limit = asyncio.Semaphore(routing.concurrency)
    receipts: list[LookupReceipt] = []
    failed = 0
    next_index = 0
    looked_up = 0
    window: deque[_Unit] = deque()

    async def lookup(
        index: int, ids: list[BuildId]
    ) -> tuple[LookupReceipt, dict[BuildId, RouteAnswer]]:
        nonlocal failed
        async with limit:
            if failed >= routing.stop_after_failed_batches:
                return LookupReceipt(
                    index,
                    len(ids),
                    False,
                    0,
                    0.0,
                    f"not attempted: lookups stopped after {failed} failed batches",
                ), {}
            result = await conns.routing.lookup(index, ids)
            failed += 0 if result.receipt.ok else 1
            return result.receipt, result.answers

    async def drain_one() -> None:
        nonlocal looked_up
        unit = window.popleft()
        answers: dict[BuildId, RouteAnswer] = {}
        for task in unit.tasks:
            receipt, batch_answers = await task
            receipts.append(receipt)
            looked_up += receipt.size
            answers.update(batch_answers)
        for group in unit.groups:
            accepted = builder.add(
                classify_project(
                    group.project_id,
                    group.active_build_id,
                    group.project_known,
                    group.builds,
                    answers,
                    spec.retention,
                    now,
                )
            )
            if recorder is not None and accepted:
                recorder.add(accepted)
        if progress is not None:
            progress("lookups", looked_up, 0, None)

    # The scan runs ahead in its thread while lookups are in flight and answered units are
    # decided; both look-aheads are bounded, so memory stays flat.
    ahead = routing.concurrency * 2
    scanned: asyncio.Queue[list[ProjectBuilds] | BaseException | None] = asyncio.Queue()
    room = asyncio.Semaphore(ahead)

    async def scan_ahead() -> None:
        try:
            while True:
                await room.acquire()
                groups = await loop.run_in_executor(scan_thread, _next_unit, units, recorder)
                scanned.put_nowait(groups)
                if groups is None:
                    return
        except Exception as exc:  # handed to the consumer, which raises it
            scanned.put_nowait(exc)

    scanner = asyncio.ensure_future(scan_ahead())
    try:
        while True:
            item = await scanned.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                break
            room.release()
            ids = [b.id for group in item for b in group.builds]
            tasks = []
            for start in range(0, len(ids), routing.batch_size):
                batch = ids[start : start + routing.batch_size]
                tasks.append(asyncio.ensure_future(lookup(next_index, batch)))
                next_index += 1
            window.append(_Unit(item, tasks))
            while len(window) > ahead or (window and all(t.done() for t in window[0].tasks)):
                await drain_one()
        while window:
            await drain_one()
    finally:
        scanner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scanner
        for unit in window:  # a failed plan leaves no lookup running
            for task in unit.tasks:
                task.cancel()
    return receipts


class Outcome(StrEnum):
    SUCCEEDED = "Succeeded"
    BLOCKED = "Blocked"
    AWAITING_APPROVAL = "AwaitingApproval"
    STOPPED = "Stopped"
    FAILED = "Failed"
    # Another process holds this cleanup's archive lock and is doing the work.
    BUSY = "Busy"


@dataclass(frozen=True)
class RunResult:
    outcome: Outcome
    message: str
    plan: Plan | None = None
    run: RunRecord | None = None
    restore: RestoreResult | None = None
    # Stopped because ApplyRequest.stop_requested asked (the operator: the kill switch), not
    # by the apply's own checks (a skipping canary, a failed re-check lookup).
    stopped_on_request: bool = False


async def plan_and_record(
    conns: Connections, now: datetime, progress: Progress | None = None
) -> RunResult:
    """Plan, and record the plan (with each candidate's evidence) in the audit store."""

    def decide(plan: Plan) -> RunRow:
        state = RunState.PLANNED if plan.ready else RunState.BLOCKED
        return RunRow(RunKind.PLAN, state, plan.message)

    plan, _, run = await plan_and_record_run(conns, now, progress, "planned", decide)
    await asyncio.to_thread(conns.store.prune_plan_items, conns.cleanup.key, PLAN_RUNS_WITH_ITEMS)
    outcome = Outcome.SUCCEEDED if plan.ready else Outcome.BLOCKED
    return RunResult(outcome, plan.message, plan, run)


@dataclass(frozen=True)
class ApplyRequest:
    """What the caller approved: a plan id, or (only if every check passes) whatever is current."""

    approved_plan_id: str | None
    approve_current: bool = False
    holder: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{random_tokens.token_hex(4)}"
    )
    stop_requested: Callable[[], str | None] = lambda: None
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


async def apply(
    conns: Connections,
    request: ApplyRequest,
    clock: Callable[[], datetime] = utc_now,
    progress: Progress | None = None,
) -> RunResult:
    """Archive an approved plan, resuming an interrupted apply of this cleanup first.

    A new plan is computed from current data; it is archived only if it is
    ready and its id equals the approved one. Each batch is re-checked right
    before it is written (see StateStore.archive_batch).
    """
    async with conns.routing:
        return await _apply(conns, request, clock, progress)


async def _apply(
    conns: Connections,
    request: ApplyRequest,
    clock: Callable[[], datetime],
    progress: Progress | None,
) -> RunResult:
    store = conns.store
    key = conns.cleanup.key
    await asyncio.to_thread(store.ensure_tables)
    unfinished = await asyncio.to_thread(store.unfinished_apply, key)
    if unfinished is not None:
        return await _execute(conns, unfinished, request, clock, progress, resumed=True)

    def decide(plan: Plan) -> RunRow:
        if not plan.ready:
            return RunRow(RunKind.APPLY, RunState.BLOCKED, plan.message)
        # Nothing to archive needs no approval: an applied plan's successor is usually empty.
        if not plan.candidate_count:
            return RunRow(RunKind.APPLY, RunState.SUCCEEDED, plan.message)
        approved = request.approved_plan_id
        if not request.approve_current and approved != plan.id:
            if approved is None:
                message = f"plan {plan.id} is ready and waits for approval of that id"
            else:
                message = (
                    f"the approved plan {approved} no longer matches the data: the current plan "
                    f"is {plan.id}, which needs its own approval; nothing was archived"
                )
            return RunRow(RunKind.PLAN, RunState.PLANNED, message)
        return RunRow(RunKind.APPLY, RunState.APPLYING, "applying")

    plan, row, run = await plan_and_record_run(conns, clock(), progress, "pending", decide)
    if row.state is RunState.BLOCKED:
        return RunResult(Outcome.BLOCKED, row.message, plan, run)
    if row.state is RunState.SUCCEEDED:
        return RunResult(Outcome.SUCCEEDED, row.message, plan, run)
    if row.state is RunState.PLANNED:
        return RunResult(Outcome.AWAITING_APPROVAL, row.message, plan, run)
    result = await _execute(conns, run, request, clock, progress, resumed=False)
    return RunResult(
        result.outcome,
        result.message,
        plan,
        result.run,
        stopped_on_request=result.stopped_on_request,
    )


async def _recheck_routing(
    conns: Connections, batch: list[PendingItem]
) -> tuple[set[str], str | None]:
    """A fresh routing lookup for one batch: (ids routed now, error or None)."""
    if conns.routes_guard is not None:
        return set(), None  # checked inside the UPDATE itself
    ids = [conns.schema.coerce_build_id(i.build_id) for i in batch]
    result = await conns.routing.lookup(-1, ids)
    if not result.receipt.ok:
        return set(), result.receipt.error
    return {str(b) for b, answer in result.answers.items() if answer.routed}, None


async def _execute(
    conns: Connections,
    run: RunRecord,
    request: ApplyRequest,
    clock: Callable[[], datetime],
    progress: Progress | None,
    *,
    resumed: bool,
) -> RunResult:
    store = conns.store
    execution = conns.cleanup.spec.execution
    try:
        fence: Fence = await asyncio.to_thread(
            store.acquire_lock, conns.cleanup.key, request.holder, LOCK_TTL, clock()
        )
    except LockHeld as exc:
        return RunResult(Outcome.BUSY, f"not applying: {exc}", run=run)
    state, message = RunState.SUCCEEDED, ""
    stopped_on_request = False
    # The canary goes first whenever nothing was written yet, resumed or not.
    first = run.archived == 0 and run.skipped == 0
    done = run.archived + run.skipped
    # Pending items are read a page ahead (in plan order) rather than one query per batch:
    # only the holder of the lease changes them, and every batch re-checks the lease.
    pending: deque[PendingItem] = deque()
    last_seq: int | None = None
    try:
        while True:
            reason = request.stop_requested()
            if reason is not None:
                state, message = RunState.STOPPED, f"stopped before a batch: {reason}"
                stopped_on_request = True
                break
            size = execution.canary_batch_size if first else execution.batch_size
            if len(pending) < size:
                page = await asyncio.to_thread(
                    store.pending_items, run.id, max(size, PENDING_PAGE), last_seq
                )
                if page:
                    pending.extend(page)
                    last_seq = page[-1].seq
            batch = [pending.popleft() for _ in range(min(size, len(pending)))]
            if not batch:
                break
            routed_now, error = await _recheck_routing(conns, batch)
            if error is not None:
                state, message = (
                    RunState.STOPPED,
                    f"the re-check lookup failed, nothing more archived: {error}",
                )
                break
            result = await asyncio.to_thread(
                store.archive_batch,
                run.id,
                batch,
                routed_now=routed_now,
                fence=fence,
                now=clock(),
                routes_guard=conns.routes_guard,
            )
            # Counted here rather than read back: one query less per batch.
            done += len(result.archived) + len(result.skipped)
            if progress is not None:
                progress("archive", done, run.candidates, run.id)
            if first and result.skipped:
                state = RunState.STOPPED
                message = (
                    f"the canary batch skipped {len(result.skipped)} builds that changed since "
                    "the plan; stopped so a fresh plan can be made"
                )
                break
            first = False
            pause = execution.pause_between_batches.total_seconds()
            if pause:
                await request.sleep(pause)
    except FencingLost as exc:
        # Whoever took the lease over finishes this run; this process just stops writing.
        return RunResult(Outcome.BUSY, str(exc), run=await asyncio.to_thread(store.get_run, run.id))
    final = await asyncio.to_thread(store.get_run, run.id)
    assert final is not None
    if state is RunState.SUCCEEDED:
        message = (
            f"{'resumed and ' if resumed else ''}archived {final.archived} builds, "
            f"skipped {final.skipped} that changed since the plan"
        )
    await asyncio.to_thread(store.finish_run, run.id, state, message, clock())
    await asyncio.to_thread(store.release_lock, fence, clock())
    final = await asyncio.to_thread(store.get_run, run.id)
    outcome = Outcome.SUCCEEDED if state is RunState.SUCCEEDED else Outcome.STOPPED
    return RunResult(outcome, message, run=final, stopped_on_request=stopped_on_request)


async def restore(
    conns: Connections, run_id: str, build_ids: list[str] | None, now: datetime
) -> RunResult:
    """Put a run's archived builds (or the chosen ones) back to their previous status."""
    store = conns.store
    await asyncio.to_thread(store.ensure_tables)
    run = await asyncio.to_thread(store.get_run, run_id)
    if run is None or run.cleanup != conns.cleanup.key:
        raise ConfigurationError(f"no run {run_id!r} of cleanup {conns.cleanup.key}")
    result = await asyncio.to_thread(store.restore, run_id, build_ids, now)
    message = f"restored {result.restored} builds of run {run_id}"
    if result.already_restored:
        message += f"; {result.already_restored} were already restored"
    if result.conflicts:
        message += f"; {len(result.conflicts)} were changed by someone else and left alone"
    final = await asyncio.to_thread(store.get_run, run_id)
    return RunResult(Outcome.SUCCEEDED, message, run=final, restore=result)
