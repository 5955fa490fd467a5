"""The human-readable report of a run, as the CLI and the demo print it."""

from __future__ import annotations

from collections.abc import Sequence

from .archive import RestoreResult
from .planning import Plan
from .runs import RunResult
from .runstate import RunRecord

__all__ = ["render_result", "table"]


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> list[str]:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    ]


def _render_plan(plan: Plan) -> list[str]:
    c = plan.counts
    lines = [
        f"Plan {plan.id}: {plan.verdict.value.upper()} ({plan.reason})",
        f"  {plan.message}",
        "",
        f"Inventory    {c['projects']:,} projects, {c['builds']:,} unarchived builds",
        f"Classified   active {c['active']:,}, routed {c['routed']:,}, "
        f"not routed {c['notRouted']:,}, unknown {c['unknown']:,}",
        f"Candidates   {c['candidates']:,} to archive"
        + ("" if plan.ready else " if the run were not blocked: none will be archived"),
    ]
    kept = {k: v for k, v in plan.keep_reasons.items() if v}
    if kept:
        lines.append("Kept because " + ", ".join(f"{k} {v:,}" for k, v in kept.items()))
    issues = {k: v for k, v in plan.project_issues.items() if v}
    if issues or c["disagreements"]:
        lines.append(
            "Reported     "
            + ", ".join(
                [f"{k} {v:,}" for k, v in issues.items()]
                + [f"disagreements {c['disagreements']:,}"]
            )
        )
    lines += ["", "Safety thresholds"]
    lines += table(
        [
            (
                t.name,
                f"{t.limit:g}",
                "-" if t.actual is None else f"{t.actual:g}",
                "ok" if t.passed else "EXCEEDED",
            )
            for t in plan.thresholds
        ],
        ("CHECK", "LIMIT", "ACTUAL", "RESULT"),
    )
    failed = plan.failed_receipts
    lines += [
        "",
        f"Lookup batches: {len(plan.receipts)} "
        f"({len(plan.receipts) - len(failed)} ok, {len(failed)} failed)",
    ]
    for receipt in failed[:10]:
        lines.append(
            f"  batch {receipt.index} ({receipt.size} ids, {receipt.attempts} attempts): "
            f"{receipt.error}"
        )
    if plan.candidates:
        lines += ["", "Sample of candidates"]
        lines += table(
            [
                (
                    d.build.id,
                    d.build.project_id,
                    d.build.status,
                    "-" if d.build.created_at is None else d.build.created_at.date().isoformat(),
                )
                for d in plan.candidates[:10]
            ],
            ("BUILD", "PROJECT", "STATUS", "CREATED"),
        )
    return lines


def _render_run(run: RunRecord) -> list[str]:
    return [
        f"Run {run.id} ({run.kind}): {run.state}",
        f"  plan {run.plan_id}: {run.candidates:,} candidates, archived {run.archived:,}, "
        f"skipped {run.skipped:,}, restored {run.restored:,}",
    ]


def _render_restore(result: RestoreResult) -> list[str]:
    lines = [f"Restored {result.restored:,}; already restored {result.already_restored:,}"]
    for build_id, why in list(result.conflicts.items())[:10]:
        lines.append(f"  left alone: build {build_id}: {why}")
    return lines


def render_result(result: RunResult) -> str:
    """The human-readable report of one run."""
    lines: list[str] = []
    if result.plan is not None:
        lines += [*_render_plan(result.plan), ""]
    if result.run is not None:
        lines += _render_run(result.run)
    if result.restore is not None:
        lines += _render_restore(result.restore)
    lines += ["", f"{result.outcome}: {result.message}"]
    return "\n".join(lines)
