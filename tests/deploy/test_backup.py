"""backup, restore, update and clean of scripts/deploy-load-balancer.sh on a real deployment, with the
official openai SDK sending through the gateway while they run. The tests run in file order on one
deployment; the last one cleans it."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import sqlite3
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.backends.stub_llm import StubServer
from tests.deploy.conftest import SCRIPT, Deployment, base_env, describe

pytestmark = pytest.mark.deploy

PROVIDER_KEYS = {"bk-a": "sk-live-BackupTestA0123456789", "bk-b": "sk-live-BackupTestB9876543210"}
MODEL = "bk-model"
LOAD_SECONDS = 90.0  # upper bound; every load below is stopped as soon as its command returns
LOAD_MAX_REQUESTS = 5000


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServer]:
    server = StubServer(name="bk").start()
    try:
        yield server
    finally:
        server.stop()


def admin(d: Deployment, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method,
        f"http://127.0.0.1:{d.admin_port}{path}",
        headers={"X-Admin-API-Key": d.admin_key},
        timeout=10,
        trust_env=False,
        **kwargs,
    )


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class SdkLoad:
    """Threads sending chat completions with the openai SDK (its default retries, as users have them)
    until stopped, LOAD_SECONDS or LOAD_MAX_REQUESTS; every failure is kept."""

    def __init__(self, d: Deployment, key: str, threads: int = 3) -> None:
        self.base_url, self.key = f"http://127.0.0.1:{d.http_port}/v1", key
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        client = openai.OpenAI(base_url=self.base_url, api_key=self.key, timeout=15)
        deadline = time.monotonic() + LOAD_SECONDS
        try:
            while not self._stop.is_set() and time.monotonic() < deadline and self.ok < LOAD_MAX_REQUESTS:
                try:
                    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
                except openai.OpenAIError as exc:
                    with self._lock:
                        self.failures.append(repr(exc)[:200])
                    continue
                with self._lock:
                    self.ok += 1
        finally:
            client.close()

    def __enter__(self) -> SdkLoad:
        for thread in self._threads:
            thread.start()
        wait_for(lambda: self.ok > 0 or bool(self.failures), "the first request of the load")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def chat(d: Deployment, key: str) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{d.http_port}/v1", api_key=key, max_retries=0, timeout=10
    )
    with client:
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def registry_bytes(d: Deployment) -> bytes:
    """The database file and its WAL (not -shm, where every reader marks its place)."""
    files = (d.home / "ishgw.db", d.home / "ishgw.db-wal")
    return b"".join(p.read_bytes() for p in files if p.exists())


# What a refused restore must leave as it was: the operators' configuration, not the state the running
# controller keeps writing (health, usage, the audit of the test's own calls).
CONFIGURATION = {
    "instances": "SELECT name, config FROM instances ORDER BY name",
    "client_keys": "SELECT id, key_hash, data FROM client_keys ORDER BY id",
    "settings": "SELECT key, value FROM settings ORDER BY key",
    "schema": "SELECT version FROM schema_migrations ORDER BY version",
}


def registry_configuration(d: Deployment) -> dict[str, list[tuple[Any, ...]]]:
    """The registry's configuration rows, read through SQLite (read-only, a consistent snapshot)."""
    with contextlib.closing(sqlite3.connect(f"file:{d.home / 'ishgw.db'}?mode=ro", uri=True)) as db:
        return {table: db.execute(query).fetchall() for table, query in CONFIGURATION.items()}


def archive_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def instance_names(d: Deployment) -> list[str]:
    return sorted(i["name"] for i in admin(d, "GET", "/admin/instances").json()["instances"])


STATE: dict[str, Any] = {}


def test_setup_instances_and_a_client_key(deployment: Deployment, stub: StubServer) -> None:
    for name, provider_key in PROVIDER_KEYS.items():
        created = admin(
            deployment,
            "POST",
            "/admin/instances",
            json={
                "name": name,
                "provider_type": "openai",
                "api_base": f"{stub.url}/v1",
                "api_key": provider_key,
                "supported_models": [MODEL],
            },
        )
        assert created.status_code == 201, created.text
    key = admin(deployment, "POST", "/admin/keys", json={"name": "bk-client"})
    assert key.status_code == 201, key.text
    STATE["client_key"], STATE["client_key_id"] = key.json()["key"], key.json()["id"]
    stub.clear_requests()
    assert chat(deployment, STATE["client_key"]).choices[0].message.content
    sent = stub.last_request("/v1/chat/completions")["headers"].get("Authorization", "")
    assert sent in {f"Bearer {k}" for k in PROVIDER_KEYS.values()}  # the provider key reaches the backend


