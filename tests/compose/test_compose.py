"""docker-compose.yml for real: the gateway image built from compose/gateway/Dockerfile on a local
debian:bookworm-slim, started with PostgreSQL (a stand-in image built from the same base, through an
override file of this test), driven from the host through the published ports, restarted, taken down."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest

from tests import diagnostics
from tests.backends.stub_llm import StubServer
from tests.compose.conftest import ROOT, Engine
from tests.ports import free_ports

pytestmark = pytest.mark.compose

T = TypeVar("T")
COMPOSE_FILE = ROOT / "docker-compose.yml"
STATE = "/var/lib/ish-gateway"


def wait_for(what: str, predicate: Callable[[], T | None], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (httpx.HTTPError, OSError, openai.APIError) as exc:
            last, value = exc, None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not after {timeout} s (last error: {last!r})")


@pytest.mark.timeout(900)  # the first run installs docker-compose
@pytest.mark.parametrize("profile", [None, "postgres", "monitoring"])
def test_config_validates_every_profile(compose_binary: str, profile: str | None, tmp_path: Path) -> None:
    """`docker-compose config` accepts the file with each profile, from the documented .env.example."""
    env_file = tmp_path / ".env"
    env_file.write_text((ROOT / "compose" / ".env.example").read_text())
    args = [compose_binary, "-f", str(COMPOSE_FILE), "--env-file", str(env_file)]
    if profile:
        args += ["--profile", profile]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ISHGW_", "COMPOSE_", "DOCKER_"))}
    env["GATEWAY_ENV_FILE"] = str(env_file)
    result = subprocess.run(
        [*args, "config"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "gateway:" in result.stdout
    assert "HEALTHCHECK" in (ROOT / "compose" / "gateway" / "Dockerfile").read_text()


class Project:
    """One compose project (its own name, ports, env file and override) on the test's engine."""

    def __init__(self, engine: Engine, workdir: Path, compose_binary: str) -> None:
        self.engine = engine
        self.name = f"ishgwtest{secrets.token_hex(3)}"
        self.http_port, self.https_port, self.admin_port = free_ports(3)
        self.env_file = workdir / "test.env"
        password = secrets.token_hex(12)
        self.env_file.write_text(
            "\n".join(
                [
                    f"ISHGW_HTTP_PORT={self.http_port}",
                    f"ISHGW_HTTPS_PORT={self.https_port}",
                    "GATEWAY_BIND=127.0.0.1",
                    "ADMIN_BIND=127.0.0.1",
                    f"ADMIN_PORT={self.admin_port}",
                    f"POSTGRES_PASSWORD={password}",
                    f"ISHGW_DB_URL=postgresql+psycopg://ishgw:{password}@postgres:5432/ishgw",
                    "ISHGW_NGINX_WORKER_PROCESSES=2",
                    "",
                ]
            )
        )
        self.env_file.chmod(0o600)
        # The official postgres image cannot be pulled here: the same service, built from the local base.
        self.override = workdir / "override.yml"
        self.override.write_text(
            "services:\n"
            "  postgres:\n"
            f"    build: {{context: {ROOT / 'tests' / 'compose' / 'postgres'}}}\n"
            "    image: localhost/ishgw-test-postgres:15\n"
        )
        self.base = [
            compose_binary,
            "-p",
            self.name,
            "-f",
            str(COMPOSE_FILE),
            "-f",
            str(self.override),
            "--env-file",
            str(self.env_file),
            "--profile",
            "postgres",
        ]

    @property
    def env(self) -> dict[str, str]:
        env = self.engine.env
        env["GATEWAY_ENV_FILE"] = str(self.env_file)
        # Behind a TLS-inspecting egress (this machine's), pip in the build must trust its CA: the host's
        # locally added CAs. The build goes through the Docker API (no docker CLI needed).
        env["COMPOSE_DOCKER_CLI_BUILD"] = "0"
        env["BUILD_CA_CERTIFICATES"] = "".join(
            Path(p).read_text() for p in sorted(glob.glob("/usr/local/share/ca-certificates/*.crt"))
        )
        return env

    def compose(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.base, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check:
            assert result.returncode == 0, (
                f"docker-compose {' '.join(args)}: {result.stdout}\n{result.stderr}"
            )
        return result

    def read(self, path: str) -> str:
        return self.compose("exec", "-T", "gateway", "cat", path).stdout

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60", check=False).stdout

    def health(self) -> dict[str, Any] | None:
        response = httpx.get(f"http://127.0.0.1:{self.http_port}/health", timeout=2, trust_env=False)
        return response.json() if response.status_code == 200 else None


@pytest.fixture
def project(engine: Engine, compose_binary: str) -> Iterator[Project]:
    workdir = Path(tempfile.mkdtemp(prefix="ishgw-compose-"))
    project = Project(engine, workdir, compose_binary)
    diagnostics.register(f"compose project {project.name}", project)
    try:
        yield project
    finally:
        diagnostics.unregister(project)
        down = project.compose("down", "-v", "-t", "5", timeout=120, check=False)
        assert down.returncode == 0, down.stderr
        with contextlib.suppress(OSError):
            for path in workdir.iterdir():
                path.unlink()
            workdir.rmdir()


def served_certificate(port: int) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der
    return der


@pytest.mark.timeout(1800)
def test_gateway_with_postgres(project: Project, engine: Engine) -> None:
    started = time.monotonic()
    project.compose("build", timeout=1200)
    print(f"build: {time.monotonic() - started:.1f} s")
    size = engine.podman("image", "inspect", "--format", "{{.Size}}", "ish-gateway:local").stdout.strip()
    healthcheck = engine.podman(
        "image", "inspect", "--format", "{{json .Config.Healthcheck}}", "ish-gateway:local"
    )
    assert "/health" in healthcheck.stdout, "the image carries the HEALTHCHECK (docker format)"
    print(f"image ish-gateway:local: {int(size) / 1e6:.0f} MB")

    project.compose("up", "-d", "postgres")
    wait_for(
        "postgres accepts connections",
        lambda: (
            project.compose("exec", "-T", "postgres", "pg_isready", "-U", "ishgw", check=False).returncode
            == 0
        ),
        60,
    )
    up = time.monotonic()
    project.compose("up", "-d", "gateway")
    health = wait_for("gateway /health through the published port", project.health, 90)
    print(f"up -d gateway to first /health: {time.monotonic() - up:.2f} s")
    assert health["ok"] is True
    # The container's own HEALTHCHECK command passes (podman runs it on demand; no systemd timers here).
    container = project.compose("ps", "-q", "gateway").stdout.strip()
    checked = engine.podman("healthcheck", "run", container)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    key = project.read(f"{STATE}/secrets/admin_api_key").strip()
    cert_pem = project.read(f"{STATE}/ssl/cert.pem")
    ca_file = Path(project.env_file.parent / "gateway-ca.pem")
    ca_file.write_text(cert_pem)
    admin = httpx.Client(
        base_url=f"https://127.0.0.1:{project.admin_port}",
        verify=ssl.create_default_context(cafile=str(ca_file)),
        headers={"X-Admin-API-Key": key},
        timeout=10,
        trust_env=False,
    )
    assert admin.get("/admin/health").status_code == 200

    # The stand-in runs on the host, on the address the containers reach it at (the network's gateway).
    network = engine.podman("network", "inspect", f"{project.name}_default", "--format", "{{json .Subnets}}")
    host_address = json.loads(network.stdout)[0]["gateway"]
    with StubServer(name="compose-stub", host=host_address, models=["llama3.2"]) as stub:
        created = admin.post(
            "/admin/instances",
            json={
                "name": "host-stub",
                "provider_type": "openai",
                "api_base": f"http://{host_address}:{stub.port}",
                "supported_models": ["llama3.2"],
            },
        )
        assert created.status_code == 201, created.text
        client_key = admin.post("/admin/keys", json={"name": "compose"}).json()["key"]

        def chat() -> str:
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{project.http_port}/v1",
                api_key=client_key,
                max_retries=0,
                # openai takes a legacy httpx.Client at run time; its annotation names only httpx2.Client.
                http_client=httpx.Client(trust_env=False, timeout=10),  # type: ignore[arg-type]
            )
            answer = client.chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "hello"}]
            )
            return answer.choices[0].message.content or ""

        assert chat().startswith("Hello from compose-stub")
        # The registry is PostgreSQL's, not a SQLite file in the volume.
        rows = project.compose(
            "exec",
            "-T",
            "postgres",
            "psql",
            "-U",
            "ishgw",
            "-d",
            "ishgw",
            "-tAc",
            "SELECT name FROM instances",
        ).stdout.split()
        assert rows == ["host-stub"]
        der_before = served_certificate(project.https_port)

        project.compose("restart", "-t", "10", "gateway")
        restarted = time.monotonic()
        wait_for("gateway /health after the restart", project.health, 90)
        print(f"restart to first /health: {time.monotonic() - restarted:.2f} s")
        assert project.read(f"{STATE}/ssl/cert.pem") == cert_pem, "the certificate survives in the volume"
        assert served_certificate(project.https_port) == der_before
        assert project.read(f"{STATE}/secrets/admin_api_key").strip() == key
        names = [i["name"] for i in admin.get("/admin/instances").json()["instances"]]
        assert names == ["host-stub"], names
        assert wait_for("a chat answer after the restart", chat, 30).startswith("Hello from compose-stub")
