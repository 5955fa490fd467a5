"""Recording a plan while it is made: candidates as they are found, the run row last.

A million-build plan has hundreds of thousands of candidates; holding them all
until the end made memory follow the inventory. The recorder writes them into
the items table as the plan goes, and the run row goes in at the end, in the
same transaction: a plan that fails or is killed leaves nothing behind, and a
recorded run always has all of its items.

On PostgreSQL the items go through a connection of their own, in one COPY
that stays open for the whole plan and is fed by psycopg's writer thread, so
the database's work on them overlaps the scan and the lookups. SQLite writes
on the scan's connection (one thread, one file lock), in bulk INSERTs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert

from .archive import StateStore
from .planning import BuildDecision, Plan
from .runstate import RunKind, RunState

__all__ = ["PlanRecorder"]

_ITEM_COLUMNS = (
    "run_id",
    "build_id",
    "seq",
    "project_id",
    "previous_status",
    "outcome",
    "evidence",
)


class _Abandoned(Exception):
    """Ends an open COPY when the plan did not finish: the server discards its rows."""


class PlanRecorder:
    """One run's candidates and run row, written in one transaction.

    :meth:`add` may be called from any thread; :meth:`flush`, :meth:`finish` and
    :meth:`close` only from the thread that owns ``scan_conn`` (SQLite
    connections refuse others). Always :meth:`close` it: without a
    :meth:`finish` first, everything written is rolled back.
    """

    def __init__(
        self,
        store: StateStore,
        scan_conn: Connection,
        run_id: str,
        cleanup: str,
        outcome: str,
        now: datetime,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.cleanup = cleanup
        self.outcome = outcome
        self.now = now
        self._lock = threading.Lock()
        self._rows: list[tuple[object, ...]] = []
        self._seq = 0
        self._postgresql = scan_conn.dialect.name == "postgresql"
        self.conn = store.engine.connect() if self._postgresql else scan_conn
        # The table name is quoted by the dialect, the values are bound: nothing is spliced in.
        self._table = self.conn.dialect.identifier_preparer.format_table(store.items)
        marks = ", ".join("?" for _ in _ITEM_COLUMNS)
        self._insert = f"INSERT INTO {self._table} ({', '.join(_ITEM_COLUMNS)}) VALUES ({marks})"  # noqa: S608
        self._copy: Any = None
        self._copy_context: contextlib.ExitStack | None = None

    def add(self, decisions: Sequence[BuildDecision]) -> None:
        """Queue candidates, in plan order, for the next flush."""
        run_id, outcome = self.run_id, self.outcome
        with self._lock:
            seq = self._seq
            self._rows.extend(
                (
                    run_id,
                    str(d.build.id),
                    seq + offset,
                    str(d.build.project_id),
                    d.build.status,
                    outcome,
                    d.evidence_json(),
                )
                for offset, d in enumerate(decisions)
            )
            self._seq = seq + len(decisions)

    def flush(self, at_least: int = 1) -> None:
        """Write the queued candidates if there are ``at_least`` of them."""
        with self._lock:
            if len(self._rows) < at_least:
                return
            rows, self._rows = self._rows, []
        if self._postgresql:
            copy = self._copy or self._open_copy()
            for row in rows:
                copy.write_row(row)
            return
        self.conn.exec_driver_sql(self._insert, rows)

    def _open_copy(self) -> Any:
        from psycopg.copy import QueuedLibpqWriter  # noqa: PLC0415 (PostgreSQL only)

        # One COPY for the whole plan: a role's statement_timeout (or transaction_timeout)
        # would cancel it part-way through a long plan, so this transaction lifts them.
        self.conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
        if (self.conn.dialect.server_version_info or (0,)) >= (17,):
            self.conn.exec_driver_sql("SET LOCAL transaction_timeout = 0")
        cursor = self.conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        columns = ", ".join(_ITEM_COLUMNS)
        context = contextlib.ExitStack()
        self._copy = context.enter_context(
            cursor.copy(
                f"COPY {self._table} ({columns}) FROM STDIN", writer=QueuedLibpqWriter(cursor)
            )
        )
        self._copy_context = context
        return self._copy

    def _close_copy(self, abandoned: bool) -> None:
        context, self._copy_context, self._copy = self._copy_context, None, None
        if context is None:
            return
        if abandoned:
            error = _Abandoned("the plan did not finish")
            context.__exit__(_Abandoned, error, None)
        else:
            context.close()  # waits until the server has every row

    def finish(self, plan: Plan, kind: RunKind, state: RunState, message: str) -> None:
        """Write the rest and the run row, then commit: the run appears with all its items."""
        self.flush()
        self._close_copy(abandoned=False)
        if self._seq != plan.candidate_count:
            raise RuntimeError(
                f"recorded {self._seq} candidates but the plan has {plan.candidate_count}"
            )
        if kind is RunKind.PLAN and self.outcome != "planned":
            # An apply that ends up waiting for approval records a plan, not pending work.
            items = self.store.items
            self.conn.execute(
                items.update().where(items.c.run_id == self.run_id).values(outcome="planned")
            )
        self.conn.execute(
            insert(self.store.runs).values(
                id=self.run_id,
                cleanup=self.cleanup,
                kind=kind.value,
                plan_id=plan.id,
                state=state.value,
                started_at=self.now,
                finished_at=None if state is RunState.APPLYING else self.now,
                reference_count=plan.reference.total,
                active_count=plan.reference.active,
                routed_count=plan.reference.routed,
                candidates=plan.candidate_count,
                archived=0,
                skipped=0,
                restored=0,
                message=message[:2000],
            )
        )
        if self._postgresql and self._seq:
            # Fresh statistics, or the planner walks the whole run for each batch's items.
            self.conn.exec_driver_sql(f"ANALYZE {self._table}")
        self.conn.commit()

    def close(self) -> None:
        """Release the connection; whatever :meth:`finish` did not commit is rolled back."""
        try:
            with contextlib.suppress(Exception):  # the plan's own error is the one to report
                self._close_copy(abandoned=True)
        finally:
            if self._postgresql:
                self.conn.close()