def test_the_registry_holds_no_provider_key_in_clear(deployment: Deployment) -> None:
    key_file = deployment.home / "secrets" / "registry.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    data = registry_bytes(deployment)
    assert b"bk-a" in data  # the rows are there
    for key in PROVIDER_KEYS.values():
        assert key.encode() not in data
    dump = subprocess.run(
        ["sqlite3", str(deployment.home / "ishgw.db"), ".dump"], capture_output=True, text=True, check=False
    )
    if dump.returncode == 0:  # the sqlite3 shell is optional
        assert "enc:v1:" in dump.stdout and not any(k in dump.stdout for k in PROVIDER_KEYS.values())


def test_backup_under_load(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> None:
    where = tmp_path_factory.mktemp("backups")
    with SdkLoad(deployment, STATE["client_key"]) as load:
        plain = deployment.run("backup", str(where / "plain.tar.gz"))
        full = deployment.run("backup", "--with-secrets", str(where / "full.tar.gz"))
    assert plain.returncode == 0, describe(plain)
    assert full.returncode == 0, describe(full)
    assert load.failures == [] and load.ok > 0, load.failures[:5]
    print(f"backup under load: {load.ok} openai SDK requests, {len(load.failures)} failed")
    for name in ("plain", "full"):
        path = where / f"{name}.tar.gz"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    plain_members = archive_members(where / "plain.tar.gz")
    full_members = archive_members(where / "full.tar.gz")
    manifest = json.loads(plain_members["manifest.json"])
    assert manifest["format"] == "ish-gateway-backup" and manifest["instances"] == 2
    assert manifest["with_secrets"] is False and manifest["database"] == "sqlite"
    assert {"registry/ishgw.db", "files/gateway.env", "files/ssl/cert.pem", "files/ssl/key.pem"} <= set(
        plain_members
    )
    assert "files/secrets/registry.key" not in plain_members
    assert "files/secrets/admin_api_key" not in plain_members
    assert {"files/secrets/registry.key", "files/secrets/admin_api_key"} <= set(full_members)
    raw = gzip.decompress((where / "plain.tar.gz").read_bytes())
    for secret in [*PROVIDER_KEYS.values(), deployment.admin_key]:
        assert secret.encode() not in raw
    STATE["plain"], STATE["full"] = where / "plain.tar.gz", where / "full.tar.gz"


def test_delete_instances_and_the_key(deployment: Deployment) -> None:
    for name in PROVIDER_KEYS:
        assert admin(deployment, "DELETE", f"/admin/instances/{name}").status_code == 204
    assert admin(deployment, "DELETE", f"/admin/keys/{STATE['client_key_id']}").status_code == 204
    with pytest.raises(openai.AuthenticationError):
        chat(deployment, STATE["client_key"])
    assert instance_names(deployment) == []


def unchanged_after(deployment: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the command; the controller, the registry's configuration, settings and instances stay as
    they were."""
    controller, names = deployment.controller_pid, instance_names(deployment)
    before, settings = registry_configuration(deployment), (deployment.home / "gateway.env").read_bytes()
    result = deployment.run(*args)
    assert result.returncode != 0, describe(result)
    assert deployment.controller_pid == controller
    assert registry_configuration(deployment) == before and instance_names(deployment) == names
    assert (deployment.home / "gateway.env").read_bytes() == settings
    return result


def test_a_corrupted_archive_is_refused_and_changes_nothing(deployment: Deployment, tmp_path: Path) -> None:
    data = bytearray(STATE["plain"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "corrupt.tar.gz").write_bytes(bytes(data))
    result = unchanged_after(deployment, "restore", str(tmp_path / "corrupt.tar.gz"))
    assert "damaged" in result.stderr or "checksum mismatch" in result.stderr, result.stderr
    assert "nothing was changed" in result.stderr

    # Well-formed, but a member altered and the archive rebuilt: the manifest's checksum catches it.
    members = archive_members(STATE["plain"])
    members["files/gateway.env"] += b"ISHGW_HTTP_PORT=1\n"
    altered = tmp_path / "altered.tar.gz"
    with tarfile.open(altered, "w:gz") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    result = unchanged_after(deployment, "restore", str(altered))
    assert "files/gateway.env: checksum mismatch" in result.stderr, result.stderr


def test_a_foreign_archive_is_refused_and_changes_nothing(deployment: Deployment, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.tar.gz"
    with tarfile.open(foreign, "w:gz") as tar:
        body = b"not a gateway\n"
        info = tarfile.TarInfo("etc/hosts")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    result = unchanged_after(deployment, "restore", str(foreign))
    assert "not an ISH Gateway backup" in result.stderr, result.stderr
    (tmp_path / "text.tar.gz").write_text("hello\n")
    result = unchanged_after(deployment, "restore", str(tmp_path / "text.tar.gz"))
    assert "not a gzip tar archive" in result.stderr, result.stderr


def test_without_secrets_restore_needs_the_key_and_says_so(deployment: Deployment) -> None:
    key_file = deployment.home / "secrets" / "registry.key"
    aside = key_file.with_name("registry.key.aside")
    key_file.rename(aside)
    try:
        result = unchanged_after(deployment, "restore", str(STATE["plain"]))
    finally:
        aside.rename(key_file)
    assert "made without secrets: restoring it needs registry key" in result.stderr, result.stderr
    assert "--with-secrets" in result.stderr


def test_restore_brings_everything_back_while_nginx_serves(deployment: Deployment) -> None:
    master, controller = deployment.nginx_pid, deployment.controller_pid
    health_failures: list[str] = []
    done = threading.Event()
    checks = 0

    def watch() -> None:
        nonlocal checks
        deadline = time.monotonic() + LOAD_SECONDS
        while not done.is_set() and time.monotonic() < deadline:
            try:
                deployment.health()
            except httpx.HTTPError as exc:
                health_failures.append(repr(exc))
            checks += 1
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = deployment.run("restore", str(STATE["plain"]))
    done.set()
    watcher.join(30)
    assert result.returncode == 0, describe(result) + deployment.logs()
    assert health_failures == []
    print(f"restore: {checks} /health checks during restore, {len(health_failures)} failed")
    assert deployment.nginx_pid == master and deployment.controller_pid != controller
    assert instance_names(deployment) == sorted(PROVIDER_KEYS)
    assert chat(deployment, STATE["client_key"]).choices[0].message.content  # the client key is valid again


def test_restore_with_secrets_into_a_home_without_the_key(deployment: Deployment, stub: StubServer) -> None:
    """The instances exist before and after: clients see no failure while the controller is replaced."""
    key_file = deployment.home / "secrets" / "registry.key"
    kept = key_file.read_bytes()
    key_file.unlink()
    with SdkLoad(deployment, STATE["client_key"]) as load:
        result = deployment.run("restore", str(STATE["full"]))
    assert result.returncode == 0, describe(result) + deployment.logs()
    assert load.failures == [] and load.ok > 0, load.failures[:5]
    print(f"restore under load: {load.ok} openai SDK requests, {len(load.failures)} failed")
    assert key_file.read_bytes() == kept and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    stub.clear_requests()
    assert chat(deployment, STATE["client_key"]).choices[0].message.content
    assert stub.last_request("/v1/chat/completions")["headers"].get("Authorization") in {
        f"Bearer {k}" for k in PROVIDER_KEYS.values()
    }


def test_legacy_export(deployment: Deployment, stub: StubServer) -> None:
    exported = admin(deployment, "GET", "/admin/config/export?format=legacy")
    assert exported.status_code == 200 and exported.headers["Content-Type"].startswith("application/json")
    pair = exported.json()
    assert sorted(pair["instance_configs"]) == sorted(PROVIDER_KEYS) == sorted(pair["instance_states"])
    assert pair["instance_configs"]["bk-a"]["api_key"] == "****" + PROVIDER_KEYS["bk-a"][-4:]
    assert pair["instance_configs"]["bk-a"]["supported_models"] == [MODEL]
    # The migration endpoint reads the pair back; a masked key keeps the key the gateway has.
    back = admin(deployment, "POST", "/admin/instances/migrate?mode=replace", json=pair)
    assert back.status_code == 200, back.text
    assert sorted(back.json()["imported"]) == sorted(PROVIDER_KEYS)
    stub.clear_requests()
    assert chat(deployment, STATE["client_key"]).choices[0].message.content
    assert stub.last_request("/v1/chat/completions")["headers"].get("Authorization") in {
        f"Bearer {k}" for k in PROVIDER_KEYS.values()
    }


def test_update_under_load_fails_no_request(deployment: Deployment) -> None:
    master, controller = deployment.nginx_pid, deployment.controller_pid
    with SdkLoad(deployment, STATE["client_key"]) as load:
        result = deployment.run("update")
        ok_during = load.ok
    assert result.returncode == 0, describe(result) + deployment.logs()
    assert "migrating the registry" in result.stderr
    assert "installing the project" not in result.stderr  # pyproject.toml did not change since deploy
    assert load.failures == [], load.failures[:5]
    assert ok_during > 0
    print(f"update under load: {ok_during} openai SDK requests during update, {len(load.failures)} failed")
    assert deployment.nginx_pid == master and deployment.controller_pid != controller
    assert deployment.run("status").returncode == 0


def test_periodic_backups_keep_the_newest(deployment: Deployment) -> None:
    env = base_env()
    env.update(deployment.settings)
    env.update({"ISHGW_BACKUP_INTERVAL_H": "0.0004", "ISHGW_BACKUP_KEEP": "2"})  # every 1.44 s
    result = subprocess.run([str(SCRIPT), "deploy"], env=env, text=True, capture_output=True, timeout=240)
    assert result.returncode == 0, describe(result)
    backups = deployment.home / "backups"
    seen: set[str] = set()
    most = 0

    def periodic() -> list[str]:
        return sorted(n for n in os.listdir(backups) if n.startswith("ishgw-")) if backups.is_dir() else []

    def four_made() -> bool:
        nonlocal most
        names = periodic()
        most = max(most, len(names))
        seen.update(names)
        return len(seen) >= 4

    wait_for(four_made, "four periodic backups", timeout=60)
    assert most <= 2 + 1  # at most one beyond ISHGW_BACKUP_KEEP, between writing and pruning
    wait_for(lambda: len(periodic()) == 2, "pruned to ISHGW_BACKUP_KEEP")
    newest = backups / periodic()[-1]
    assert stat.S_IMODE(newest.stat().st_mode) == 0o600
    assert json.loads(archive_members(newest)["manifest.json"])["with_secrets"] is False
    env.update({"ISHGW_BACKUP_INTERVAL_H": "", "ISHGW_BACKUP_KEEP": ""})
    result = subprocess.run([str(SCRIPT), "deploy"], env=env, text=True, capture_output=True, timeout=240)
    assert result.returncode == 0, describe(result)


def test_clean_refuses_what_is_not_a_gateway_home(tmp_path: Path) -> None:
    (tmp_path / "precious").write_text("keep me\n")
    env = {**base_env(), "ISHGW_HOME": str(tmp_path)}
    result = subprocess.run(
        [str(SCRIPT), "clean", "--yes"], env=env, text=True, capture_output=True, timeout=60
    )
    assert result.returncode != 0 and "is not an ISH Gateway home" in result.stderr, describe(result)
    assert (tmp_path / "precious").read_text() == "keep me\n"


def test_clean_asks_then_removes_everything(deployment: Deployment) -> None:
    env = {**base_env(), "ISHGW_HOME": str(deployment.home)}
    result = subprocess.run(  # stdin is not a terminal: no confirmation possible
        [str(SCRIPT), "clean"], env=env, stdin=subprocess.DEVNULL, text=True, capture_output=True, timeout=60
    )
    assert result.returncode != 0 and "--yes" in result.stderr, describe(result)
    assert (deployment.home / "gateway.env").exists()
    master, controller = deployment.nginx_pid, deployment.controller_pid
    result = deployment.run("clean", "--yes")
    assert result.returncode == 0, describe(result)
    assert list(deployment.home.iterdir()) == []
    wait_for(
        lambda: not Path(f"/proc/{master}").exists() and not Path(f"/proc/{controller}").exists(),
        "nginx and the controller gone",
        timeout=10,
    )
