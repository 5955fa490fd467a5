"""Real PostgreSQL servers for the test suite, and the pytest fixtures that hand them out.

`PostgresServer` runs a throwaway cluster (initdb in a temporary directory, `postgres` on a free
loopback port, trust authentication) and removes it afterwards. The binaries come from
`scripts/ensure-postgres`, which the test command runs first; this module never installs them.

Setting DEPLOYMENT_CLEANUP_TEST_POSTGRES_URL to an admin URL of an existing server
(e.g. ``postgresql+psycopg://postgres:secret@db.example:5432/postgres``) makes the fixtures use
that server instead of starting one; tests that stop, restart or replicate the server then skip.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest
import sqlalchemy

EXTERNAL_URL_ENV = "DEPLOYMENT_CLEANUP_TEST_POSTGRES_URL"
DEBIAN_INSTALL_ROOT = Path("/usr/lib/postgresql")
HOST = "127.0.0.1"
SUPERUSER = "postgres"
# PostgreSQL refuses to run as root; this OS user (made by Debian's package) runs it instead.
SERVER_OS_USER = "postgres"
STARTUP_TIMEOUT_SECONDS = 30.0
SHUTDOWN_TIMEOUT_SECONDS = 30.0
PORT_ATTEMPTS = 3
# Durability is pointless for a throwaway cluster, and turning it off makes tests much faster.
SPEED_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresUnavailableError(RuntimeError):
    """The server binaries, or the OS user to run them as, are missing."""


class PostgresStartError(RuntimeError):
    """postgres exited, or never accepted connections, while starting."""

    def __init__(self, message: str, *, port_in_use: bool) -> None:
        super().__init__(message)
        self.port_in_use = port_in_use


def find_bin_dir(install_root: Path = DEBIAN_INSTALL_ROOT, search_path: str | None = None) -> Path:
    """Locate the server binaries the way scripts/ensure-postgres does.

    The highest version under ``install_root/*/bin`` wins, then ``initdb`` on ``search_path``
    (None means $PATH, "" means nowhere).
    """
    candidates = [
        initdb.parent for initdb in install_root.glob("*/bin/initdb") if os.access(initdb, os.X_OK)
    ]
    if candidates:
        return max(candidates, key=lambda bin_dir: _version_key(bin_dir.parent.name))
    on_path = shutil.which("initdb", path=search_path)
    if on_path is not None:
        return Path(on_path).resolve().parent
    raise PostgresUnavailableError(
        f"PostgreSQL server binaries (initdb) not found under {install_root}/*/bin nor on PATH: "
        "run scripts/ensure-postgres to install them"
    )


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _check_database_name(name: str) -> str:
    # Names are interpolated into SQL, so only plain lower-case identifiers are accepted.
    if not _DATABASE_NAME.fullmatch(name):
        raise ValueError(f"not a plain lower-case identifier: {name!r}")
    return name


