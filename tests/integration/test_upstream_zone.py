"""The shared upstream zone's budget (render/nginx.py zone_budget) against nginx's own slab: a zone of
exactly the budget holds the worst case (the longest address a server line can have, a unix socket path
at the kernel's limit; backup servers, which take a second peer list), and half of it does not (so the
test measures what nginx needs). One pool of many servers included: a zone of 64 KiB per pool, as
before, held about 70 (a model served by 80 instances failed `nginx -t`)."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest

from control_plane.render.nginx import ZONE_NAME, zone_budget

SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the terminating NUL


def _config(upstreams: int, servers: int, size_kb: int) -> str:
    lines = ["pid nginx.pid;", "error_log stderr;", "events {}", "http {"]
    for u in range(upstreams):
        lines.append(f"upstream p_{u:016x} {{\n    zone {ZONE_NAME} {size_kb}k;\n    least_conn;")
        for s in range(servers):
            tail = f"/i_{u:05d}_{s:02d}.sock"
            path = "/" + "r" * (SUN_PATH_MAX - len(tail) - 1) + tail
            backup = " backup" if s == servers - 1 else ""
            options = f"weight=1 max_fails=1 fail_timeout=10s max_conns=8{backup}"
            lines.append(f'    server "unix:{path}" {options};')
        lines.append("    keepalive 64;\n}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _nginx_t(prefix: Path, upstreams: int, servers: int, size_kb: int) -> subprocess.CompletedProcess[str]:
    conf = prefix / "nginx.conf"
    conf.write_text(_config(upstreams, servers, size_kb))
    return subprocess.run(
        ["nginx", "-p", f"{prefix}/", "-t", "-q", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(("upstreams", "servers"), [(1, 10), (300, 10), (1, 200)])
def test_the_zone_budget_holds_the_longest_addresses(tmp_path: Path, upstreams: int, servers: int) -> None:
    (tmp_path / "logs").mkdir()
    budget_kb = math.ceil(zone_budget(upstreams * servers, upstreams) / 1024)
    held = _nginx_t(tmp_path, upstreams, servers, budget_kb)
    assert held.returncode == 0, held.stderr
    if upstreams * servers > 10:  # ten servers' worth is below nginx's smallest zone: no margin to show
        short = _nginx_t(tmp_path, upstreams, servers, budget_kb // 2)
        assert short.returncode != 0 and "no memory in upstream zone" in short.stderr, short.stderr
