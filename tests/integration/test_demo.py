"""The README's first command: the demo replays the incident and checks itself."""

from __future__ import annotations

import io
from pathlib import Path

from deployment_cleanup.demo import run_demo


def test_demo_blocks_then_applies_then_restores(tmp_path: Path) -> None:
    out = io.StringIO()
    assert run_demo(tmp_path, out) == 0
    text = out.getvalue()
    assert "BLOCKED (LookupsIncomplete)" in text
    assert "Builds archived by the blocked run: 0" in text
    assert "Live builds archived: 0" in text
    assert "Demo finished: every step behaved as expected." in text
    assert (tmp_path / "cleanup.yaml").is_file()