def _tool_env() -> dict[str, str]:
    # A developer's PGHOST, PGPASSWORD, PGOPTIONS... must not reach the throwaway server's tools.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1, removed on close.

    Use as a context manager (``with PostgresServer() as server:``), which starts it. ``stop()`` and
    ``start()`` restart it on the same port with the same data. With ``replicate_from``, the
    cluster is a streaming-replication standby of that running server instead of a fresh one.
    """

    def __init__(
        self, bin_dir: Path | None = None, *, replicate_from: PostgresServer | None = None
    ) -> None:
        self.bin_dir = bin_dir if bin_dir is not None else find_bin_dir()
        self._replicate_from = replicate_from
        self._os_user = _server_os_user()
        self._base_dir = Path(tempfile.mkdtemp(prefix="deployment-cleanup-pg-"))
        self._data_dir = self._base_dir / "data"
        self._socket_dir = self._base_dir / "socket"
        self._log_path = self._base_dir / "postgres.log"
        self._socket_dir.mkdir()
        if self._os_user is not None:
            for directory in (self._base_dir, self._socket_dir):
                os.chown(directory, self._os_user.pw_uid, self._os_user.pw_gid)
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._standbys: list[PostgresServer] = []

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server has not been started yet")
        return self._port

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@{HOST}:{self.port}/{dbname}"

    def start(self) -> None:
        """Start the server; the first call creates the cluster on a free port."""
        if self.is_running:
            raise RuntimeError(f"the server on port {self.port} is already running")
        if self._port is not None:
            self._launch(self._port)
            return
        self._create_cluster()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            # The free port may be taken by someone else before postgres binds it: try another.
            try:
                self._launch(_free_port())
            except PostgresStartError as error:
                if not error.port_in_use or attempt == PORT_ATTEMPTS:
                    raise
            else:
                return

    def stop(self) -> None:
        """Fast shutdown (what ``pg_ctl stop -m fast`` does); the data and port are kept."""
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=SHUTDOWN_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        """Stop the server and its standbys, and delete all their files."""
        for standby in self._standbys:
            standby.close()
        self._standbys.clear()
        self.stop()
        shutil.rmtree(self._base_dir, ignore_errors=True)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL statements with psql; returns the rows unaligned ('|'-separated), untitled."""
        result = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "--no-psqlrc",
                "--quiet",
                "--no-align",
                "--tuples-only",
                "--set=ON_ERROR_STOP=1",
                f"--host={HOST}",
                f"--port={self.port}",
                f"--username={SUPERUSER}",
                f"--dbname={dbname}",
                "--file=-",
            ],
            input=sql,
            capture_output=True,
            text=True,
            env=_tool_env(),
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout.rstrip("\n")

    def create_database(self, name: str) -> str:
        self.psql(f'CREATE DATABASE "{_check_database_name(name)}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        # FORCE ends connections a test's engine left open, which would block the drop.
        self.psql(f'DROP DATABASE IF EXISTS "{_check_database_name(name)}" WITH (FORCE)')

    def create_standby(self) -> PostgresServer:
        """Start a streaming-replication standby of this server on another port.

        The standby is closed with this server, or earlier by its own ``close()``.
        """
        standby = PostgresServer(self.bin_dir, replicate_from=self)
        self._standbys.append(standby)
        standby.start()
        return standby

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self._log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _create_cluster(self) -> None:
        if self._replicate_from is None:
            self._run_as_server_user(
                "initdb",
                f"--pgdata={self._data_dir}",
                f"--username={SUPERUSER}",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
        else:
            primary = self._replicate_from
            self._run_as_server_user(
                "pg_basebackup",
                f"--pgdata={self._data_dir}",
                f"--host={HOST}",
                f"--port={primary.port}",
                f"--username={SUPERUSER}",
                "--write-recovery-conf",
                "--wal-method=stream",
                "--checkpoint=fast",
                "--no-sync",
            )

    def _run_as_server_user(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            [str(self.bin_dir / tool), *args],
            capture_output=True,
            text=True,
            cwd=self._base_dir,
            env=_tool_env(),
            user=self._os_user.pw_uid if self._os_user else None,
            group=self._os_user.pw_gid if self._os_user else None,
            extra_groups=[] if self._os_user else None,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}):\n{result.stderr.strip()}")

    def _launch(self, port: int) -> None:
        options = [
            "listen_addresses=" + HOST,
            f"unix_socket_directories={self._socket_dir}",
            *SPEED_SETTINGS,
        ]
        with self._log_path.open("ab") as log:
            process = subprocess.Popen(
                [
                    str(self.bin_dir / "postgres"),
                    "-D",
                    str(self._data_dir),
                    "-p",
                    str(port),
                    *(arg for option in options for arg in ("-c", option)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._base_dir,
                env=_tool_env(),
                user=self._os_user.pw_uid if self._os_user else None,
                group=self._os_user.pw_gid if self._os_user else None,
                extra_groups=[] if self._os_user else None,
                # Its own session: a Ctrl-C meant for pytest must not shut the server down
                # behind the fixtures' back; they stop it themselves.
                start_new_session=True,
            )
        self._process = process
        self._port = port
        try:
            self._wait_until_ready(process, port)
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self, process: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log = self.log_tail()
                raise PostgresStartError(
                    f"postgres exited with {process.returncode} while starting on port {port}:\n"
                    + log,
                    port_in_use="Address already in use" in log,
                )
            ready = subprocess.run(
                [
                    str(self.bin_dir / "pg_isready"),
                    f"--host={HOST}",
                    f"--port={port}",
                    f"--username={SUPERUSER}",
                    "--dbname=postgres",
                    "--timeout=1",
                ],
                capture_output=True,
                env=_tool_env(),
                check=False,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        raise PostgresStartError(
            f"postgres did not accept connections on port {port} within "
            f"{STARTUP_TIMEOUT_SECONDS:.0f}s:\n{self.log_tail()}",
            port_in_use=False,
        )


def _server_os_user() -> pwd.struct_passwd | None:
    """The OS user to run the server as: None means the current one."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        raise PostgresUnavailableError(
            f"running as root, and PostgreSQL refuses to: no {SERVER_OS_USER!r} OS user to run it "
            "as; run scripts/ensure-postgres (Debian's postgresql package creates that user)"
        ) from None


class ExistingPostgres:
    """A server someone else runs, reached with the admin URL in EXTERNAL_URL_ENV."""

    def __init__(self, admin_url: str) -> None:
        self._admin_url = sqlalchemy.make_url(admin_url)

    def url(self, dbname: str) -> str:
        return self._admin_url.set(database=dbname).render_as_string(hide_password=False)

    def create_database(self, name: str) -> str:
        self._execute(f'CREATE DATABASE "{_check_database_name(name)}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        # FORCE ends connections a test's engine left open, which would block the drop.
        self._execute(f'DROP DATABASE IF EXISTS "{_check_database_name(name)}" WITH (FORCE)')

    def _execute(self, sql: str) -> None:
        # CREATE/DROP DATABASE cannot run inside a transaction.
        engine = sqlalchemy.create_engine(self._admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text(sql))
        finally:
            engine.dispose()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | ExistingPostgres]:
    """One server for the whole test session: started here, or the one the env var names."""
    external_url = os.environ.get(EXTERNAL_URL_ENV)
    if external_url:
        yield ExistingPostgres(external_url)
        return
    try:
        server = PostgresServer()
    except PostgresUnavailableError as error:
        # A failure, not a skip: a suite that quietly skips its database tests proves nothing.
        raise pytest.fail.Exception(str(error), pytrace=False) from None
    with server:
        yield server


@pytest.fixture(scope="session")
def local_postgres_server(postgres_server: PostgresServer | ExistingPostgres) -> PostgresServer:
    """The session's server, for tests that stop, restart or replicate it."""
    if not isinstance(postgres_server, PostgresServer):
        pytest.skip(f"needs a server the tests start; {EXTERNAL_URL_ENV} names an existing one")
    return postgres_server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer | ExistingPostgres) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    url = postgres_server.create_database(name)
    try:
        yield url
    finally:
        postgres_server.drop_database(name)
