"""The deployment-cleanup command: exit codes, output formats, secrets."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployment_cleanup.cli import EXIT_BLOCKED, EXIT_ERROR, EXIT_OK, main
from tests.support.documents import cleanup_document
from tests.support.inventory import Seeded, seed
from tests.support.routing_server import RoutingServer


def _write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "cleanup.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _doc(url: str, routing: dict[str, Any] | None = None) -> dict[str, Any]:
    return cleanup_document(
        url,
        routing=routing or {"sql": {}},
        retention={"keepNewest": 2, "minAge": "7d"},
        safety={
            "maxArchivedPerRun": 100_000,
            "maxArchivedPercent": 100,
            "maxArchivedPerProject": 1000,
        },
    )


def cli(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in args], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def world(sqlite_url: str) -> Seeded:
    return seed(sqlite_url)


def test_plan_apply_restore_round_trip_with_exit_codes(world: Seeded, tmp_path: Path) -> None:
    manifest = _write(tmp_path, _doc(world.url))
    before = world.statuses()
    code, out, _ = cli("plan", "-f", manifest, "-o", "json")
    assert code == EXIT_OK
    status = json.loads(out)
    plan_id = status["plan"]["id"]
    assert status["plan"]["verdict"] == "Ready"
    assert {c["type"] for c in status["conditions"]} == {
        "Ready",
        "LookupsComplete",
        "SafetyChecksPassed",
        "AwaitingApproval",
    }
    assert world.statuses() == before

    code, out, _ = cli("apply", "-f", manifest, "--plan-id", "p-0000000000000000")
    assert code == EXIT_BLOCKED
    assert "no longer matches" in out
    assert world.statuses() == before

    code, out, _ = cli("apply", "-f", manifest, "--plan-id", plan_id, "-o", "json")
    assert code == EXIT_OK
    run_id = json.loads(out)["run"]["id"]
    assert world.archived() == world.expected_candidates()

    code, out, _ = cli("runs", "-f", manifest)
    assert code == EXIT_OK
    assert run_id in out

    code, out, _ = cli("restore", "-f", manifest, "--run", run_id)
    assert code == EXIT_OK
    assert f"Restored {len(world.expected_candidates()):,}" in out
    assert world.statuses() == before


def test_a_blocked_plan_exits_3_and_says_why(world: Seeded, tmp_path: Path) -> None:
    with RoutingServer() as server:
        server.add_fault("status", match="all", code=500)
        routing = {"http": {"url": server.url}, "retries": {"maxAttempts": 1}}
        code, out, _ = cli("plan", "-f", _write(tmp_path, _doc(world.url, routing)))
    assert code == EXIT_BLOCKED
    assert "BLOCKED (LookupsIncomplete)" in out
    assert "HTTP 500" in out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            {"spec": {"routing": {"batchSize": -5}}}, "spec.routing.batchSize", id="bad-field"
        ),
        pytest.param(
            {"spec": {"database": {"url": "sqlite:////nonexistent/builds.db"}}},
            "does not exist",
            id="missing-sqlite-file",
        ),
    ],
)
def test_bad_input_exits_1_naming_the_problem(
    world: Seeded, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    doc = _doc(world.url)
    for section, values in change["spec"].items():
        doc["spec"][section] |= values
    before = world.statuses()
    code, _, err = cli("plan", "-f", _write(tmp_path, doc))
    assert code == EXIT_ERROR
    assert message in err
    assert world.statuses() == before


def test_missing_file_and_usage_errors(tmp_path: Path) -> None:
    code, _, err = cli("plan", "-f", tmp_path / "nope.yaml")
    assert code == EXIT_ERROR
    assert "cannot read" in err
    with pytest.raises(SystemExit) as usage:
        cli("apply", "-f", tmp_path / "nope.yaml", "--plan-id", "p-1", "--approve-current-plan")
    assert usage.value.code == 2


def test_apply_without_flags_follows_the_spec_approval(world: Seeded, tmp_path: Path) -> None:
    doc = _doc(world.url)
    code, out, _ = cli("apply", "-f", _write(tmp_path, doc))
    assert code == EXIT_BLOCKED
    assert "waits for approval" in out
    assert world.archived() == set()
    code, out, _ = cli("plan", "-f", _write(tmp_path, doc), "-o", "json")
    doc["spec"]["approval"] = {"approvedPlanId": json.loads(out)["plan"]["id"]}
    code, out, _ = cli("apply", "-f", _write(tmp_path, doc))
    assert code == EXIT_OK
    assert world.archived() == world.expected_candidates()


def test_secret_values_never_reach_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = "CANARY-pw-7f3a9"
    monkeypatch.setenv(
        "DEPLOYMENT_CLEANUP_SECRET_BUILDS_DB_URL",
        f"postgresql://cleanup:{canary}@127.0.0.1:1/builds",
    )
    doc = _doc("unused")
    doc["spec"]["database"] = {"urlSecretRef": {"name": "builds-db", "key": "url"}}
    code, out, err = cli("plan", "-f", _write(tmp_path, doc))
    assert code == EXIT_ERROR
    assert canary not in out + err
    assert err.startswith("error:")


def test_secret_from_a_mounted_secrets_dir(world: Seeded, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets" / "builds-db"
    secrets.mkdir(parents=True)
    (secrets / "url").write_text(world.url)
    doc = _doc("unused")
    doc["spec"]["database"] = {"urlSecretRef": {"name": "builds-db", "key": "url"}}
    code, out, _ = cli("plan", "-f", _write(tmp_path, doc), "--secrets-dir", tmp_path / "secrets")
    assert code == EXIT_OK
    assert "READY" in out


def test_validate_and_the_installed_entry_point(tmp_path: Path) -> None:
    manifest = _write(tmp_path, _doc("sqlite:///x.db"))
    done = subprocess.run(
        [sys.executable, "-m", "deployment_cleanup.cli", "validate", "-f", str(manifest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0
    assert "valid DeploymentCleanup platform/nightly" in done.stdout
