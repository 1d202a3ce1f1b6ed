"""A real gateway for tests: the controller as a subprocess (it starts nginx) on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from control_plane.nginx_process import NginxProcess, worker_count
from control_plane.nginx_process import children as nginx_children
from tests import diagnostics
from tests.ports import free_ports
from tests.tls_util import make_self_signed

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll until predicate() is truthy (its value, never None); fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # a condition not yet reachable
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}: {last_error}")


def clear_of_midnight(margin_s: float) -> None:
    """Return once the next ``margin_s`` seconds stay within one UTC day (at once, unless midnight is that
    close: then just after it), for a test whose figures are per day (a day's budget, "today")."""
    wait_for(
        lambda: 86400 - time.time() % 86400 > margin_s,
        timeout=margin_s + 5,
        interval=0.5,
        what="midnight (UTC) passed",
    )


def sigkill_nginx(master: int) -> list[int]:
    """SIGKILL an nginx master and its children (the master alone would leave its workers behind); the
    pids killed."""
    pids = [master, *nginx_children(master)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


class Gateway:
    """Controller + nginx under a private home. Use as a context manager."""

    def __init__(self, extra_env: dict[str, str] | None = None, home: Path | None = None) -> None:
        self.home = home or Path(tempfile.mkdtemp(prefix="ishgw-", dir="/tmp"))
        self.http_port, self.admin_port = free_ports(2)
        self.admin_key = "test-admin-key-0123456789"
        self.env = {
            **os.environ,
            "ISHGW_HOME": str(self.home),
            "ISHGW_HTTP_PORT": str(self.http_port),
            "ISHGW_HTTPS_PORT": "0",
            "ISHGW_LISTEN_ADDRESS": "127.0.0.1",
            "ISHGW_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
            "ISHGW_ADMIN_API_KEY": self.admin_key,
            "ISHGW_NGINX_WORKER_PROCESSES": "2",
            "ISHGW_RELOAD_MIN_INTERVAL_S": "0.2",
            # These tests exercise routing: clients send no gateway key
            # (tests/integration/test_client_access.py switches it on). Running open must be said explicitly.
            "ISHGW_AUTH_REQUIRED": "false",
            # ... and drive a thousand requests a second from one address: no per-address or per-class
            # limits (test_client_access.py tests them).
            "ISHGW_LIMIT_IP_RPM": "0",
            "ISHGW_LIMIT_CHAT_RPM": "0",
            "ISHGW_LIMIT_EMBEDDINGS_RPM": "0",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin = httpx.Client(
            base_url=f"http://127.0.0.1:{self.admin_port}",
            headers={"X-Admin-API-Key": self.admin_key},
            timeout=10,
        )
        self.client = httpx.Client(base_url=self.url, timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid_file(self) -> Path:
        return self.home / "nginx" / "nginx.pid"

    def start_controller(self) -> None:
        log = open(self.home / "controller.log", "ab")  # noqa: SIM115 - lives as long as the process
        diagnostics.register(f"gateway {self.home}", self)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "control_plane"], cwd=ROOT, env=self.env, stdout=log, stderr=log
        )
        wait_for(self._admin_up, timeout=20, what="controller admin API")
        wait_for(lambda: self.health().get("ok"), timeout=20, what="nginx /health")

    def _admin_up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"controller exited: {self.logs()}")
        return self.admin.get("/admin/health").status_code == 200

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=2, headers={"Connection": "close"}).json()  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        response = self.admin.get("/admin/status")
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def add_instance(self, **config: Any) -> httpx.Response:
        """POST /admin/instances. Model discovery is off unless asked for (discover_models=None: the
        provider type's default): the stand-ins list models of their own, and a pool appearing after the
        first probe would race tests written for the configured models (test_routing.py tests discovery)."""
        config.setdefault("discover_models", False)
        return self.admin.post("/admin/instances", json=config)

    def wait_applied(self, timeout: float = 5.0) -> str:
        """Wait until nginx serves the configuration generation the registry is at, with the pools
        /admin/status shows (a health verdict changes those without a new generation: desired_checksum),
        and nothing else serves; return the checksum.

        /health answering the new checksum shows that a new worker runs, not that the old ones stopped
        serving: after a reload the master forks the new workers, sleeps 100 ms, then tells the old ones to
        shut down, and an old worker that has not yet handled that signal still accepts on the shared
        (reuseport) sockets and still answers requests on its keep-alive connections with the old
        configuration. An old worker titles itself "is shutting down" just before it closes its listening
        sockets and idle connections, so the wait also lasts until exactly the configured number of nginx's
        children are not shutting down."""

        seen: dict[str, object] = {}

        def applied() -> str | None:
            status = self.status()
            health = self.health()
            seen.update(health=health, accepting_workers=self.accepting_workers(), status=status)
            same = health.get("generation") == status["generation"] and (
                health["checksum"] == status["checksum"] == status["desired_checksum"]
            )
            return str(health["checksum"]) if same and seen["accepting_workers"] == self.workers else None

        try:
            return wait_for(applied, timeout=timeout, what="configuration applied")
        except AssertionError as exc:  # say what was seen last: a slow reload, a failed one, old workers
            last = {k: v for k, v in seen.items() if k != "status"}
            if isinstance(status := seen.get("status"), dict):
                keys = ("generation", "checksum", "desired_checksum", "applied", "last_reload")
                last["status"] = {k: status.get(k) for k in keys}
            raise AssertionError(f"{exc}\nlast seen: {last}") from exc

    @property
    def workers(self) -> int:
        return worker_count(self.env["ISHGW_NGINX_WORKER_PROCESSES"])

    def accepting_workers(self) -> int | None:
        """How many of the nginx master's children may take a request (see NginxProcess)."""
        return NginxProcess(self.home / "nginx").accepting_workers()

    def nginx_master_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def kill_controller(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def controller_stop_and_kill_nginx(self) -> None:
        """Stop the controller, then SIGKILL nginx's master and workers (what an OOM kill does)."""
        self.stop_controller()
        master = self.nginx_master_pid()
        assert master is not None
        killed = sigkill_nginx(master)
        wait_for(lambda: all(not Path(f"/proc/{pid}").exists() for pid in killed), what="nginx gone")

    def stop_controller(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def logs(self) -> str:
        parts = []
        for path in (self.home / "controller.log", self.home / "nginx" / "logs" / "error.log"):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path}\n" + path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def stop(self) -> None:
        diagnostics.unregister(self)
        self.stop_controller()
        pid = self.nginx_master_pid()
        if pid:
            os.kill(pid, signal.SIGQUIT)
            with contextlib.suppress(AssertionError):
                wait_for(lambda: self.nginx_master_pid() is None, timeout=10, what="nginx exit")
            if self.nginx_master_pid():
                self._kill_nginx(pid)
        self.admin.close()
        self.client.close()

    def _kill_nginx(self, master: int) -> None:
        """nginx did not quit: a worker stuck in a handler never handles the master's QUIT, and killing the
        master alone would leave it behind, busy, for the rest of the suite. Kill the master and its
        children, and say so: a worker that does not come back to its event loop is a bug to find."""
        print(
            f"nginx under {self.home} did not quit in 10 s; killing master {master} and"
            f" {nginx_children(master)}",
            file=sys.stderr,
        )
        sigkill_nginx(master)

    def __enter__(self) -> Gateway:
        try:
            self.start_controller()
        except BaseException:
            print(self.logs(), file=sys.stderr)
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            print(self.logs(), file=sys.stderr)
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)


def admin_tls_gateway(directory: Path) -> Gateway:
    """A gateway whose admin listener serves HTTPS only, with a self-signed certificate made in
    ``directory``; its ``admin`` client speaks HTTPS (not verifying that certificate)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    make_self_signed(cert, key)
    gw = Gateway(
        extra_env={
            "ISHGW_ADMIN_TLS": "true",
            "ISHGW_ADMIN_TLS_CERT": str(cert),
            "ISHGW_ADMIN_TLS_KEY": str(key),
        }
    )
    gw.admin = httpx.Client(
        base_url=f"https://127.0.0.1:{gw.admin_port}", headers={"X-Admin-API-Key": gw.admin_key}, verify=False
    )
    return gw
