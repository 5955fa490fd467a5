"""Secrets never leave the process in text."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployment_cleanup.db import ConfigurationError, EnvironmentSecrets, Redactor
from deployment_cleanup.spec import SecretKeyRef


def test_known_secrets_and_url_passwords_are_masked() -> None:
    redact = Redactor(["tok-CANARY-123"])
    redact.add("postgresql+psycopg://app:pw-CANARY-456@db.internal:5432/builds")
    text = redact(
        "auth tok-CANARY-123 failed; connecting to postgresql+psycopg://app:pw-CANARY-456@db.internal/builds; "
        "also postgresql://other:hunter22@x/y"
    )
    assert "CANARY" not in text
    assert "hunter22" not in text
    assert "app:***@db.internal" in text


def test_secrets_resolve_from_a_mounted_layout_then_from_variables(tmp_path: Path) -> None:
    (tmp_path / "builds-db").mkdir()
    (tmp_path / "builds-db" / "url").write_text("sqlite:///x.db\n")
    secrets = EnvironmentSecrets(
        tmp_path, environ={"DEPLOYMENT_CLEANUP_SECRET_ROUTING_TOKEN": "t0k"}
    )
    assert secrets.resolve(SecretKeyRef(name="builds-db", key="url")) == "sqlite:///x.db"
    assert secrets.resolve(SecretKeyRef(name="routing", key="token")) == "t0k"
    with pytest.raises(ConfigurationError, match="DEPLOYMENT_CLEANUP_SECRET_MISSING_KEY"):
        secrets.resolve(SecretKeyRef(name="missing", key="key"))
