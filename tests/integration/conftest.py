from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.backends.stub_llm import StubServer
from tests.integration.gateway import Gateway
from tests.integration.postgres import postgres_server  # noqa: F401  (a session fixture for every module)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session", autouse=True)
def _nginx_available() -> None:
    if shutil.which("nginx") is None:
        pytest.fail("nginx is not installed: run scripts/test.sh, which installs it")


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    with Gateway() as gw:
        yield gw


@pytest.fixture
def stubs() -> Iterator[dict[str, StubServer]]:
    """Named stand-in backends, started on demand: stubs.setdefault is not enough, use start_stub."""
    started: dict[str, StubServer] = {}
    yield started
    for stub in started.values():
        stub.stop()


def start_stub(stubs: dict[str, StubServer], name: str, **kw: object) -> StubServer:
    stub = StubServer(name=name, **kw).start()  # type: ignore[arg-type]
    stubs[name] = stub
    return stub
