"""The audit store and every write to the builds database.

Tables (names prefixed by ``spec.database.stateTablePrefix``) live in the
builds database itself, so that archiving a build and recording it happen in
one transaction:

* ``runs``: one row per run: plan id, state, counters.
* ``items``: the approved candidates of a run in plan order, with evidence and
  outcome (pending, archived, skipped, restored). An interrupted apply resumes
  from the pending items and can never reach a build outside them.
* ``audit``: append-only record of every archive and restore.
* ``locks``: one lease per cleanup with a fencing token; every archive batch
  checks its token inside its own transaction, so a stale replica cannot write.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    exists,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from .inventory import BuildsSchema, aware_utc
from .planning import BuildDecision, ReferenceCounts
from .runstate import RunKind, RunRecord, RunState

__all__ = [
    "ArchiveBatchResult",
    "Fence",
    "FencingLost",
    "LockHeld",
    "PendingItem",
    "RestoreResult",
    "StateStore",
]


class LockHeld(RuntimeError):
    """Another holder has a live lease on this cleanup."""


class FencingLost(RuntimeError):
    """Our lease was taken over: stop writing at once."""


@dataclass(frozen=True, slots=True)
class Fence:
    name: str
    holder: str
    token: int
    ttl: timedelta


@dataclass(frozen=True, slots=True)
class PendingItem:
    seq: int
    build_id: str
    project_id: str
    previous_status: str


@dataclass(frozen=True, slots=True)
class ArchiveBatchResult:
    archived: tuple[str, ...]
    skipped: dict[str, str]


@dataclass(frozen=True, slots=True)
class RestoreResult:
    restored: int
    already_restored: int
    conflicts: dict[str, str]


def _tables(prefix: str) -> tuple[MetaData, Table, Table, Table, Table]:
    md = MetaData()
    runs = Table(
        f"{prefix}runs",
        md,
        Column("id", String(64), primary_key=True),
        Column("cleanup", String(320), nullable=False, index=True),
        Column("kind", String(16), nullable=False),
        Column("plan_id", String(32), nullable=False),
        Column("state", String(16), nullable=False),
        Column("started_at", DateTime(timezone=True), nullable=False),
        Column("finished_at", DateTime(timezone=True)),
        Column("reference_count", Integer, nullable=False),
        Column("active_count", Integer, nullable=False),
        Column("routed_count", Integer, nullable=False),
        Column("candidates", Integer, nullable=False),
        Column("archived", Integer, nullable=False, default=0),
        Column("skipped", Integer, nullable=False, default=0),
        Column("restored", Integer, nullable=False, default=0),
        Column("message", Text, nullable=False, default=""),
    )
    items = Table(
        f"{prefix}items",
        md,
        Column("run_id", String(64), primary_key=True),
        Column("build_id", String(200), primary_key=True),
        Column("seq", Integer, nullable=False),
        Column("project_id", String(200), nullable=False),
        Column("previous_status", String(64), nullable=False),
        Column("outcome", String(16), nullable=False),
        Column("detail", Text),
        Column("evidence", Text, nullable=False),
        Index(f"{prefix}items_outcome", "run_id", "outcome", "seq"),
    )
    audit = Table(
        f"{prefix}audit",
        md,
        Column(
            "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
        Column("run_id", String(64), nullable=False, index=True),
        Column("build_id", String(200), nullable=False),
        Column("project_id", String(200), nullable=False),
        Column("action", String(16), nullable=False),
        Column("previous_status", String(64), nullable=False),
        Column("new_status", String(64), nullable=False),
        Column("at", DateTime(timezone=True), nullable=False),
        Column("fencing_token", Integer),
        Column("evidence", Text, nullable=False),
    )
    locks = Table(
        f"{prefix}locks",
        md,
        Column("name", String(320), primary_key=True),
        Column("holder", String(200), nullable=False),
        Column("token", Integer, nullable=False),
        Column("expires_at", DateTime(timezone=True), nullable=False),
    )
    return md, runs, items, audit, locks


def _chunks(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class StateStore:
    """Runs, items, audit and locks in the builds database."""

    def __init__(self, engine: Engine, schema: BuildsSchema) -> None:
        self.engine = engine
        self.schema = schema
        prefix = schema.spec.state_table_prefix
        self._md, self.runs, self.items, self.audit, self.locks = _tables(prefix)

    def ensure_tables(self) -> None:
        self._md.create_all(self.engine, checkfirst=True)

    # -- runs ---------------------------------------------------------------

    def _record(self, row: Any) -> RunRecord:
        return RunRecord(
            id=row.id,
            cleanup=row.cleanup,
            kind=RunKind(row.kind),
            plan_id=row.plan_id,
            state=RunState(row.state),
            started_at=aware_utc(row.started_at),
            finished_at=None if row.finished_at is None else aware_utc(row.finished_at),
            reference_count=row.reference_count,
            candidates=row.candidates,
            archived=row.archived,
            skipped=row.skipped,
            restored=row.restored,
            message=row.message,
        )

    def record_run(
        self,
        run_id: str,
        cleanup: str,
        kind: RunKind,
        plan_id: str,
        state: RunState,
        reference: ReferenceCounts,
        candidates: Sequence[BuildDecision],
        message: str,
        now: datetime,
    ) -> RunRecord:
        """Record a run and its candidates (with evidence) in one transaction."""
        outcome = "pending" if kind is RunKind.APPLY else "planned"
        finished = None if state is RunState.APPLYING else now
        with self.engine.begin() as conn:
            conn.execute(
                insert(self.runs).values(
                    id=run_id,
                    cleanup=cleanup,
                    kind=kind.value,
                    plan_id=plan_id,
                    state=state.value,
                    started_at=now,
                    finished_at=finished,
                    reference_count=reference.total,
                    active_count=reference.active,
                    routed_count=reference.routed,
                    candidates=len(candidates),
                    archived=0,
                    skipped=0,
                    restored=0,
                    message=message[:2000],
                )
            )
            rows = (
                (
                    run_id,
                    str(d.build.id),
                    seq,
                    str(d.build.project_id),
                    d.build.status,
                    outcome,
                    json.dumps(d.evidence(), sort_keys=True),
                )
                for seq, d in enumerate(candidates)
            )
            self._insert_items(conn, rows)
        run = self.get_run(run_id)
        assert run is not None
        return run

    _ITEM_COLUMNS = (
        "run_id",
        "build_id",
        "seq",
        "project_id",
        "previous_status",
        "outcome",
        "evidence",
    )

    def _insert_items(self, conn: Connection, rows: Iterable[tuple[object, ...]]) -> None:
        """Bulk insert: COPY on PostgreSQL (row-by-row INSERTs dominated big plans)."""
        if conn.dialect.name == "postgresql":
            columns = ", ".join(f'"{c}"' for c in self._ITEM_COLUMNS)
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            with cursor.copy(f'COPY "{self.items.name}" ({columns}) FROM STDIN') as copy:
                for row in rows:
                    copy.write_row(row)
            # Fresh statistics, or the planner walks the whole run for each batch's items.
            conn.exec_driver_sql(f'ANALYZE "{self.items.name}"')
            return
        keys = self._ITEM_COLUMNS
        for chunk in _chunks(list(rows), 5000):
            conn.execute(insert(self.items), [dict(zip(keys, row, strict=True)) for row in chunk])

    def get_run(self, run_id: str) -> RunRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(self.runs).where(self.runs.c.id == run_id)).first()
        return None if row is None else self._record(row)

    def list_runs(self, cleanup: str, limit: int = 20) -> list[RunRecord]:
        query = (
            select(self.runs)
            .where(self.runs.c.cleanup == cleanup)
            .order_by(self.runs.c.started_at.desc(), self.runs.c.id.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [self._record(r) for r in conn.execute(query)]

    def unfinished_apply(self, cleanup: str) -> RunRecord | None:
        query = (
            select(self.runs)
            .where(self.runs.c.cleanup == cleanup, self.runs.c.state == RunState.APPLYING.value)
            .order_by(self.runs.c.started_at)
            .limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else self._record(row)

    def last_successful_reference(self, cleanup: str) -> ReferenceCounts | None:
        """The reference counts of the latest run whose plan passed every check."""
        runs = self.runs.c
        query = (
            select(runs.active_count, runs.routed_count, runs.reference_count)
            .where(runs.cleanup == cleanup, runs.state != RunState.BLOCKED.value)
            .order_by(runs.started_at.desc(), runs.id.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else ReferenceCounts(*row)

    def finish_run(self, run_id: str, state: RunState, message: str, now: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(self.runs)
                .where(self.runs.c.id == run_id)
                .values(state=state.value, message=message[:2000], finished_at=now)
            )

    def prune_plan_items(self, cleanup: str, keep_runs: int) -> int:
        """Drop the items of all but the newest plan-only runs; apply runs are the audit trail."""
        keep = (
            select(self.runs.c.id)
            .where(self.runs.c.cleanup == cleanup, self.runs.c.kind == RunKind.PLAN.value)
            .order_by(self.runs.c.started_at.desc(), self.runs.c.id.desc())
            .limit(keep_runs)
        )
        old = select(self.runs.c.id).where(
            self.runs.c.cleanup == cleanup,
            self.runs.c.kind == RunKind.PLAN.value,
            self.runs.c.id.not_in(keep.scalar_subquery()),
        )
        with self.engine.begin() as conn:
            result = conn.execute(self.items.delete().where(self.items.c.run_id.in_(old)))
        return int(result.rowcount or 0)

    # -- apply --------------------------------------------------------------

    def pending_items(self, run_id: str, limit: int) -> list[PendingItem]:
        query = (
            select(
                self.items.c.seq,
                self.items.c.build_id,
                self.items.c.project_id,
                self.items.c.previous_status,
            )
            .where(self.items.c.run_id == run_id, self.items.c.outcome == "pending")
            .order_by(self.items.c.seq)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [PendingItem(*row) for row in conn.execute(query)]

    def archive_batch(
        self,
        run_id: str,
        batch: Sequence[PendingItem],
        *,
        routed_now: set[str],
        fence: Fence,
        now: datetime,
        routes_guard: Any = None,
    ) -> ArchiveBatchResult:
        """Archive one batch in one transaction, re-checking each build in the UPDATE itself.

        A build is archived only if, at this instant, it still has its planned
        status, is not its project's active build, its project still has an
        active build, and it is not in ``routed_now`` (a fresh routing lookup) or
        matched by ``routes_guard`` (a routes table in this same database).
        Anything else is skipped with the reason, never archived.
        """
        s = self.schema
        archived_status = s.spec.archived_status
        skipped: dict[str, str] = {
            b.build_id: "routed at the re-check" for b in batch if b.build_id in routed_now
        }
        todo = [b for b in batch if b.build_id not in routed_now]
        archived: list[str] = []
        with self.engine.begin() as conn:
            self._check_fence(conn, fence, now)
            by_status: dict[str, list[PendingItem]] = {}
            for item in todo:
                by_status.setdefault(item.previous_status, []).append(item)
            project_guard = exists().where(
                s.project_id == s.build_project,
                s.project_active.is_not(None),
                s.project_active != s.build_id,
            )
            for previous, items in by_status.items():
                conditions = [
                    s.build_id.in_([s.coerce_build_id(i.build_id) for i in items]),
                    s.build_status == previous,
                    project_guard,
                ]
                if routes_guard is not None:
                    conditions.append(~routes_guard)
                statement = (
                    update(s.builds)
                    .where(and_(*conditions))
                    .values({s.build_status: archived_status})
                    .returning(s.build_id)
                )
                archived.extend(str(v) for v in conn.execute(statement).scalars())
            done = set(archived)
            for item in todo:
                if item.build_id not in done:
                    skipped[item.build_id] = self._why_skipped(conn, item, routes_guard)
            if archived:
                # The audit rows are copied from the items on the server: one statement,
                # and the evidence never travels to this process and back.
                source = self.items.c
                audited = select(
                    source.run_id,
                    source.build_id,
                    source.project_id,
                    literal("archive"),
                    source.previous_status,
                    literal(archived_status),
                    literal(now, DateTime(timezone=True)),
                    literal(fence.token),
                    source.evidence,
                ).where(source.run_id == run_id, source.build_id.in_(archived))
                columns = [
                    "run_id",
                    "build_id",
                    "project_id",
                    "action",
                    "previous_status",
                    "new_status",
                    "at",
                    "fencing_token",
                    "evidence",
                ]
                conn.execute(insert(self.audit).from_select(columns, audited))
                conn.execute(
                    update(self.items)
                    .where(self.items.c.run_id == run_id, self.items.c.build_id.in_(archived))
                    .values(outcome="archived")
                )
            for build_id, why in skipped.items():
                conn.execute(
                    update(self.items)
                    .where(self.items.c.run_id == run_id, self.items.c.build_id == build_id)
                    .values(outcome="skipped", detail=why)
                )
            conn.execute(
                update(self.runs)
                .where(self.runs.c.id == run_id)
                .values(
                    archived=self.runs.c.archived + len(archived),
                    skipped=self.runs.c.skipped + len(skipped),
                )
            )
        return ArchiveBatchResult(tuple(archived), skipped)

    def _why_skipped(self, conn: Connection, item: PendingItem, routes_guard: Any) -> str:
        s = self.schema
        build_id = s.coerce_build_id(item.build_id)
        row = conn.execute(
            select(s.build_status, s.build_project).where(s.build_id == build_id)
        ).first()
        if row is None:
            return "the build no longer exists"
        if row[0] != item.previous_status:
            return f"its status changed from {item.previous_status!r} to {row[0]!r}"
        active = conn.execute(select(s.project_active).where(s.project_id == row[1])).first()
        if active is None or active[0] is None:
            return "its project no longer has a known active build"
        if str(active[0]) == item.build_id:
            return "it became its project's active build"
        if routes_guard is not None:
            return "it is routed now"
        return "it changed since the plan"

    # -- fencing ------------------------------------------------------------

    def acquire_lock(self, name: str, holder: str, ttl: timedelta, now: datetime) -> Fence:
        """Take (or renew) the lease for ``name``; each take-over raises the token."""
        with self.engine.begin() as conn:
            query = select(self.locks).where(self.locks.c.name == name)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update()
            row = conn.execute(query).first()
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            insert(self.locks).values(
                                name=name, holder=holder, token=1, expires_at=now + ttl
                            )
                        )
                except IntegrityError:
                    raise LockHeld(f"another process took the lock {name!r} just now") from None
                return Fence(name, holder, 1, ttl)
            if row.holder != holder and aware_utc(row.expires_at) > now:
                until = aware_utc(row.expires_at).isoformat()
                raise LockHeld(f"lock {name!r} is held by {row.holder} until {until}")
            token = int(row.token) + 1
            result = conn.execute(
                update(self.locks)
                .where(self.locks.c.name == name, self.locks.c.token == row.token)
                .values(holder=holder, token=token, expires_at=now + ttl)
            )
            if result.rowcount != 1:
                raise LockHeld(f"another process took the lock {name!r} just now")
            return Fence(name, holder, token, ttl)

    def _check_fence(self, conn: Connection, fence: Fence, now: datetime) -> None:
        # Matches only while our token is current, and renews the lease; on
        # PostgreSQL it also row-locks the lease until this batch commits.
        result = conn.execute(
            update(self.locks)
            .where(
                self.locks.c.name == fence.name,
                self.locks.c.token == fence.token,
                self.locks.c.holder == fence.holder,
            )
            .values(expires_at=now + fence.ttl)
        )
        if result.rowcount != 1:
            raise FencingLost(
                f"the lock {fence.name!r} was taken over (our token {fence.token} is stale); "
                "stopping without writing"
            )

    def release_lock(self, fence: Fence, now: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(self.locks)
                .where(
                    self.locks.c.name == fence.name,
                    self.locks.c.token == fence.token,
                )
                .values(expires_at=now)
            )

    # -- restore ------------------------------------------------------------

    def restore(
        self, run_id: str, build_ids: Sequence[str] | None, now: datetime, batch_size: int = 500
    ) -> RestoreResult:
        """Return a run's archived builds (or the chosen ones) to their previous status.

        Only builds still in the archived status are touched; one that someone
        changed since is reported as a conflict and left alone. Running it again
        restores nothing more.
        """
        s = self.schema
        archived_status = s.spec.archived_status
        with self.engine.connect() as conn:
            query = select(
                self.items.c.build_id,
                self.items.c.project_id,
                self.items.c.previous_status,
                self.items.c.outcome,
            ).where(self.items.c.run_id == run_id)
            if build_ids is not None:
                query = query.where(self.items.c.build_id.in_(list(build_ids)))
            rows = conn.execute(query).all()
        if build_ids is not None:
            unknown = sorted(set(build_ids) - {r.build_id for r in rows})
            if unknown:
                raise ValueError(f"builds not in run {run_id}: {', '.join(unknown[:10])}")
        todo = [r for r in rows if r.outcome == "archived"]
        already = sum(1 for r in rows if r.outcome == "restored")
        restored = 0
        conflicts: dict[str, str] = {}
        for chunk in _chunks(todo, batch_size):
            with self.engine.begin() as conn:
                by_status: dict[str, list[Any]] = {}
                for row in chunk:
                    by_status.setdefault(row.previous_status, []).append(row)
                done: set[str] = set()
                for previous, items in by_status.items():
                    statement = (
                        update(s.builds)
                        .where(
                            s.build_id.in_([s.coerce_build_id(r.build_id) for r in items]),
                            s.build_status == archived_status,
                        )
                        .values({s.build_status: previous})
                        .returning(s.build_id)
                    )
                    done.update(str(v) for v in conn.execute(statement).scalars())
                back = [r for r in chunk if r.build_id in done]
                if back:
                    conn.execute(
                        insert(self.audit),
                        [
                            {
                                "run_id": run_id,
                                "build_id": r.build_id,
                                "project_id": r.project_id,
                                "action": "restore",
                                "previous_status": archived_status,
                                "new_status": r.previous_status,
                                "at": now,
                                "fencing_token": None,
                                "evidence": "{}",
                            }
                            for r in back
                        ],
                    )
                    conn.execute(
                        update(self.items)
                        .where(
                            self.items.c.run_id == run_id,
                            self.items.c.build_id.in_([r.build_id for r in back]),
                        )
                        .values(outcome="restored")
                    )
                    conn.execute(
                        update(self.runs)
                        .where(self.runs.c.id == run_id)
                        .values(restored=self.runs.c.restored + len(back))
                    )
                for row in chunk:
                    if row.build_id not in done:
                        conflicts[row.build_id] = f"no longer {archived_status!r}: left as it is"
                restored += len(back)
        return RestoreResult(restored, already, conflicts)

    def audit_rows(self, run_id: str) -> list[dict[str, Any]]:
        query = select(self.audit).where(self.audit.c.run_id == run_id).order_by(self.audit.c.id)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
