"""deploy --systemd: the units of compose/systemd/, filled in for a home, pass `systemd-analyze verify` (no
warning either) and keep their hardening; without systemd as PID 1 deploy says so and starts nothing. The
units go to a directory of the test (ISHGW_SYSTEMD_DIR), never to /etc/systemd/system."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import SCRIPT, base_env, describe
from tests.ports import free_ports

pytestmark = pytest.mark.deploy

UNITS = ("ish-gateway.service", "ish-gateway-renew.service", "ish-gateway-renew.timer")


def systemd_is_pid1() -> bool:
    return Path("/run/systemd/system").is_dir() and Path("/proc/1/comm").read_text().strip() == "systemd"


@pytest.fixture(scope="module")
def installed(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian: systemd)")
    base = tmp_path_factory.mktemp("systemd")
    home, units = base / "home", base / "units"
    http, https, admin = free_ports(3)
    env = base_env()
    env.update(
        {
            "ISHGW_HOME": str(home),
            "ISHGW_HTTP_PORT": str(http),
            "ISHGW_HTTPS_PORT": str(https),
            "ISHGW_ADMIN_LISTEN": f"127.0.0.1:{admin}",
            "ISHGW_VENV": sys.prefix,
            "ISHGW_SYSTEMD_DIR": str(units),
        }
    )
    result = subprocess.run(
        [str(SCRIPT), "deploy", "--systemd"],
        env=env,
        text=True,
        capture_output=True,
        timeout=240,
        check=False,
    )
    return home, units, result


def test_deploy_systemd_refuses_clearly_and_starts_nothing(installed: tuple[Path, Path, Any]) -> None:
    home, _, result = installed
    assert result.returncode != 0, describe(result)
    if systemd_is_pid1():
        assert "systemd only runs units from /etc/systemd/system" in result.stderr, describe(result)
    else:
        assert "systemd is not running as PID 1" in result.stderr, describe(result)
        assert "Run deploy without --systemd" in result.stderr
    assert not (home / "controller.pid").exists()
    assert not (home / "nginx" / "nginx.pid").exists()
    # gateway.env is written: the unit reads it (EnvironmentFile)
    assert (home / "gateway.env").stat().st_mode & 0o777 == 0o600


def test_units_verify(installed: tuple[Path, Path, Any]) -> None:
    _, units, _ = installed
    files = [units / name for name in UNITS]
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o644
        text = path.read_text()
        assert "@ISHGW_" not in text, f"{path.name}: a placeholder is left"
    verify = subprocess.run(
        ["systemd-analyze", "verify", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert (verify.stdout + verify.stderr).strip() == "", "systemd-analyze verify warns:\n" + verify.stderr


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_controller_unit_is_hardened(installed: tuple[Path, Path, Any]) -> None:
    home, units, _ = installed
    unit = units / "ish-gateway.service"
    s = unit_settings(unit)
    assert s["ExecStart"] == [f"{sys.prefix}/bin/python -m control_plane"]
    assert s["Restart"] == ["on-failure"]
    assert s["EnvironmentFile"] == [f"{home}/gateway.env", f"-{home}/provider.env"]
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["ProtectSystem"] == ["strict"]
    assert s["ReadWritePaths"] == [str(home)]
    assert s["PrivateTmp"] == ["yes"]
    assert set(s["CapabilityBoundingSet"][0].split()) == {
        "CAP_NET_BIND_SERVICE",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_CHOWN",
        "CAP_KILL",
    }
    assert s["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    # systemd's own exposure score (0 best, 10 worst): the unit must stay at or below 3.5.
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=35", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert security.returncode == 0, security.stdout[-3000:]
    timer = unit_settings(units / "ish-gateway-renew.timer")
    assert timer["OnCalendar"] and timer["Persistent"] == ["true"]
    renew = unit_settings(units / "ish-gateway-renew.service")
    assert "ssl/generate-certs.sh" in renew["ExecStart"][0] and "renew-hook.sh" in renew["ExecStart"][0]
