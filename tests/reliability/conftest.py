"""The reliability suite: a fast subset in the test command, the full run via scripts/reliability.

Each scenario adds an Outcome to the session's report; with
DEPLOYMENT_CLEANUP_RELIABILITY_REPORT=<folder> the report is written there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import connections, database_url, routing_server, sqlite_url  # noqa: F401
from tests.support.controlplane import control_plane  # noqa: F401
from tests.support.operator import cluster, crds  # noqa: F401
from tests.support.postgres import local_postgres_server, postgres_server, postgres_url  # noqa: F401
from tests.support.reliability import REPORT_ENV, Outcome, write_report

_OUTCOMES: list[Outcome] = []


@pytest.fixture(scope="session")
def report() -> Iterator[list[Outcome]]:
    yield _OUTCOMES
    folder = os.environ.get(REPORT_ENV)
    if folder:
        write_report(_OUTCOMES, Path(folder))


@pytest.fixture
def outcome(report: list[Outcome], request: pytest.FixtureRequest) -> Outcome:
    """This scenario's row; named after the test and its parameters."""
    scenario = request.node.originalname.removeprefix("test_").replace("_", " ")
    fault = request.node.callspec.id if hasattr(request.node, "callspec") else "-"
    row = Outcome(scenario, fault)
    report.append(row)
    return row
