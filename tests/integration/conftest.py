"""Fixtures for tests against real databases and a real routing HTTP server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deployment_cleanup.db import EnvironmentSecrets
from deployment_cleanup.runs import Connections, connect
from deployment_cleanup.spec import DeploymentCleanup
from tests.support.postgres import (  # noqa: F401  (re-exported as fixtures)
    local_postgres_server,
    postgres_server,
    postgres_url,
)
from tests.support.routing_server import RoutingServer

OpenConnections = Callable[..., Connections]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty builds database: a real SQLite file, then a real PostgreSQL database."""
    if request.param == "sqlite":
        path = tmp_path / "builds.sqlite"
        path.touch()
        return f"sqlite:///{path}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    path = tmp_path / "builds.sqlite"
    path.touch()
    return f"sqlite:///{path}"


@pytest.fixture
def routing_server() -> Iterator[RoutingServer]:
    with RoutingServer() as server:
        yield server
        assert not server.errors, server.errors


@pytest.fixture
def connections() -> Iterator[OpenConnections]:
    """Opens a cleanup's connections (secrets from the given variables); all closed after the test."""
    opened: list[Connections] = []

    def open_(cleanup: DeploymentCleanup, environ: dict[str, str] | None = None) -> Connections:
        conns = connect(cleanup, EnvironmentSecrets(environ=environ or {}))
        opened.append(conns)
        return conns

    yield open_
    for conns in opened:
        conns.close()
