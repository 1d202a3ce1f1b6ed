"""What an operator checks after `scripts/deploy-load-balancer.sh deploy`, against the real host.

The tests run in file order on one deployment (module fixture); the last one stops it.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.deploy.conftest import SCRIPT, Deployment, describe

pytestmark = pytest.mark.deploy


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if b"=" in item)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def processes_of(home: Path) -> list[str]:
    """Live processes whose command line mentions the home, or controllers running with ISHGW_HOME=home."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid() or not alive(int(proc.name)):
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env_home = environ(int(proc.name)).get("ISHGW_HOME")
        except OSError:
            continue
        if str(home) in cmdline or (env_home == str(home) and "control_plane" in cmdline):
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_controller_and_nginx_run(deployment: Deployment) -> None:
    host = deployment.host
    controller = host.process.get(pid=deployment.controller_pid)
    assert "-m control_plane" in controller.args
    assert environ(controller.pid)["ISHGW_HOME"] == str(deployment.home)
    assert controller.sid == controller.pid, "the controller runs in its own session (setsid)"

    master = host.process.get(pid=deployment.nginx_pid)
    assert master.args.startswith("nginx: master process")
    assert f"-p {deployment.nginx_prefix}/ " in master.args
    workers = host.process.filter(ppid=master.pid)
    assert len([w for w in workers if "worker process" in w.args]) == 2
    if os.geteuid() == 0:
        assert master.user == "root"
        assert {w.user for w in workers} == {"www-data"}


def test_sockets(deployment: Deployment) -> None:
    host = deployment.host
    assert host.socket(f"tcp://0.0.0.0:{deployment.http_port}").is_listening
    assert host.socket(f"tcp://0.0.0.0:{deployment.https_port}").is_listening
    admin = deployment.admin_port
    assert host.socket(f"tcp://127.0.0.1:{admin}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{admin}").is_listening
    assert not host.socket(f"tcp://:::{admin}").is_listening
    listening = host.socket.get_listening_sockets()
    bound = [s for s in listening if s.startswith("tcp://") and s.endswith(f":{admin}")]
    assert bound == [f"tcp://127.0.0.1:{admin}"], "the admin API listens on loopback only"


def test_admin_api_needs_the_key_from_the_key_file(deployment: Deployment) -> None:
    assert deployment.admin("/admin/health").status_code == 200
    assert deployment.admin("/admin/status").status_code == 401
    status = deployment.admin("/admin/status", deployment.admin_key)
    assert status.status_code == 200
    assert status.json()["checksum"] == deployment.health()["checksum"]


def test_secrets_are_private(deployment: Deployment) -> None:
    home = deployment.home
    for name in ("secrets/admin_api_key", "gateway.env", "ssl/key.pem", "ishgw.db"):
        path = home / name
        assert deployment.host.file(str(path)).mode == 0o600, path
    settings = (home / "gateway.env").read_text()
    assert f"ISHGW_HTTP_PORT={deployment.http_port}\n" in settings
    assert f"ISHGW_ADMIN_LISTEN=127.0.0.1:{deployment.admin_port}\n" in settings
    assert "ISHGW_ADMIN_API_KEY" not in settings, "a generated key stays in its own file"


def test_nginx_runs_the_rendered_tree(deployment: Deployment) -> None:
    prefix = deployment.nginx_prefix
    dump = deployment.host.run(f"nginx -T -p {prefix}/ -c live/nginx.conf")
    assert dump.rc == 0, dump.stderr
    checksum = deployment.health()["checksum"]
    assert f"# Configuration checksum: {checksum}" in dump.stdout
    live = prefix / "live"
    assert os.readlink(live) == f"generations/{checksum}"
    for conf in sorted(live.glob("*.conf")):
        assert f"# configuration file {conf}:" in dump.stdout, conf.name
        assert conf.read_text().strip() in dump.stdout, f"{conf.name} is not what nginx runs"
    assert "include http.conf;" in dump.stdout


def test_https_serves_the_self_signed_certificate(deployment: Deployment) -> None:
    cert = deployment.home / "ssl" / "cert.pem"
    assert deployment.health("https", verify=False)["ok"] is True
    # Trusting exactly that certificate works: nginx serves it, and it names 127.0.0.1.
    context = ssl.create_default_context(cafile=str(cert))
    assert deployment.health("https", verify=context) == deployment.health()
    days = deployment.host.run(f"openssl x509 -in {cert} -noout -checkend {800 * 86400}")
    assert days.rc == 0, "valid for 825 days"


def test_status_names_the_components(deployment: Deployment) -> None:
    result = deployment.run("status")
    assert result.returncode == 0, describe(result)
    out = result.stdout
    assert f"controller  running   pid {deployment.controller_pid}" in out
    assert f"nginx       running   master pid {deployment.nginx_pid}, 2 workers" in out
    assert f"checksum {deployment.health()['checksum']}" in out
    assert "pools       0" in out


def test_second_deploy_changes_nothing(deployment: Deployment) -> None:
    def snapshot() -> dict[str, object]:
        return {
            "controller": deployment.controller_pid,
            "master": deployment.nginx_pid,
            "workers": deployment.nginx_workers(),  # a reload would replace them
            "health": deployment.health(),
            "live": os.readlink(deployment.nginx_prefix / "live"),
            "gateway.env": (deployment.home / "gateway.env").stat().st_mtime_ns,
        }

    before = snapshot()
    result = deployment.run("deploy")
    assert result.returncode == 0, describe(result)
    assert "nothing to change" in result.stderr
    assert snapshot() == before


def test_changed_setting_restarts_only_the_controller(deployment: Deployment) -> None:
    controller, master, workers = deployment.controller_pid, deployment.nginx_pid, deployment.nginx_workers()
    checksum = deployment.health()["checksum"]
    deployment.workers = 3
    result = deployment.run("deploy")
    assert result.returncode == 0, describe(result)
    assert "settings changed" in result.stderr
    assert deployment.controller_pid != controller
    assert deployment.nginx_pid == master, "nginx keeps running; it is reloaded"
    assert deployment.health()["checksum"] != checksum
    # Old workers finish gracefully after the reload; wait for them to go.
    deadline = time.monotonic() + 10
    while (new_workers := deployment.nginx_workers()) & workers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(new_workers) == 3
    assert not new_workers & workers
    assert "ISHGW_NGINX_WORKER_PROCESSES=3\n" in (deployment.home / "gateway.env").read_text()


def test_stop_leaves_nothing_behind(deployment: Deployment) -> None:
    controller, master, workers = deployment.controller_pid, deployment.nginx_pid, deployment.nginx_workers()
    result = deployment.run("stop")
    assert result.returncode == 0, describe(result)
    assert not [pid for pid in (controller, master, *workers) if alive(pid)]
    assert processes_of(deployment.home) == []
    ports = {f":{p}" for p in (deployment.http_port, deployment.https_port, deployment.admin_port)}
    listening = deployment.host.socket.get_listening_sockets()
    assert not [s for s in listening if s.startswith("tcp://") and s[s.rindex(":") :] in ports]
    status = deployment.run("status")
    assert status.returncode != 0, describe(status)
    assert "STOPPED" in status.stdout
    again = deployment.run("stop")
    assert again.returncode == 0, describe(again)


def test_status_of_a_home_never_deployed(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(SCRIPT), "status"],
        env={"PATH": os.environ["PATH"], "ISHGW_HOME": str(tmp_path / "nothing")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 3, describe(result)
    assert "NOT DEPLOYED" in result.stdout
