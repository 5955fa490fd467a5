"""The issue's targets checked against a run's results, and the results as a markdown page."""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate_targets", "markdown"]

PLAN_RATIO_LIMIT = 2.0
PEAK_RSS_LIMIT_MB = 300.0  # decimal megabytes, as the issue writes them
PEAK_GROWTH_LIMIT = 1.2
ARCHIVE_LIMIT_SECONDS = 2.0
RESTORE_LIMIT_SECONDS = 2.0
STATUS_LIMIT_BYTES = 64 * 1024
MIB_IN_MB = 1.048576


def _postgres(results: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(
        (i for i in results["inventories"] if i["database"] == "postgresql"),
        key=lambda i: i["builds"],
    )


def _target(name: str, limit: str, actual: str, passed: bool | None) -> dict[str, Any]:
    return {"target": name, "limit": limit, "actual": actual, "passed": passed}


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its limit, the measured value and whether it passed (None: not measured)."""
    targets = []
    postgres = _postgres(results)
    if postgres:
        largest = postgres[-1]
        at = f"{largest['builds']:,} builds"
        targets.append(
            _target(
                f"plan at {at} vs floor",
                f"<= {PLAN_RATIO_LIMIT}x",
                f"{largest['ratio']}x ({largest['engine']['plan_seconds']:.2f}s vs "
                f"{largest['floor']['seconds']:.2f}s)",
                largest["ratio"] <= PLAN_RATIO_LIMIT,
            )
        )
        peak_mb = largest["engine"]["peak_rss_mib"] * MIB_IN_MB
        targets.append(
            _target(
                f"peak RSS at {at}",
                f"<= {PEAK_RSS_LIMIT_MB:.0f} MB",
                f"{peak_mb:.0f} MB",
                peak_mb <= PEAK_RSS_LIMIT_MB,
            )
        )
        smaller = [i for i in postgres if i["builds"] * 10 <= largest["builds"]]
        if smaller:
            reference = smaller[-1]
            growth = largest["engine"]["peak_rss_mib"] / reference["engine"]["peak_rss_mib"]
            targets.append(
                _target(
                    f"peak RSS at {at} vs {reference['builds']:,}",
                    f"<= {PEAK_GROWTH_LIMIT}x",
                    f"{growth:.2f}x",
                    growth <= PEAK_GROWTH_LIMIT,
                )
            )
    for archive in results["archives"]:
        where = f"{archive['archived']:,} builds, {archive['database']}"
        targets.append(
            _target(
                f"archive of {where} (re-check + audit)",
                f"<= {ARCHIVE_LIMIT_SECONDS:g} s",
                f"{archive['archive_seconds']:.2f} s",
                archive["archive_seconds"] <= ARCHIVE_LIMIT_SECONDS,
            )
        )
        targets.append(
            _target(
                f"restore of {archive['restored']:,} builds, {archive['database']}",
                f"<= {RESTORE_LIMIT_SECONDS:g} s",
                f"{archive['restore_seconds']:.2f} s",
                archive["restore_seconds"] <= RESTORE_LIMIT_SECONDS,
            )
        )
    largest_status = max(
        (i["engine"]["status_bytes"] for i in results["inventories"]), default=None
    )
    if largest_status is not None:
        targets.append(
            _target(
                "status object, every size",
                f"<= {STATUS_LIMIT_BYTES:,} bytes",
                f"{largest_status:,} bytes at most",
                largest_status <= STATUS_LIMIT_BYTES,
            )
        )
    return targets


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    return [_row(list(header)), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _seconds(value: float) -> str:
    return f"{value:.2f}"


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    settings = results["settings"]
    lines = [
        "# Benchmark results",
        "",
        f"`{results['command']}`, finished {results['finished_at']} in "
        f"{results['wall_seconds']:.0f} s.",
        "",
        "## Machine",
        "",
        *_table(
            ["CPU", "cores (usable)", "memory", "OS", "Python", "PostgreSQL", "SQLite (lib/cli)"],
            [
                [
                    machine["cpu"],
                    f"{machine['cores']} ({machine['usable_cores']})",
                    f"{machine['memory_gib']} GiB",
                    machine["os"],
                    machine["python"],
                    machine["postgresql"],
                    f"{machine['sqlite_library']} / {machine['sqlite_cli'] or 'none'}",
                ]
            ],
        ),
        "",
        f"Routing: the test routing HTTP server on 127.0.0.1 with {settings['latency_ms']:g} ms "
        f"per request; batchSize {settings['batch_size']}, concurrency "
        f"{settings['concurrency']}; retention keepNewest {settings['keep_newest']}, minAge 7d.",
        "",
        "## Plan: engine vs floor",
        "",
        "Engine: `plan_and_record` through `runs.connect` in a fresh process (scan, lookups, "
        "classification, recording of every candidate). Floor: the raw scan (best of 3) plus "
        "the same number of raw lookup batches at the same concurrency, one after the other; "
        "*concurrent floor*: both started at once (what a perfectly pipelined plan could reach). "
        "*Record floor*: the database writing as many item rows as the plan had candidates "
        "(same width, one `INSERT ... SELECT` by its own client): work the engine must do that "
        "the floor leaves out.",
        "",
        *_table(
            [
                "database",
                "builds",
                "projects",
                "candidates",
                "engine plan (s)",
                "scan floor (s)",
                "lookup floor (s)",
                "floor (s)",
                "engine / floor",
                "concurrent floor (s)",
                "engine / concurrent",
                "record floor (s)",
                "engine / (floor + record)",
                "peak RSS (MiB)",
                "lookups/s engine",
                "lookups/s floor",
                "p99 batch engine (ms)",
                "p99 batch floor (ms)",
                "status (bytes)",
                "load before/after",
            ],
            [
                [
                    i["database"],
                    f"{i['builds']:,}",
                    f"{i['projects']:,}",
                    f"{i['engine']['candidates']:,}",
                    _seconds(i["engine"]["plan_seconds"]),
                    _seconds(i["floor"]["scan_seconds"]),
                    _seconds(i["floor"]["lookups"]["seconds"]),
                    _seconds(i["floor"]["seconds"]),
                    f"**{i['ratio']}x**",
                    _seconds(i["floor"]["concurrent"]["seconds"]),
                    f"{i['ratio_concurrent']}x",
                    _seconds(i["floor"].get("record_seconds", 0.0)),
                    f"{i.get('ratio_with_record', '-')}x",
                    i["engine"]["peak_rss_mib"],
                    f"{i['engine']['lookups']['ids_per_second']:,.0f}",
                    f"{i['floor']['lookups']['ids_per_second']:,.0f}",
                    i["engine"]["lookups"]["p99_batch_ms"],
                    f"{i['floor']['lookups']['p99_batch_ms']:.2f}",
                    f"{i['engine']['status_bytes']:,}",
                    "/".join(str(x) for x in i["load_average"]),
                ]
                for i in results["inventories"]
            ],
        ),
        "",
        "Scan tools: "
        + "; ".join(
            sorted({f"{i['database']}: {i['floor']['scan_tool']}" for i in results["inventories"]})
        )
        + ". The ordered scan (the engine's `ORDER BY project_id, id`) is shown below for "
        "reference; it is not part of the floor.",
        "",
        "### Where the plan's time and memory go",
        "",
        *_table(
            [
                "database",
                "builds",
                "connect (s)",
                "plan incl. streamed recording (s)",
                "of it: last chunk, run row, commit (s)",
                "prune_plan_items (s)",
                "last lookup progress (s)",
                "ordered scan floor (s)",
                "lookup batches",
                "CPU (s)",
                "GC (s)",
                "RSS after connect / last chunk / plan (MiB)",
            ],
            [
                [
                    i["database"],
                    f"{i['builds']:,}",
                    _seconds(i["engine"]["connect_seconds"]),
                    _seconds(i["engine"]["seconds_by_function"].get("_make_plan", 0.0)),
                    _seconds(i["engine"]["seconds_by_function"].get("finish", 0.0)),
                    _seconds(i["engine"]["seconds_by_function"].get("prune_plan_items", 0.0)),
                    _seconds(i["engine"]["progress_seconds"].get("lookups", [0.0])[-1]),
                    _seconds(i["floor"]["ordered_scan_seconds"]),
                    i["engine"]["lookups"]["batches"],
                    _seconds(i["engine"]["cpu_seconds"]),
                    _seconds(sum(i["engine"]["gc_seconds_by_generation"])),
                    " / ".join(
                        str(i["engine"]["memory_mib"].get(point, {}).get("VmRSS", "-"))
                        for point in ("after connect", "after finish", "after _make_plan")
                    ),
                ]
                for i in results["inventories"]
            ],
        ),
        "",
    ]
    if results["archives"]:
        lines += [
            "## Archive and restore",
            "",
            "`apply` of a plan (approved as current) in a fresh process, then `restore` of that "
            "run. *archive* is everything after the plan: recording the items, the lock, and every "
            "batch's re-check lookup, guarded UPDATE and audit rows; *batches* leaves out the "
            "recording.",
            "",
            *_table(
                [
                    "database",
                    "builds",
                    "archived",
                    "plan (s)",
                    "last chunk + commit (s)",
                    "batches (s)",
                    "archive (s)",
                    "archived/s",
                    "restore (s)",
                    "restored/s",
                    "load before/after",
                ],
                [
                    [
                        a["database"],
                        f"{a['builds']:,}",
                        f"{a['archived']:,}",
                        _seconds(a["plan_seconds"]),
                        _seconds(a["record_items_seconds"]),
                        _seconds(a["batches_seconds"]),
                        f"**{_seconds(a['archive_seconds'])}**",
                        f"{a['archived'] / a['archive_seconds']:,.0f}",
                        f"**{_seconds(a['restore_seconds'])}**",
                        f"{a['restored'] / a['restore_seconds']:,.0f}",
                        "/".join(str(x) for x in a["load_average"]),
                    ]
                    for a in results["archives"]
                ],
            ),
            "",
        ]
    lines += [
        "## Targets",
        "",
        *_table(
            ["target", "limit", "actual", "passed"],
            [
                [
                    t["target"],
                    t["limit"],
                    t["actual"],
                    "n/a" if t["passed"] is None else ("yes" if t["passed"] else "**no**"),
                ]
                for t in results["targets"]
            ],
        ),
        "",
    ]
    lines += _operator_section(results.get("operator"))
    return "\n".join(lines)


def _operator_section(operator: dict[str, Any] | None) -> list[str]:
    if operator is None:
        return [
            "Not measured in this run (`--operator-size`): Kubernetes API writes per operator "
            "run and the operator's idle RSS.",
            "",
        ]
    writes = ", ".join(f"{k}: {v}" for k, v in operator["writes_during_run"].items())
    idle_writes = ", ".join(f"{k}: {v}" for k, v in operator["writes_while_idle"].items())
    return [
        "## Operator",
        "",
        f"One plan-only DeploymentCleanup of {operator['builds']:,} builds through the operator "
        f"on the test control plane (tick {operator['tick_seconds']:g} s). Writes are counted "
        "by the API server (`apiserver_request_total`) from just before the bench creates the "
        "resource (that create is 1 of them) until the status shows the plan, then during an "
        f"idle window of {operator['idle_window_seconds']:g} s. The API server's renewals of "
        "its own Lease are left out.",
        "",
        *_table(
            [
                "builds",
                "candidates",
                "to Planned status (s)",
                "API writes for the run",
                "by verb and resource",
                "writes while idle",
                "RSS idle before (MiB)",
                "RSS after run (MiB)",
                "peak RSS (MiB)",
            ],
            [
                [
                    f"{operator['builds']:,}",
                    f"{operator['candidates']:,}",
                    _seconds(operator["seconds_to_planned_status"]),
                    operator["writes_during_run_total"],
                    writes,
                    idle_writes or "none",
                    operator["rss_idle_before_run_mib"],
                    operator["rss_after_run_mib"],
                    operator["peak_rss_mib"],
                ]
            ],
        ),
        "",
    ]
