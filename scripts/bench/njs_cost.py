"""What the njs module costs each request before it does anything, in instructions (cachegrind).

njs 0.7 clones a VM per request and runs the module's top level in it again: every function object,
every property of the export object, every object literal. Timings of that on a shared 2-core VM move by
10-20 % between runs; instruction counts under cachegrind do not, so a change to nginx/njs can be checked
to the hundred instructions. nginx runs in one process (master_process off) under valgrind with two
locations that only hand the request to a proxied location: one in a trivial module, one in the gateway's
rendered module (its top level, settings preloaded as in production). Each is measured at 200 and 1,200
requests; the difference over 1,000 requests is the per-request count, without start-up.

    .venv/bin/python -m scripts.bench.njs_cost      (needs valgrind: apt-get install valgrind)
"""

from __future__ import annotations

import contextlib
import http.client
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from control_plane.registry.models import InstanceConfig, InstanceState, RoutingConfig
from control_plane.render.nginx import render
from control_plane.render.njs import MODULE
from control_plane.render.spec import ServerSettings, World, build_spec
from tests.integration.gateway import free_port

BODY = b'{"model":"m","messages":[{"role":"user","content":"hello"}]}'
FEW, MANY = 200, 1200
NGINX_CONF = """load_module /usr/lib/nginx/modules/ngx_http_js_module.so;
master_process off; daemon off; pid {dir}/nginx.pid; error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off; client_body_temp_path {dir}/tmp;
  js_path {dir}; js_import m from main.js; js_preload_object clients from clients.json;
  upstream b {{ server 127.0.0.1:{backend}; keepalive 4; }}
  server {{ listen 127.0.0.1:{backend}; location / {{ return 200 '{{"ok":1}}'; }} }}
  server {{
    listen 127.0.0.1:{front};
    location / {{ js_content m.go; }}
    location @b {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
"""
TRIVIAL = "function go(r) { r.internalRedirect('@b'); }\nexport default {go};\n"


def gateway_tree() -> dict[str, str]:
    configs = [
        InstanceConfig(
            name=f"i{n}", provider_type="ollama", api_base="http://127.0.0.1:1", supported_models=["m"]
        )
        for n in range(2)
    ]
    world = World(
        instances=tuple((c, InstanceState()) for c in configs),
        routing=RoutingConfig(),
        now=datetime.now(UTC),
        addresses={"127.0.0.1": ("127.0.0.1",)},
        secrets={},
    )
    return render(build_spec(world, ServerSettings(prefix="/unused", run_dir="/unused", http_port=1))).files


def with_handler(module: str) -> str:
    """The rendered module, exporting a handler that does what TRIVIAL's does."""
    body, export = module.rsplit("export default {", 1)
    return body + "function go(r) { r.internalRedirect('@b'); }\nexport default {go, " + export


def _wait_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("nginx under valgrind exited")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nginx did not listen on {port} within {seconds} s")


def stop(proc: subprocess.Popen[bytes], port: int) -> None:
    """Fast shutdown. Under valgrind the signal only takes effect once nginx's event wait returns, so a
    connection wakes it (a graceful stop would wait out nginx's keep-alive connections to itself)."""
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        with socket.socket() as s:
            s.connect_ex(("127.0.0.1", port))
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
    if proc.poll() is None:
        proc.kill()
        raise RuntimeError("nginx under valgrind did not stop")


def instructions(directory: Path, requests: int) -> int:
    """Instructions nginx executed from start to exit, having served `requests` POSTs on one connection."""
    backend, front = free_port(), free_port()
    (directory / "tmp").mkdir(exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=directory, backend=backend, front=front))
    out = directory / "cachegrind.out"
    valgrind = ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}"]
    proc = subprocess.Popen(
        [*valgrind, "nginx", "-p", f"{directory}/", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(front, proc)
        client = http.client.HTTPConnection("127.0.0.1", front, timeout=30)
        for _ in range(requests):
            client.request("POST", "/", body=BODY, headers={"Content-Type": "application/json"})
            response = client.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"{response.status}: {(directory / 'error.log').read_text()[-500:]}")
        client.close()
    finally:
        stop(proc, front)
    match = re.search(r"^summary: (\d+)", out.read_text(), re.M)
    if match is None:
        raise RuntimeError("no cachegrind summary")
    return int(match.group(1))


def per_request(directory: Path) -> int:
    return (instructions(directory, MANY) - instructions(directory, FEW)) // (MANY - FEW)


def measure() -> dict[str, int]:
    """{"trivial": n, "gateway": n, "module_start": gateway - trivial} instructions per request."""
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind is not installed (apt-get install valgrind)")
    tree = gateway_tree()
    modules = {"trivial": TRIVIAL, "gateway": with_handler(tree[MODULE])}
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="ishgw-njs-cost-") as tmp:
        for name, module in modules.items():
            directory = Path(tmp) / name
            directory.mkdir()
            (directory / "main.js").write_text(module)
            (directory / "clients.json").write_text(tree["clients.json"])
            counts[name] = per_request(directory)
    counts["module_start"] = counts["gateway"] - counts["trivial"]
    return counts


def main() -> int:
    counts = measure()
    print(
        f"instructions per request: trivial njs module {counts['trivial']:,}; gateway module "
        f"{counts['gateway']:,}; the gateway module's start: {counts['module_start']:,}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
