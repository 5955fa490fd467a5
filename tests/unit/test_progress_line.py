"""The CLI's progress line: drawn on a terminal, silent otherwise."""

from __future__ import annotations

import io

from deployment_cleanup.cli import ProgressLine


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_drawn_on_a_terminal_and_ends_with_a_newline() -> None:
    screen = Terminal()
    line = ProgressLine(screen)
    line("lookups", 1500, 0, None)
    line("archive", 50, 200, "r-1")
    line.close()
    text = screen.getvalue()
    assert "\rlookups  1,500 builds" in text
    assert "\rarchive  [#######-----------------------] 50/200" in text
    assert text.endswith("\n")


def test_progress_is_silent_when_output_is_not_a_terminal() -> None:
    pipe = io.StringIO()
    line = ProgressLine(pipe)
    line("archive", 50, 200, "r-1")
    line.close()
    assert pipe.getvalue() == ""
