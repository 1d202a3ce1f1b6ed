"""Suite-wide hooks: a failing test's report carries the logs of the gateways it ran against."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests import diagnostics


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, object, object]:
    report = yield
    if isinstance(report, pytest.TestReport) and report.failed:
        for name, subject in diagnostics.alive():
            report.sections.append((f"{name} logs (tail)", subject.logs()))
    return report
