"""The PostgreSQL test fixtures and scripts/ensure-postgres do what the other tests rely on."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import sqlalchemy

from tests.support.postgres import (
    ExistingPostgres,
    PostgresServer,
    PostgresUnavailableError,
    find_bin_dir,
)

ENSURE_POSTGRES = Path(__file__).resolve().parents[2] / "scripts" / "ensure-postgres"


@contextmanager
def connect(url: str) -> Iterator[sqlalchemy.Connection]:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as connection:
            yield connection
    finally:
        engine.dispose()


def scalar(url: str, sql: str) -> object:
    with connect(url) as connection:
        return connection.execute(sqlalchemy.text(sql)).scalar_one()


def user_tables(url: str) -> list[str]:
    with connect(url) as connection:
        return list(sqlalchemy.inspect(connection).get_table_names())


@pytest.mark.postgres
def test_database_is_reachable_with_sqlalchemy(postgres_url: str) -> None:
    assert "PostgreSQL" in str(scalar(postgres_url, "SELECT version()"))
    assert (
        scalar(postgres_url, "SELECT current_database()")
        == sqlalchemy.make_url(postgres_url).database
    )


@pytest.mark.postgres
@pytest.mark.parametrize("run", ["first", "second"])
def test_each_test_gets_an_empty_database_of_its_own(postgres_url: str, run: str) -> None:
    # Both runs create the same table: the second would find the first's if databases leaked.
    assert user_tables(postgres_url) == []
    with connect(postgres_url) as connection:
        connection.execute(sqlalchemy.text("CREATE TABLE marker (run text)"))
        connection.execute(sqlalchemy.text("INSERT INTO marker VALUES (:run)"), {"run": run})
    assert user_tables(postgres_url) == ["marker"]


@pytest.mark.postgres
def test_create_and_drop_database(local_postgres_server: PostgresServer) -> None:
    server = local_postgres_server
    server.create_database("fixture_create_drop")
    # A connection a test left open must not keep the database from being dropped.
    with psycopg.connect(
        host="127.0.0.1", port=server.port, user="postgres", dbname="fixture_create_drop"
    ):
        server.drop_database("fixture_create_drop")
    gone = "SELECT count(*) FROM pg_database WHERE datname = 'fixture_create_drop'"
    assert server.psql(gone) == "0"


@pytest.mark.postgres
def test_database_names_are_checked(local_postgres_server: PostgresServer) -> None:
    with pytest.raises(ValueError, match="identifier"):
        local_postgres_server.create_database('x"; DROP DATABASE postgres; --')


@pytest.mark.postgres
def test_psql_returns_unaligned_rows(local_postgres_server: PostgresServer) -> None:
    rows = local_postgres_server.psql("SELECT 1, 'a'\nUNION ALL SELECT 2, 'b' ORDER BY 1")
    assert rows == "1|a\n2|b"
    with pytest.raises(RuntimeError, match="does_not_exist"):
        local_postgres_server.psql("SELECT * FROM does_not_exist")


@pytest.mark.postgres
def test_stop_and_start_keep_port_and_data(
    local_postgres_server: PostgresServer, postgres_url: str
) -> None:
    server = local_postgres_server
    with connect(postgres_url) as connection:
        connection.execute(sqlalchemy.text("CREATE TABLE kept (value int)"))
        connection.execute(sqlalchemy.text("INSERT INTO kept VALUES (42)"))
    port = server.port

    server.stop()
    try:
        assert not server.is_running
        with pytest.raises(sqlalchemy.exc.OperationalError):
            scalar(postgres_url, "SELECT 1")
    finally:
        server.start()

    assert server.port == port
    assert scalar(postgres_url, "SELECT value FROM kept") == 42


@pytest.mark.postgres
def test_standby_is_in_recovery_and_streams_from_primary(
    local_postgres_server: PostgresServer, postgres_url: str
) -> None:
    primary = local_postgres_server
    dbname = sqlalchemy.make_url(postgres_url).database
    assert dbname is not None
    with connect(postgres_url) as connection:
        connection.execute(sqlalchemy.text("CREATE TABLE streamed (value int)"))

    standby = primary.create_standby()
    try:
        assert standby.port != primary.port
        standby_url = standby.url(dbname)
        assert scalar(standby_url, "SELECT pg_is_in_recovery()") is True
        assert scalar(postgres_url, "SELECT pg_is_in_recovery()") is False
        with pytest.raises(sqlalchemy.exc.InternalError, match="read-only transaction"):
            scalar(standby_url, "INSERT INTO streamed VALUES (0) RETURNING value")

        # A row written on the primary after the base backup arrives by streaming replication.
        with connect(postgres_url) as connection:
            connection.execute(sqlalchemy.text("INSERT INTO streamed VALUES (7)"))
        deadline = time.monotonic() + 10
        while scalar(standby_url, "SELECT count(*) FROM streamed") == 0:
            assert time.monotonic() < deadline, "the row never reached the standby"
            time.sleep(0.05)
    finally:
        standby.close()
    assert not standby.is_running


@pytest.mark.postgres
def test_existing_server_admin_creates_and_drops_databases(
    local_postgres_server: PostgresServer,
) -> None:
    existing = ExistingPostgres(local_postgres_server.url("postgres"))
    url = existing.create_database("fixture_existing")
    try:
        assert url == local_postgres_server.url("fixture_existing")
        assert scalar(url, "SELECT current_database()") == "fixture_existing"
    finally:
        existing.drop_database("fixture_existing")
    with pytest.raises(psycopg.OperationalError, match="fixture_existing"):
        psycopg.connect(
            host="127.0.0.1",
            port=local_postgres_server.port,
            user="postgres",
            dbname="fixture_existing",
        ).close()


def test_server_closes_when_startup_fails_and_removes_its_files() -> None:
    server = PostgresServer()
    server.data_dir.mkdir()  # initdb refuses a non-empty data directory
    (server.data_dir / "occupied").touch()
    with pytest.raises(RuntimeError, match="initdb failed"), server:
        pass
    assert not server.data_dir.parent.exists()


def make_fake_initdb(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True)
    initdb = bin_dir / "initdb"
    initdb.write_text("#!/bin/sh\n")
    initdb.chmod(0o755)


def test_find_bin_dir_prefers_the_highest_version(tmp_path: Path) -> None:
    for version in ("9.6", "15", "16", "100"):
        make_fake_initdb(tmp_path / version / "bin")
    (tmp_path / "17" / "bin").mkdir(parents=True)  # no initdb: not a candidate
    assert find_bin_dir(tmp_path, search_path="") == tmp_path / "100" / "bin"


def test_find_bin_dir_fails_pointing_at_ensure_postgres(tmp_path: Path) -> None:
    with pytest.raises(PostgresUnavailableError, match="run scripts/ensure-postgres"):
        find_bin_dir(tmp_path, search_path="")


def run_ensure_postgres(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENSURE_POSTGRES)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
        timeout=60,
    )


def test_ensure_postgres_is_quick_and_agrees_with_find_bin_dir() -> None:
    started = time.monotonic()
    result = run_ensure_postgres({})
    assert time.monotonic() - started < 1
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == str(find_bin_dir())


def write_fake_apt_get(path: Path, log: Path, installs_into: Path | None) -> None:
    """An apt-get that logs its calls and, on install, puts a fake initdb in `installs_into`."""
    lines = ["#!/bin/sh", f'echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND $*" >> "{log}"']
    if installs_into is not None:
        initdb = installs_into / "initdb"
        lines.append(
            f'if [ "$1" = install ]; then mkdir -p "{installs_into}" '
            f'&& echo "#!/bin/sh" > "{initdb}" && chmod +x "{initdb}"; fi'
        )
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)


def test_ensure_postgres_installs_debian_package_when_missing(tmp_path: Path) -> None:
    prefix, log, apt_get = tmp_path / "root", tmp_path / "apt.log", tmp_path / "apt-get"
    bin_dir = prefix / "usr/lib/postgresql/15/bin"
    write_fake_apt_get(apt_get, log, installs_into=bin_dir)

    result = run_ensure_postgres(
        {"ENSURE_POSTGRES_PREFIX": str(prefix), "ENSURE_POSTGRES_APT_GET": str(apt_get)}
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(bin_dir)]
    assert log.read_text().splitlines() == [
        "DEBIAN_FRONTEND=noninteractive update",
        "DEBIAN_FRONTEND=noninteractive install -y --no-install-recommends postgresql",
    ]
    drop_in = prefix / "etc/postgresql-common/createcluster.d"
    assert [p.read_text() for p in drop_in.iterdir()] == ["create_main_cluster = false\n"]


def test_ensure_postgres_does_not_install_when_present(tmp_path: Path) -> None:
    prefix, log, apt_get = tmp_path / "root", tmp_path / "apt.log", tmp_path / "apt-get"
    make_fake_initdb(prefix / "usr/lib/postgresql/16/bin")
    write_fake_apt_get(apt_get, log, installs_into=None)

    result = run_ensure_postgres(
        {"ENSURE_POSTGRES_PREFIX": str(prefix), "ENSURE_POSTGRES_APT_GET": str(apt_get)}
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(prefix / "usr/lib/postgresql/16/bin")]
    assert not log.exists()


def test_ensure_postgres_fails_when_install_brings_no_initdb(tmp_path: Path) -> None:
    prefix, log, apt_get = tmp_path / "root", tmp_path / "apt.log", tmp_path / "apt-get"
    write_fake_apt_get(apt_get, log, installs_into=None)

    result = run_ensure_postgres(
        {"ENSURE_POSTGRES_PREFIX": str(prefix), "ENSURE_POSTGRES_APT_GET": str(apt_get)}
    )

    assert result.returncode == 1
    assert result.stdout == ""
    assert "found no initdb" in result.stderr
