"""What a failing test's report carries: the log tails of every gateway or deployment alive when it failed.

Harnesses (tests/integration/gateway.py, tests/deploy/conftest.py) register what they start and unregister
it when it stops; tests/conftest.py adds each registered one's `logs()` to a failing report as a section.
"""

from __future__ import annotations

from typing import Protocol


class HasLogs(Protocol):
    def logs(self) -> str: ...


_alive: dict[int, tuple[str, HasLogs]] = {}


def register(name: str, subject: HasLogs) -> None:
    _alive[id(subject)] = (name, subject)


def unregister(subject: HasLogs) -> None:
    _alive.pop(id(subject), None)


def alive() -> list[tuple[str, HasLogs]]:
    return list(_alive.values())
