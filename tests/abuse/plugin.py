"""The kinds registry's hooks, registered for the whole run (tests/conftest.py) so that the hostile
tests outside tests/abuse count too: a conftest's runtest hooks see only the tests below it."""
from __future__ import annotations

from typing import Any

from . import kinds


def pytest_runtest_logreport(report: Any) -> None:
    """The hostile tests written before this suite count in the registry when they ran."""
    if report.when != "call":
        return
    hit = kinds.earlier_kind(report.nodeid)
    if hit is not None:
        surface, kind, outcome = hit
        kinds.record(surface, kind, outcome if report.passed else kinds.CRASH)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not kinds.REGISTRY:
        return
    terminalreporter.section("kinds of bad input (tests/abuse/kinds.py)")
    for line in kinds.summary_lines():
        terminalreporter.write_line(line)
