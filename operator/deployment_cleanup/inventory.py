"""Reading the builds database: projects and their unarchived builds.

Scans use SQLAlchemy Core with column lists and keyset pagination on
``(project_id, id)``, never OFFSET, so each page costs the same however deep
the scan is and memory holds one page plus one project at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, Table, func, select, text, tuple_
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError

from .db import ConfigurationError
from .planning import Build, BuildId, ProjectId
from .spec import DatabaseSpec

__all__ = ["BuildsSchema", "ProjectBuilds", "check_not_a_standby", "reflect_builds_schema"]

PAGE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class ProjectBuilds:
    """One project's unarchived builds, with its row's active build as read in the same page."""

    project_id: ProjectId
    active_build_id: BuildId | None
    project_known: bool  # False: no projects row names this project
    builds: list[Build]


def _coercer(python_type: type) -> Callable[[object], Any]:
    """Turns an id read back as text (audit, CLI) into the column's own type."""
    if python_type is int:
        return lambda value: int(str(value))
    return lambda value: value if isinstance(value, python_type) else str(value)


@dataclass(frozen=True)
class BuildsSchema:
    """The configured projects and builds tables, checked against the real database."""

    spec: DatabaseSpec
    projects: Table
    builds: Table
    build_id_type: type

    @property
    def build_id(self) -> Any:
        return self.builds.c[self.spec.builds.id]

    @property
    def build_project(self) -> Any:
        return self.builds.c[self.spec.builds.project_id]

    @property
    def build_status(self) -> Any:
        return self.builds.c[self.spec.builds.status]

    @property
    def build_created(self) -> Any:
        return self.builds.c[self.spec.builds.created_at]

    @property
    def project_id(self) -> Any:
        return self.projects.c[self.spec.projects.id]

    @property
    def project_active(self) -> Any:
        return self.projects.c[self.spec.projects.active_build_id]

    def coerce_build_id(self, value: object) -> Any:
        return _coercer(self.build_id_type)(value)

    def settings(self) -> dict[str, object]:
        """The table mapping, as it seeds the plan id."""
        return {
            "schema": self.spec.db_schema,
            "projects": self.spec.projects.model_dump(by_alias=True),
            "builds": self.spec.builds.model_dump(by_alias=True),
        }

    def iter_project_builds(
        self, conn: Connection, page_size: int = PAGE_SIZE
    ) -> Iterator[ProjectBuilds]:
        """Every project with unarchived builds, one at a time, in (project_id, id) order.

        Each page joins the projects table, so a project's active build is read
        with its builds. A project spanning pages keeps the first page's active
        build: the archive re-checks the live value anyway.
        """
        archived = self.spec.archived_status
        key = tuple_(self.build_project, self.build_id)
        query = (
            select(
                self.build_project,
                self.build_id,
                self.build_status,
                self.build_created,
                self.project_active,
                self.project_id,
            )
            .select_from(
                self.builds.outerjoin(self.projects, self.project_id == self.build_project)
            )
            .where(self.build_status != archived, self.build_project.is_not(None))
            .order_by(self.build_project, self.build_id)
            .limit(page_size)
        )
        # PostgreSQL's timestamptz arrives aware; only naive values (SQLite) need converting.
        convert = conn.dialect.name != "postgresql" or not getattr(
            self.build_created.type, "timezone", False
        )
        last: tuple[object, object] | None = None
        group: ProjectBuilds | None = None
        while True:
            page = query if last is None else query.where(key > tuple_(*last))
            rows = conn.execute(page).all()
            for project_id, build_id, status, created, active, known in rows:
                if group is None or project_id != group.project_id:
                    if group is not None:
                        yield group
                    group = ProjectBuilds(project_id, active, known is not None, [])
                at = aware_utc(created) if convert and created is not None else created
                group.builds.append(Build(build_id, project_id, status, at))
            if len(rows) < page_size:
                break
            last = (rows[-1][0], rows[-1][1])
        if group is not None:
            yield group

    def count_unscanned(self, conn: Connection) -> int:
        """Builds the scan skips because their project or status is NULL."""
        query = (
            select(func.count())
            .select_from(self.builds)
            .where((self.build_project.is_(None)) | (self.build_status.is_(None)))
        )
        return int(conn.execute(query).scalar_one())


def aware_utc(value: object) -> datetime:
    """A timestamp as an aware UTC datetime; SQLite hands back naive ones or text."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise ConfigurationError(f"expected a timestamp, found {type(value).__name__}")
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _reflect(
    engine: Engine, name: str, schema: str | None, columns: dict[str, str], path: str
) -> Table:
    try:
        table = Table(name, MetaData(), schema=schema, autoload_with=engine)
    except NoSuchTableError:
        raise ConfigurationError(f"{path}.table: table {name!r} does not exist") from None
    for field, column in columns.items():
        if column not in table.c:
            raise ConfigurationError(
                f"{path}.{field}: column {column!r} does not exist in table {name!r}"
            )
    return table


def reflect_builds_schema(engine: Engine, spec: DatabaseSpec) -> BuildsSchema:
    """Check that the configured tables and columns exist; the errors name the spec field."""
    try:
        projects = _reflect(
            engine,
            spec.projects.table,
            spec.db_schema,
            {"id": spec.projects.id, "activeBuildId": spec.projects.active_build_id},
            "spec.database.projects",
        )
        builds = _reflect(
            engine,
            spec.builds.table,
            spec.db_schema,
            {
                "id": spec.builds.id,
                "projectId": spec.builds.project_id,
                "status": spec.builds.status,
                "createdAt": spec.builds.created_at,
            },
            "spec.database.builds",
        )
    except SQLAlchemyError as exc:
        raise ConfigurationError(
            f"cannot read the builds database schema: {type(exc).__name__}"
        ) from exc
    try:
        id_type: type = builds.c[spec.builds.id].type.python_type
    except NotImplementedError:
        id_type = str
    return BuildsSchema(spec, projects, builds, id_type)


def check_not_a_standby(conn: Connection) -> None:
    """Refuse a PostgreSQL standby: a lagging replica would make stale data look current."""
    if conn.dialect.name != "postgresql":
        return
    if conn.execute(text("SELECT pg_is_in_recovery()")).scalar_one():
        raise ConfigurationError(
            "the builds database is a standby (pg_is_in_recovery() is true); "
            "plans must be made on the primary, whose data is current"
        )
