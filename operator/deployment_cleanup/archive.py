"""The audit store and every write to the builds database but a plan's items.

Tables (names prefixed by ``spec.database.stateTablePrefix``) live in the
builds database itself, so that archiving a build and recording it happen in
one transaction:

* ``runs``: one row per run: plan id, state, counters.
* ``items``: the candidates of a run in plan order, with evidence and outcome
  (planned for a plan-only run; pending, archived, skipped, restored for an
  apply), written while the plan is made (see recording). An interrupted apply
  resumes from the pending items and can never reach a build outside them.
* ``audit``: append-only record of every archive and restore.
* ``locks``: one lease per cleanup with a fencing token; every archive batch
  checks its token inside its own transaction, so a stale replica cannot write.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
    any_,
    bindparam,
    exists,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.types import NullType

from .inventory import BuildsSchema, aware_utc
from .planning import ReferenceCounts
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


_AUDIT_COLUMNS = [
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


def _chunks(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class _BatchStatements:
    """The statements of archive and restore batches, built once and only bound per batch.

    Building, hashing and compiling a new SQLAlchemy statement for every batch (with a
    bind parameter per build of an IN list) cost more than the database spent executing
    it. These are built once per store and routes guard; each batch binds values.

    PostgreSQL gets a batch as three arrays (ids, planned statuses, the ids as the items
    store them), so the text never changes and the whole batch is one statement. Other
    databases (SQLite) run the same steps one statement at a time.
    """

    def __init__(
        self,
        schema: BuildsSchema,
        tables: tuple[Table, Table, Table, Table],
        routes_guard: Any,
    ) -> None:
        runs, items, audit, locks = tables
        self.schema = schema
        self.routes_guard = routes_guard
        s = schema
        archived_status = s.spec.archived_status
        item = items.c
        run = bindparam("b_run", type_=item.run_id.type)
        now = bindparam("b_now", type_=DateTime(timezone=True))
        token = bindparam("b_token", type_=Integer)
        keys_in = item.build_id.in_(bindparam("b_keys", expanding=True))

        self.fence = (
            update(locks)
            .where(
                locks.c.name == bindparam("f_name", type_=locks.c.name.type),
                locks.c.token == bindparam("f_token", type_=locks.c.token.type),
                locks.c.holder == bindparam("f_holder", type_=locks.c.holder.type),
            )
            .values(expires_at=bindparam("f_expires", type_=locks.c.expires_at.type))
        )
        guard = [
            exists().where(
                s.project_id == s.build_project,
                s.project_active.is_not(None),
                s.project_active != s.build_id,
            )
        ]
        if routes_guard is not None:
            guard.append(~routes_guard)

        # -- archive, one statement at a time
        self.archive_builds = (
            update(s.builds)
            .where(
                s.build_id.in_(bindparam("b_ids", expanding=True)),
                s.build_status == bindparam("b_status", type_=s.build_status.type),
                *guard,
            )
            .values({s.build_status: archived_status})
            .returning(s.build_id)
        )
        # The audit rows are copied from the items on the server: the evidence never
        # travels to this process and back.
        self.audit_archived = insert(audit).from_select(
            _AUDIT_COLUMNS,
            select(
                item.run_id,
                item.build_id,
                item.project_id,
                literal("archive"),
                item.previous_status,
                literal(archived_status),
                now,
                token,
                item.evidence,
            ).where(item.run_id == run, keys_in),
        )
        self.items_archived = (
            update(items).where(item.run_id == run, keys_in).values(outcome="archived")
        )
        self.count_archived = (
            update(runs)
            .where(runs.c.id == run)
            .values(
                archived=runs.c.archived + bindparam("b_archived", type_=Integer),
                skipped=runs.c.skipped + bindparam("b_skipped", type_=Integer),
            )
        )
        self.mark_skipped = (
            update(items)
            .where(
                item.run_id == run,
                item.build_id == bindparam("b_key", type_=item.build_id.type),
            )
            .values(outcome="skipped", detail=bindparam("b_why", type_=Text))
        )

        # -- restore, one statement at a time
        self.restore_builds = (
            update(s.builds)
            .where(
                s.build_id.in_(bindparam("b_ids", expanding=True)),
                s.build_status == archived_status,
            )
            .values({s.build_status: bindparam("b_status", type_=s.build_status.type)})
            .returning(s.build_id)
        )
        self.audit_restored = insert(audit).from_select(
            [c for c in _AUDIT_COLUMNS if c != "fencing_token"],
            select(
                item.run_id,
                item.build_id,
                item.project_id,
                literal("restore"),
                literal(archived_status),
                item.previous_status,
                now,
                literal("{}"),
            ).where(item.run_id == run, keys_in),
        )
        self.items_restored = (
            update(items).where(item.run_id == run, keys_in).values(outcome="restored")
        )
        self.count_restored = (
            update(runs)
            .where(runs.c.id == run)
            .values(restored=runs.c.restored + bindparam("b_restored", type_=Integer))
        )

        # -- PostgreSQL: each batch in one statement. The arrays are cast to the columns'
        # types, so a column whose type could not be reflected takes the path above.
        self.single_statement = not any(
            isinstance(c.type, NullType) for c in (s.build_id, s.build_status)
        )
        ids = bindparam("b_ids", type_=ARRAY(s.build_id.type))
        planned = (
            func.unnest(
                ids,
                bindparam("b_statuses", type_=ARRAY(s.build_status.type)),
                bindparam("b_keys", type_=ARRAY(item.build_id.type)),
            )
            .table_valued("id", "status", "key")
            .render_derived(name="planned")
        )
        # builds.id = ANY(ids) lets the planner use the primary key rather than hash the
        # whole builds table against the batch.
        matched = [s.build_id == any_(ids), s.build_id == planned.c.id]

        archived = (
            update(s.builds)
            .where(*matched, s.build_status == planned.c.status, *guard)
            .values({s.build_status: archived_status})
            .returning(planned.c.key)
            .cte("archived")
        )
        moved = (
            update(items)
            .where(item.run_id == run, item.build_id.in_(select(archived.c.key)))
            .values(outcome="archived")
            .returning(
                item.run_id, item.build_id, item.project_id, item.previous_status, item.evidence
            )
            .cte("moved")
        )
        audited = insert(audit).from_select(
            _AUDIT_COLUMNS,
            select(
                moved.c.run_id,
                moved.c.build_id,
                moved.c.project_id,
                literal("archive"),
                moved.c.previous_status,
                literal(archived_status),
                now,
                token,
                moved.c.evidence,
            ),
        )
        moved_count = select(func.count()).select_from(moved).scalar_subquery()
        counted = (
            update(runs)
            .where(runs.c.id == run)
            .values(
                archived=runs.c.archived + moved_count,
                skipped=runs.c.skipped + (bindparam("b_size", type_=Integer) - moved_count),
            )
        )
        # Each archived build with the number of items moved (the items' primary key makes
        # that one per build): a build without its item would have no audit row.
        self.archive_postgresql_statement = select(archived.c.key, moved_count).add_cte(
            audited.cte("audited"), counted.cte("counted")
        )

        back = (
            update(s.builds)
            .where(*matched, s.build_status == archived_status)
            .values({s.build_status: planned.c.status})
            .returning(planned.c.key)
            .cte("restored")
        )
        returned = (
            update(items)
            .where(item.run_id == run, item.build_id.in_(select(back.c.key)))
            .values(outcome="restored")
            .returning(item.run_id, item.build_id, item.project_id, item.previous_status)
            .cte("returned")
        )
        audited_back = insert(audit).from_select(
            [c for c in _AUDIT_COLUMNS if c != "fencing_token"],
            select(
                returned.c.run_id,
                returned.c.build_id,
                returned.c.project_id,
                literal("restore"),
                literal(archived_status),
                returned.c.previous_status,
                now,
                literal("{}"),
            ),
        )
        returned_count = select(func.count()).select_from(returned).scalar_subquery()
        counted_back = (
            update(runs).where(runs.c.id == run).values(restored=runs.c.restored + returned_count)
        )
        self.restore_postgresql_statement = select(back.c.key, returned_count).add_cte(
            audited_back.cte("audited"), counted_back.cte("counted")
        )

    def _arrays(self, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
        return {
            "b_ids": [self.schema.coerce_build_id(key) for key, _ in pairs],
            "b_statuses": [status for _, status in pairs],
            "b_keys": [key for key, _ in pairs],
        }

    @staticmethod
    def _keys_with_items(run_id: str, rows: Sequence[Any]) -> set[str]:
        """The changed builds' keys, once the items changed with them are counted."""
        if rows and rows[0][1] != len(rows):
            raise RuntimeError(
                f"run {run_id}: {len(rows)} builds changed but {rows[0][1]} items; rolled back"
            )
        return {str(key) for key, _ in rows}

    def archive_postgresql(
        self,
        conn: Connection,
        run_id: str,
        todo: Sequence[PendingItem],
        batch_size: int,
        fence: Fence,
        now: datetime,
    ) -> set[str]:
        """Guarded UPDATE, items, audit rows and the run's counters, in one statement."""
        params = self._arrays([(i.build_id, i.previous_status) for i in todo])
        params |= {"b_run": run_id, "b_now": now, "b_token": fence.token, "b_size": batch_size}
        rows = conn.execute(self.archive_postgresql_statement, params).all()
        return self._keys_with_items(run_id, rows)

    def archive_generic(
        self,
        conn: Connection,
        run_id: str,
        todo: Sequence[PendingItem],
        fence: Fence,
        now: datetime,
    ) -> set[str]:
        """One guarded UPDATE per planned status, then the audit rows and the items."""
        by_status: dict[str, list[Any]] = {}
        for i in todo:
            by_status.setdefault(i.previous_status, []).append(
                self.schema.coerce_build_id(i.build_id)
            )
        archived: set[str] = set()
        for previous, ids in by_status.items():
            result = conn.execute(self.archive_builds, {"b_ids": ids, "b_status": previous})
            archived.update(str(v) for v in result.scalars())
        if archived:
            keys = [i.build_id for i in todo if i.build_id in archived]
            self._copy_and_mark(
                conn,
                (self.audit_archived, self.items_archived),
                {"b_run": run_id, "b_keys": keys, "b_now": now, "b_token": fence.token},
                len(archived),
            )
        return archived

    def restore_postgresql(
        self, conn: Connection, run_id: str, chunk: Sequence[tuple[str, str]], now: datetime
    ) -> set[str]:
        """Builds back to their previous status, audit rows, items and counter: one statement."""
        params = self._arrays(chunk) | {"b_run": run_id, "b_now": now}
        rows = conn.execute(self.restore_postgresql_statement, params).all()
        return self._keys_with_items(run_id, rows)

    def restore_generic(
        self, conn: Connection, run_id: str, chunk: Sequence[tuple[str, str]], now: datetime
    ) -> set[str]:
        by_status: dict[str, list[Any]] = {}
        for key, previous in chunk:
            by_status.setdefault(previous, []).append(self.schema.coerce_build_id(key))
        back: set[str] = set()
        for previous, ids in by_status.items():
            result = conn.execute(self.restore_builds, {"b_ids": ids, "b_status": previous})
            back.update(str(v) for v in result.scalars())
        if back:
            keys = [key for key, _ in chunk if key in back]
            self._copy_and_mark(
                conn,
                (self.audit_restored, self.items_restored),
                {"b_run": run_id, "b_keys": keys, "b_now": now},
                len(back),
            )
            conn.execute(self.count_restored, {"b_run": run_id, "b_restored": len(back)})
        return back

    @staticmethod
    def _copy_and_mark(
        conn: Connection, statements: tuple[Any, Any], params: dict[str, Any], expected: int
    ) -> None:
        """Audit rows copied from the items, then the items marked: one per changed build."""
        audit, mark = statements
        written = conn.execute(audit, params).rowcount
        marked = conn.execute(mark, {k: params[k] for k in ("b_run", "b_keys")}).rowcount
        if written != expected or marked != expected:
            raise RuntimeError(
                f"run {params['b_run']}: {expected} builds changed but {written} audit rows "
                f"and {marked} items were written; rolled back"
            )


