"""One real deployment per module: scripts/deploy-load-balancer.sh deploy under a fresh /tmp home on free
loopback ports; `stop` always runs afterwards, whatever happened."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import testinfra

from tests import diagnostics
from tests.ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "deploy-load-balancer.sh"


def base_env() -> dict[str, str]:
    """The environment minus ISHGW_* settings, which could leak in (scripts/test.sh exports some)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ISHGW_")}


@dataclass
class Deployment:
    home: Path
    http_port: int
    https_port: int
    admin_port: int
    workers: int = 2
    host: Any = field(default_factory=lambda: testinfra.get_host("local://"))

    @property
    def settings(self) -> dict[str, str]:
        return {
            "ISHGW_HOME": str(self.home),
            "ISHGW_HTTP_PORT": str(self.http_port),
            "ISHGW_HTTPS_PORT": str(self.https_port),
            "ISHGW_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
            "ISHGW_NGINX_WORKER_PROCESSES": str(self.workers),
            "ISHGW_VENV": sys.prefix,
        }

    def run(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        """deploy gets every setting; the other commands only ISHGW_HOME (they must read gateway.env)."""
        env = base_env()
        env.update(self.settings if args[0] == "deploy" else {"ISHGW_HOME": str(self.home)})
        return subprocess.run(
            [str(SCRIPT), *args], cwd=ROOT, env=env, text=True, capture_output=True, timeout=timeout
        )

    @property
    def nginx_prefix(self) -> Path:
        return self.home / "nginx"

    def pid(self, pid_file: str) -> int:
        return int((self.home / pid_file).read_text().strip())

    @property
    def controller_pid(self) -> int:
        return self.pid("controller.pid")

    @property
    def nginx_pid(self) -> int:
        return self.pid("nginx/nginx.pid")

    def nginx_workers(self) -> set[int]:
        return {p.pid for p in self.host.process.filter(ppid=self.nginx_pid) if "worker process" in p.args}

    @property
    def admin_key(self) -> str:
        return (self.home / "secrets" / "admin_api_key").read_text().strip()

    def health(self, scheme: str = "http", verify: Any = False) -> dict[str, Any]:
        port = self.https_port if scheme == "https" else self.http_port
        response = httpx.get(f"{scheme}://127.0.0.1:{port}/health", verify=verify, timeout=5, trust_env=False)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def admin(self, path: str, key: str | None = None) -> httpx.Response:
        headers = {"X-Admin-API-Key": key} if key else {}
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        return httpx.get(url, headers=headers, timeout=5, trust_env=False)

    def logs(self) -> str:
        parts = []
        for path in (self.home / "logs" / "controller.log", self.nginx_prefix / "logs" / "error.log"):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    home = Path(tempfile.mkdtemp(prefix="ishgw-deploy-", dir="/tmp"))
    deployment = Deployment(home, *free_ports(3))
    stopped = False
    diagnostics.register(f"deployment {home}", deployment)
    try:
        result = deployment.run("deploy")
        if result.returncode != 0:
            pytest.fail(f"deploy failed: {describe(result)}\n{deployment.logs()}")
        yield deployment
    finally:
        diagnostics.unregister(deployment)
        stop = deployment.run("stop")
        stopped = stop.returncode == 0
        if not stopped:
            print(f"stop failed, keeping {home}: {describe(stop)}", file=sys.stderr)
        if stopped:
            shutil.rmtree(home, ignore_errors=True)
