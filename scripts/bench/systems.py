"""The systems under test, each started on free 127.0.0.1 ports and stopped by the driver:
the stand-in backend, a plain nginx proxy, the ISH Gateway (controller + its nginx) and LiteLLM's proxy."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scripts.bench.procs import Procs, read_stat
from tests import tls_util
from tests.integration.gateway import Gateway, wait_for
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
CHAT_PATH = "/v1/chat/completions"
STATIC_ANSWER = (
    '{"id":"chatcmpl-static","object":"chat.completion","created":1700000000,"model":"static-model",'
    '"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"'
    + "Hello from static! " * 14
    + '"}}],"usage":{"prompt_tokens":250,"completion_tokens":60,"total_tokens":310}}'
)


@dataclass
class Target:
    """One way to reach the backend: what the load generators need, and which processes to watch."""

    key: str
    label: str
    base_url: str  # scheme://host:port
    api_key: str | None = None
    watch: dict[str, Callable[[], list[int]]] = field(default_factory=dict)

    @property
    def chat_url(self) -> str:
        return self.base_url + CHAT_PATH


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= int(response.status) < 300
    except (OSError, urllib.error.URLError, ValueError):
        return False


def python_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ------------------------------------------------------------------------------------------ backend


class Backend:
    """tests/backends/stub_llm.py with several processes sharing one port (SO_REUSEPORT)."""

    def __init__(
        self, procs: Procs, work: Path, processes: int, chunks: int, chunk_delay_ms: int, name: str = "bench"
    ) -> None:
        self.procs = procs
        self.port = free_port()
        self.name = name
        self.processes = processes
        cmd = [
            sys.executable,
            "-m",
            "tests.backends.stub_llm",
            "--port",
            str(self.port),
            "--name",
            name,
            "--processes",
            str(processes),
            "--chunks",
            str(chunks),
            "--chunk-delay-ms",
            str(chunk_delay_ms),
            "--answer-bytes",
            "300",
            "--no-record",
        ]
        self.proc = procs.start(cmd, work / f"backend-{name}.log", env=python_env(), cwd=ROOT)
        wait_for(self._up, timeout=30, what=f"stand-in backend {name}")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"backend exited with {self.proc.returncode}")
        return http_ok(f"{self.url}/health")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc.poll() is None else []

    def kill(self) -> None:
        Procs.stop_group(self.proc, sig=9)


# ---------------------------------------------------------------------------------------- plain nginx

PLAIN_NGINX_CONF = """# Plain nginx proxy_pass with upstream keepalive: the data-plane limit.
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # equal to the gateway: SSE must flow chunk by chunk
            proxy_buffering off;
        }}
    }}
{static}}}
"""

STATIC_SERVERS = """    # a static backend (nginx itself) and a plain proxy to it: no Python in the path
    upstream static_backend {{
        server 127.0.0.1:{static_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{static_port} reuseport backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{answer}';
        }}
    }}
    server {{
        listen 127.0.0.1:{static_proxy_port} reuseport backlog=4096;
        location / {{
            proxy_pass http://static_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
"""


class PlainNginx:
    def __init__(self, procs: Procs, work: Path, backend_port: int, workers: str, static: bool) -> None:
        self.prefix = work / "plain-nginx"
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.static_port = free_port() if static else 0
        self.static_proxy_port = free_port() if static else 0
        static_text = (
            STATIC_SERVERS.format(
                static_port=self.static_port,
                static_proxy_port=self.static_proxy_port,
                answer=STATIC_ANSWER,
            )
            if static
            else ""
        )
        conf = self.prefix / "nginx.conf"
        conf.write_text(
            PLAIN_NGINX_CONF.format(
                workers=workers,
                prefix=self.prefix,
                backend_port=backend_port,
                port=self.port,
                static=static_text,
            )
        )
        test = subprocess.run(
            ["nginx", "-p", f"{self.prefix}/", "-c", str(conf), "-t", "-q"], capture_output=True, text=True
        )
        if test.returncode != 0:
            raise RuntimeError(f"plain nginx config rejected: {test.stderr}")
        self.proc = procs.start(["nginx", "-p", f"{self.prefix}/", "-c", str(conf)], work / "plain-nginx.log")
        wait_for(lambda: self._listening(), timeout=10, what="plain nginx")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"plain nginx exited: {(self.prefix / 'error.log').read_text()}")
        with contextlib.suppress(OSError):
            import socket

            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        return False

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc.poll() is None else []


# ------------------------------------------------------------------------------------------ gateway


def make_self_signed(directory: Path) -> None:
    tls_util.make_self_signed(directory / "cert.pem", directory / "key.pem")


class GatewaySystem:
    """The controller (which starts and reloads its nginx) under a private home, with TLS on a second port."""

    def __init__(self, procs: Procs, extra_env: dict[str, str]) -> None:
        self.procs = procs
        self.https_port = free_port()
        self._log_offset = 0
        env = {"ISHGW_HTTPS_PORT": str(self.https_port), **extra_env}
        self.gw = Gateway(extra_env=env)
        make_self_signed(self.gw.home / "ssl")
        try:
            self.gw.start_controller()
        except BaseException:
            print(self.gw.logs(), file=sys.stderr)
            self.stop()
            raise
        assert self.gw.proc is not None
        procs.adopt(self.gw.proc.pid)
        self.adopt_nginx()

    def adopt_nginx(self) -> None:
        pid = self.gw.nginx_master_pid()
        if pid is not None:
            self.procs.adopt(pid)

    @property
    def http_url(self) -> str:
        return self.gw.url

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def restart_controller(self, **env: str) -> None:
        """Stop the controller and start it again with ``env`` set (nginx keeps running; the new
        controller renders the same tree, so nginx is not reloaded)."""
        self.gw.stop_controller()
        self.gw.env.update(env)
        self.gw.start_controller()
        assert self.gw.proc is not None
        self.procs.adopt(self.gw.proc.pid)

    def controller_pids(self) -> list[int]:
        proc = self.gw.proc
        return [proc.pid] if proc is not None and proc.poll() is None else []

    def nginx_pids(self) -> list[int]:
        pid = self.gw.nginx_master_pid()
        return [pid] if pid else []

    def error_log_count(self, needle: str) -> int:
        """Lines containing `needle` added to nginx's error.log since the last call."""
        path = self.gw.home / "nginx" / "logs" / "error.log"
        count = 0
        with contextlib.suppress(OSError), path.open("rb") as handle:
            handle.seek(self._log_offset)
            for line in handle:
                count += needle.encode() in line
            self._log_offset = handle.tell()
        return count

    def reloads(self) -> int:
        try:
            return int(self.gw.status().get("reloads") or 0)
        except Exception:  # status unreachable: counted as no information
            return -1

    def live_dir(self) -> Path:
        return (self.gw.home / "nginx" / "live").resolve()

    def live_text(self) -> str:
        directory = self.live_dir()
        return "\n".join(p.read_text(errors="replace") for p in sorted(directory.glob("*")) if p.is_file())

    def stop(self, keep: bool = False) -> None:
        """Stop the controller and nginx; remove the home unless ``keep`` (its controller.log and
        registry, to read after a run)."""
        with contextlib.suppress(Exception):
            self.gw.stop()
        if not keep:
            shutil.rmtree(self.gw.home, ignore_errors=True)


# ------------------------------------------------------------------------------------------ LiteLLM

LITELLM_CONFIG = """# LiteLLM proxy: two deployments of the same model, master key, no database.
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {backend}/v1
      api_key: sk-stub-1
      # a price, as a real model has one: an unpriced model costs LiteLLM a zero-cost diagnostic per request
      input_cost_per_token: 0.0000001
      output_cost_per_token: 0.0000002
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {backend}/v1
      api_key: sk-stub-2
      input_cost_per_token: 0.0000001
      output_cost_per_token: 0.0000002
router_settings:
  routing_strategy: simple-shuffle
  num_retries: 2
general_settings:
  master_key: {master_key}
litellm_settings:
  telemetry: false
"""


class LiteLLM:
    MASTER_KEY = "sk-bench-master-key"

    def __init__(
        self, procs: Procs, work: Path, venv: Path, backend_url: str, model: str, workers: int, timeout: float
    ) -> None:
        binary = venv / "bin" / "litellm"
        if not binary.exists():
            raise FileNotFoundError(f"{binary} is missing (LiteLLM not installed)")
        self.port = free_port()
        directory = work / "litellm"
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "config.yaml"
        config.write_text(LITELLM_CONFIG.format(model=model, backend=backend_url, master_key=self.MASTER_KEY))
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.lower().endswith("_proxy") and not k.startswith("ISHGW_")
        }
        env.update(
            {
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the cost map from the internet
                "LITELLM_TELEMETRY": "False",
                "DISABLE_SCHEMA_UPDATE": "True",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.version = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        cmd = [
            str(binary),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--num_workers",
            str(workers),
        ]
        self.log = directory / "litellm.log"
        started = time.monotonic()
        self.proc = procs.start(cmd, self.log, env=env, cwd=directory)
        wait_for(self._ready, timeout=timeout, interval=0.25, what="LiteLLM /health/readiness")
        self.startup_s = round(time.monotonic() - started, 1)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"LiteLLM exited with {self.proc.returncode}: {tail}")
        return http_ok(f"{self.url}/health/readiness")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc.poll() is None and read_stat(self.proc.pid) else []
