"""Recording a plan while it is made: candidates as they are found, the run row last.

A million-build plan has hundreds of thousands of candidates; holding them all
until the end made memory follow the inventory. The recorder writes them into
the items table in chunks on the scan's own connection, and the run row goes
in at the end, in the same transaction: a plan that fails or is killed leaves
nothing behind, and a recorded run always has all of its items.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Connection, insert

from .archive import StateStore
from .planning import BuildDecision, Plan
from .runstate import RunKind, RunState

__all__ = ["PlanRecorder"]

CHUNK = 5000
_ITEM_COLUMNS = (
    "run_id",
    "build_id",
    "seq",
    "project_id",
    "previous_status",
    "outcome",
    "evidence",
)


class PlanRecorder:
    """One run's candidates and run row, written in one transaction on ``conn``.

    :meth:`add` may be called from any thread; :meth:`flush` and :meth:`finish`
    only from the thread that owns ``conn`` (SQLite connections refuse others).
    """

    def __init__(
        self,
        store: StateStore,
        conn: Connection,
        run_id: str,
        cleanup: str,
        outcome: str,
        now: datetime,
    ) -> None:
        self.store = store
        self.conn = conn
        self.run_id = run_id
        self.cleanup = cleanup
        self.outcome = outcome
        self.now = now
        self._lock = threading.Lock()
        self._rows: list[tuple[object, ...]] = []
        self._seq = 0
        self._copy = conn.dialect.name == "postgresql"

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

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._rows)

    def flush(self, at_least: int = 1) -> None:
        """Write the queued candidates if there are ``at_least`` of them."""
        with self._lock:
            if len(self._rows) < at_least:
                return
            rows, self._rows = self._rows, []
        if self._copy:
            # COPY: row-by-row INSERTs dominated recording big plans on PostgreSQL.
            columns = ", ".join(f'"{c}"' for c in _ITEM_COLUMNS)
            cursor = self.conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            with cursor.copy(f'COPY "{self.store.items.name}" ({columns}) FROM STDIN') as copy:
                for row in rows:
                    copy.write_row(row)
            return
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start : start + CHUNK]
            self.conn.execute(
                insert(self.store.items),
                [dict(zip(_ITEM_COLUMNS, row, strict=True)) for row in chunk],
            )

    def finish(self, plan: Plan, kind: RunKind, state: RunState, message: str) -> None:
        """Write the rest and the run row, then commit: the run appears with all its items."""
        self.flush()
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
        if self._copy and self._seq:
            # Fresh statistics, or the planner walks the whole run for each batch's items.
            self.conn.exec_driver_sql(f'ANALYZE "{self.store.items.name}"')
        self.conn.commit()
