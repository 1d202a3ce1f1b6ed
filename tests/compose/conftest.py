"""A container engine for the compose tests (tests/compose/engine.sh): podman's Docker API on a private
socket, Debian's docker-compose on it, debian:bookworm-slim made locally once when no registry answers."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "tests" / "compose" / "engine.sh"
CACHE = Path(os.environ.get("ISHGW_CONTAINER_CACHE", "/var/tmp/ishgw-containers"))


def unavailable(reason: str) -> None:
    """Skip locally; in CI (CI=true) a missing engine is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"container engine required in CI: {reason}")
    pytest.skip(f"container engine unavailable: {reason}")


def run_engine(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENGINE), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def compose_binary() -> str:
    """docker-compose (Debian's, 1.29), installed when missing."""
    if os.geteuid() != 0 and shutil.which("docker-compose") is None:
        unavailable("docker-compose is missing and installing it needs root")
    result = run_engine("packages", timeout=600)
    assert result.returncode == 0, f"engine.sh packages failed:\n{result.stdout}\n{result.stderr}"
    path = shutil.which("docker-compose")
    assert path, "docker-compose is not on PATH after engine.sh packages"
    return path


@dataclass
class Engine:
    socket: Path
    containers_conf: str

    @property
    def env(self) -> dict[str, str]:
        """For docker-compose and podman: the private socket, the engine settings, no ambient settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ISHGW_", "COMPOSE_", "DOCKER_"))}
        env.update({"DOCKER_HOST": f"unix://{self.socket}", "CONTAINERS_CONF": self.containers_conf})
        return env

    def podman(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )


@pytest.fixture(scope="session")
def engine(compose_binary: str) -> Iterator[Engine]:
    if os.geteuid() != 0:
        unavailable("rootful podman needs root")
    # The first run makes the base image with debootstrap (minutes); later runs reuse it.
    prepared = run_engine("prepare", timeout=1200)
    assert prepared.returncode == 0, f"engine.sh prepare failed:\n{prepared.stdout}\n{prepared.stderr}"
    conf = next(
        line.split("=", 1)[1] for line in prepared.stdout.splitlines() if line.startswith("CONTAINERS_CONF=")
    )
    workdir = Path(tempfile.mkdtemp(prefix="ishgw-engine-"))
    sock = workdir / "podman.sock"
    log = (workdir / "service.log").open("wb")
    service = subprocess.Popen(
        [str(ENGINE), "serve", str(sock)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.is_socket():
            assert service.poll() is None, (
                f"podman system service exited: {(workdir / 'service.log').read_text()}"
            )
            assert time.monotonic() < deadline, "podman system service: no socket after 30 s"
            time.sleep(0.05)
        yield Engine(sock, conf)
    finally:
        service.terminate()
        try:
            service.wait(timeout=15)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait(timeout=5)
        log.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)
