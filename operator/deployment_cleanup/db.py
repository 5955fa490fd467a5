"""Database engines and the secrets that reach them.

One engine per database per process (SQLAlchemy's advice); sessions and
connections are opened per unit of work by the callers. Connection strings may
carry passwords, so everything that turns an error into text goes through
:class:`Redactor`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from .spec import SecretKeyRef

__all__ = [
    "ConfigurationError",
    "EnvironmentSecrets",
    "Redactor",
    "SecretResolver",
    "make_engine",
    "resolve_url",
]


class ConfigurationError(RuntimeError):
    """A valid spec that cannot be used here: a missing secret, a bad URL, a missing table."""


class SecretResolver(Protocol):
    def resolve(self, ref: SecretKeyRef) -> str:
        """The value of ``ref``; raise ConfigurationError naming the ref when it is missing."""
        ...


def _env_name(ref: SecretKeyRef) -> str:
    return "DEPLOYMENT_CLEANUP_SECRET_" + re.sub(r"[^A-Z0-9]", "_", f"{ref.name}_{ref.key}".upper())


class EnvironmentSecrets:
    """Secrets for local use: a directory laid out like a mounted Secret, or variables.

    ``urlSecretRef: {name: builds-db, key: url}`` resolves to the file
    ``<secrets_dir>/builds-db/url`` if a directory is given, else to the
    variable ``DEPLOYMENT_CLEANUP_SECRET_BUILDS_DB_URL``.
    """

    def __init__(
        self, secrets_dir: Path | None = None, environ: dict[str, str] | None = None
    ) -> None:
        self.secrets_dir = secrets_dir
        self.environ = dict(os.environ) if environ is None else environ

    def resolve(self, ref: SecretKeyRef) -> str:
        if self.secrets_dir is not None:
            path = self.secrets_dir / ref.name / ref.key
            if path.is_file():
                return path.read_text().strip()
        value = self.environ.get(_env_name(ref))
        if value is None:
            where = f"{self.secrets_dir / ref.name / ref.key} or " if self.secrets_dir else ""
            raise ConfigurationError(
                f"secret {ref.name}/{ref.key} not found: set {where}the variable {_env_name(ref)}"
            )
        return value


def resolve_url(url: str | None, ref: SecretKeyRef | None, secrets: SecretResolver) -> str:
    if url is not None:
        return url
    if ref is None:
        raise ConfigurationError("no database URL configured")
    return secrets.resolve(ref)


class Redactor:
    """Removes secret values (and URL passwords) from text before it leaves the process."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        for value in secrets:
            self.add(value)

    def add(self, value: str) -> None:
        if len(value) >= 4:
            self._secrets.add(value)
        try:
            password = make_url(value).password
        except (ArgumentError, ValueError):
            password = None
        if password and len(str(password)) >= 4:
            self._secrets.add(str(password))

    def __call__(self, text: str) -> str:
        for value in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(value, "***")
        # Any other user:password@ in a URL, e.g. one a driver echoed back.
        return re.sub(r"(?<=://)([^:/@\s]+):([^@\s]+)@", r"\1:***@", text)


def _sqlite_pragmas(busy_timeout_ms: int) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms:d}")
        cursor.close()

    return on_connect


def make_engine(url: str, *, application_name: str = "deployment-cleanup") -> Engine:
    """An engine for ``url``; raise ConfigurationError (without the password) if it is unusable."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigurationError("the database URL is not a valid SQLAlchemy URL") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:" and not Path(parsed.database).exists():
            raise ConfigurationError(f"SQLite database file {parsed.database} does not exist")
        engine = create_engine(parsed, poolclass=NullPool)
        event.listen(engine, "connect", _sqlite_pragmas(30_000))
        return engine
    if backend == "postgresql":
        if (
            parsed.get_driver_name() in ("psycopg2", "psycopg2cffi")
            or parsed.drivername == "postgresql"
        ):
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(
            parsed,
            pool_pre_ping=True,
            pool_size=4,
            max_overflow=4,
            connect_args={"application_name": application_name, "connect_timeout": 10},
        )
    raise ConfigurationError(f"unsupported database {backend!r}: use sqlite or postgresql")
