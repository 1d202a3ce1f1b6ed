"""The machine and the versions a run reports in its header."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from scripts.bench.systems import ROOT


def sh(*cmd: str) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (proc.stdout + proc.stderr).strip()


def machine_info() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    os_name = "?"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "mem_gb": round(mem_kb / 2**20, 1),
        "os": os_name,
        "kernel": platform.release(),
    }


def versions() -> dict[str, str]:
    nginx = sh("nginx", "-v").replace("nginx version: ", "")
    lua = sh("dpkg-query", "-W", "-f=${Version}", "libnginx-mod-http-lua")
    wrk = sh("dpkg-query", "-W", "-f=${Version}", "wrk")
    return {"nginx": nginx, "lua module": lua, "wrk": wrk, "python": platform.python_version()}


# ---------------------------------------------------------------------------------------- measuring
