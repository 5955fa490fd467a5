"""Every DeploymentCleanup in examples/ is valid, so the docs cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployment_cleanup.spec import KIND, parse_cleanup

EXAMPLES = Path(__file__).parents[2] / "examples"
CLEANUPS = [
    pytest.param(doc, id=f"{path.name}#{i}")
    for path in sorted(EXAMPLES.rglob("*.yaml"))
    for i, doc in enumerate(yaml.safe_load_all(path.read_text()))
    if isinstance(doc, dict) and doc.get("kind") == KIND
]


def test_there_are_examples() -> None:
    assert CLEANUPS


@pytest.mark.parametrize("document", CLEANUPS)
def test_example_is_a_valid_cleanup(document: dict[str, object]) -> None:
    parse_cleanup(document)
