"""Prints the fuzz tests' case counts (``tests.fuzz.tally``) at the end of the run."""

from __future__ import annotations

import pytest

from tests.fuzz import tally


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = tally.summary()
    if lines:
        terminalreporter.section("gRPC fuzzing")
        for line in lines:
            terminalreporter.write_line(line)