class StateStore:
    """Runs, items, audit and locks in the builds database."""

    def __init__(self, engine: Engine, schema: BuildsSchema) -> None:
        self.engine = engine
        self.schema = schema
        prefix = schema.spec.state_table_prefix
        self._md, self.runs, self.items, self.audit, self.locks = _tables(prefix)
        self._batch_statements: _BatchStatements | None = None

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
    #
    # Every batch of an apply (and of a restore) is one transaction with a fixed set of
    # statements, built once per store (see _BatchStatements) and only bound with values per
    # batch: building, hashing and compiling a new SQLAlchemy statement for each batch cost
    # more than the database spent executing it.

    def pending_items(
        self, run_id: str, limit: int, after_seq: int | None = None
    ) -> list[PendingItem]:
        """The next ``limit`` pending items of a run in plan order, after ``after_seq`` if given."""
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
        if after_seq is not None:
            query = query.where(self.items.c.seq > after_seq)
        with self.engine.connect() as conn:
            return [PendingItem(*row) for row in conn.execute(query)]

    def _statements(self, routes_guard: Any = None, *, any_guard: bool = False) -> _BatchStatements:
        """The batch statements for ``routes_guard`` (``any_guard``: the guard is not used)."""
        cached = self._batch_statements
        if cached is None or not (any_guard or cached.routes_guard is routes_guard):
            tables = (self.runs, self.items, self.audit, self.locks)
            cached = _BatchStatements(self.schema, tables, routes_guard)
            self._batch_statements = cached
        return cached

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

        The one transaction checks and renews the fence, archives, copies each
        archived build's item into the audit table, marks the items and counts
        them, or does none of it. On PostgreSQL the guarded UPDATE, the items,
        the audit rows and the counters are a single statement.
        """
        statements = self._statements(routes_guard)
        skipped: dict[str, str] = {
            b.build_id: "routed at the re-check" for b in batch if b.build_id in routed_now
        }
        todo = [b for b in batch if b.build_id not in routed_now]
        archived: set[str] = set()
        with self.engine.begin() as conn:
            self._check_fence(conn, fence, now, statements)
            counted = False
            if todo and conn.dialect.name == "postgresql" and statements.single_statement:
                archived = statements.archive_postgresql(conn, run_id, todo, len(batch), fence, now)
                counted = True
            elif todo:
                archived = statements.archive_generic(conn, run_id, todo, fence, now)
            missing = [item for item in todo if item.build_id not in archived]
            if missing:
                skipped.update(self._why_skipped(conn, missing, routes_guard))
            if skipped:
                conn.execute(
                    statements.mark_skipped,
                    [
                        {"b_run": run_id, "b_key": build_id, "b_why": why}
                        for build_id, why in skipped.items()
                    ],
                )
            if not counted:
                conn.execute(
                    statements.count_archived,
                    {"b_run": run_id, "b_archived": len(archived), "b_skipped": len(skipped)},
                )
        # In plan order, whatever order the database returned them in.
        return ArchiveBatchResult(
            tuple(b.build_id for b in todo if b.build_id in archived), skipped
        )

    def _why_skipped(
        self, conn: Connection, items: Sequence[PendingItem], routes_guard: Any
    ) -> dict[str, str]:
        """Why each of ``items`` was not archived, read in one query for them all."""
        s = self.schema
        query = (
            select(s.build_id, s.build_status, s.project_active)
            .select_from(s.builds.outerjoin(s.projects, s.project_id == s.build_project))
            .where(s.build_id.in_([s.coerce_build_id(i.build_id) for i in items]))
        )
        found = {str(build): (status, active) for build, status, active in conn.execute(query)}
        reasons: dict[str, str] = {}
        for item in items:
            row = found.get(item.build_id)
            if row is None:
                why = "the build no longer exists"
            elif row[0] != item.previous_status:
                why = f"its status changed from {item.previous_status!r} to {row[0]!r}"
            elif row[1] is None:  # no project row, or no active build
                why = "its project no longer has a known active build"
            elif str(row[1]) == item.build_id:
                why = "it became its project's active build"
            elif routes_guard is not None:
                why = "it is routed now"
            else:
                why = "it changed since the plan"
            reasons[item.build_id] = why
        return reasons

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

    def _check_fence(
        self, conn: Connection, fence: Fence, now: datetime, statements: _BatchStatements
    ) -> None:
        # Matches only while our token is current, and renews the lease; on
        # PostgreSQL it also row-locks the lease until this batch commits.
        result = conn.execute(
            statements.fence,
            {
                "f_name": fence.name,
                "f_token": fence.token,
                "f_holder": fence.holder,
                "f_expires": now + fence.ttl,
            },
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
        restores nothing more. Each chunk is one transaction: the builds, their
        audit rows, their items and the run's counter.
        """
        archived_status = self.schema.spec.archived_status
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
        todo = [(r.build_id, r.previous_status) for r in rows if r.outcome == "archived"]
        already = sum(1 for r in rows if r.outcome == "restored")
        statements = self._statements(any_guard=True)
        restored = 0
        conflicts: dict[str, str] = {}
        for chunk in _chunks(todo, batch_size):
            with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql" and statements.single_statement:
                    back = statements.restore_postgresql(conn, run_id, chunk, now)
                else:
                    back = statements.restore_generic(conn, run_id, chunk, now)
            for build_id, _ in chunk:
                if build_id not in back:
                    conflicts[build_id] = f"no longer {archived_status!r}: left as it is"
            restored += len(back)
        return RestoreResult(restored, already, conflicts)

    def audit_rows(self, run_id: str) -> list[dict[str, Any]]:
        query = select(self.audit).where(self.audit.c.run_id == run_id).order_by(self.audit.c.id)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
