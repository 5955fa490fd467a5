"""Reading the builds database: keyset streaming, schema checks, refusing a standby."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from deployment_cleanup.db import ConfigurationError
from deployment_cleanup.inventory import check_not_a_standby, reflect_builds_schema
from deployment_cleanup.runs import make_plan, utc_now
from deployment_cleanup.spec import DatabaseSpec
from tests.integration.conftest import OpenConnections
from tests.support.inventory import loose_cleanup, run, seed
from tests.support.postgres import PostgresServer


@pytest.mark.parametrize("page_size", [1, 7, 5000], ids=["page-1", "page-7", "page-5000"])
def test_keyset_scan_yields_every_unarchived_build_once_grouped_by_project(
    database_url: str, page_size: int
) -> None:
    seeded = seed(database_url, projects=23)
    with seeded.engine.begin() as conn:
        conn.execute(text("UPDATE builds SET status = 'archived' WHERE id % 5 = 0"))
    schema = reflect_builds_schema(seeded.engine, DatabaseSpec(url=database_url))
    with seeded.engine.connect() as conn:
        groups = list(schema.iter_project_builds(conn, page_size=page_size))
        active = dict(conn.execute(text("SELECT id, active_build_id FROM projects")).all())
    seen = [b.id for g in groups for b in g.builds]
    expected = {b for b, s in seeded.statuses().items() if s != "archived"}
    assert sorted(seen) == sorted(expected)
    assert len(seen) == len(set(seen))
    ids = [g.project_id for g in groups]
    assert ids == sorted(set(ids))  # each project once, in order, even across pages
    assert all(b.project_id == g.project_id for g in groups for b in g.builds)
    # The join brings each project's active build along with its builds.
    assert all(g.project_known and g.active_build_id == active[g.project_id] for g in groups)
    assert all(
        b.created_at is not None and b.created_at.tzinfo is not None
        for g in groups
        for b in g.builds
    )


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        pytest.param(
            {"builds": {"table": "deployments"}},
            "spec.database.builds.table: table 'deployments'",
            id="table",
        ),
        pytest.param(
            {"builds": {"status": "state"}},
            "spec.database.builds.status: column 'state'",
            id="column",
        ),
        pytest.param(
            {"projects": {"activeBuildId": "live_build"}},
            "spec.database.projects.activeBuildId",
            id="proj",
        ),
    ],
)
def test_missing_tables_and_columns_are_named_by_their_spec_field(
    sqlite_url: str, mapping: dict[str, object], message: str
) -> None:
    seed(sqlite_url, projects=2)
    engine = create_engine(sqlite_url, poolclass=NullPool)
    with pytest.raises(ConfigurationError, match=message):
        reflect_builds_schema(engine, DatabaseSpec.model_validate({"url": sqlite_url, **mapping}))


@pytest.mark.postgres
def test_a_postgres_standby_is_refused(local_postgres_server: PostgresServer) -> None:
    standby = local_postgres_server.create_standby()
    for server, is_standby in ((local_postgres_server, False), (standby, True)):
        engine = create_engine(server.url("postgres"), poolclass=NullPool)
        with engine.connect() as conn:
            if is_standby:
                with pytest.raises(ConfigurationError, match="standby"):
                    check_not_a_standby(conn)
            else:
                check_not_a_standby(conn)
    standby.close()


def _small_schema(url: str) -> Engine:
    """Empty projects, builds (nullable project and status, text dates) and routes tables."""
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(
            text("CREATE TABLE projects (id INTEGER PRIMARY KEY, active_build_id INTEGER)")
        )
        conn.execute(
            text(
                "CREATE TABLE builds (id INTEGER PRIMARY KEY, project_id INTEGER, status TEXT, "
                "created_at TEXT)"
            )
        )
        conn.execute(text("CREATE TABLE routes (build_id INTEGER, hostname TEXT)"))
    return engine


def test_builds_without_project_or_status_are_counted_and_never_candidates(
    sqlite_url: str, connections: OpenConnections
) -> None:
    old = "2026-01-01 00:00:00"
    with _small_schema(sqlite_url).begin() as conn:
        conn.execute(text("INSERT INTO projects VALUES (1, 3)"))
        conn.execute(
            text(
                f"INSERT INTO builds VALUES (1, 1, 'ready', '{old}'), (2, NULL, 'ready', '{old}'), "
                f"(3, 1, 'ready', '{old}'), (4, 1, NULL, '{old}')"
            )
        )
        conn.execute(text("INSERT INTO routes VALUES (3, 'live.test')"))
    c = loose_cleanup(sqlite_url, {"sql": {}}, retention={"keepNewest": 0, "minAge": "1d"})
    plan = run(make_plan(connections(c), utc_now(), None))
    assert plan.counts["unscanned"] == 2
    assert [d.build.id for d in plan.candidates] == [1]


def test_builds_of_a_project_without_a_projects_row_are_all_kept(
    sqlite_url: str, connections: OpenConnections
) -> None:
    old = "2026-01-01 00:00:00"
    with _small_schema(sqlite_url).begin() as conn:
        conn.execute(text("INSERT INTO projects VALUES (1, 2)"))
        # Project 7 has builds but no row: its active build is unknown, so nothing of it goes.
        conn.execute(
            text(
                f"INSERT INTO builds VALUES (1, 1, 'ready', '{old}'), (2, 1, 'ready', '{old}'), "
                f"(3, 7, 'ready', '{old}'), (4, 7, 'ready', '{old}')"
            )
        )
    c = loose_cleanup(sqlite_url, {"sql": {}}, retention={"keepNewest": 0, "minAge": "1d"})
    plan = run(make_plan(connections(c), utc_now(), None))
    assert [d.build.id for d in plan.candidates] == [1]
    assert plan.project_issues["projectRowMissing"] == 1
    assert plan.counts["builds"] == 4
