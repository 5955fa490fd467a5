"""The recorded state of one run, shared by the store, the status and the CLI. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

__all__ = ["RunKind", "RunRecord", "RunState"]


class RunKind(StrEnum):
    PLAN = "plan"
    APPLY = "apply"


class RunState(StrEnum):
    PLANNED = "Planned"
    BLOCKED = "Blocked"
    APPLYING = "Applying"
    SUCCEEDED = "Succeeded"
    STOPPED = "Stopped"
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        return self is not RunState.APPLYING


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One run as the audit store holds it."""

    id: str
    cleanup: str
    kind: RunKind
    plan_id: str
    state: RunState
    started_at: datetime
    finished_at: datetime | None
    reference_count: int
    candidates: int
    archived: int
    skipped: int
    restored: int
    message: str

    @property
    def pending(self) -> int:
        return max(0, self.candidates - self.archived - self.skipped)
