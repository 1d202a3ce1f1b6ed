"""control_plane.backup against real databases (a SQLite file, a real PostgreSQL server with pg_dump and
pg_restore): archive while a writer works, delete, restore, everything back; nothing in clear."""

from __future__ import annotations

import gzip
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_plane import backup
from control_plane.registry.models import InstanceConfig, InstanceState, ProviderType
from control_plane.registry.sealing import registry_sealer
from control_plane.registry.store import Store
from control_plane.settings import Settings
from tests.integration.postgres import pg_admin

SECRETS = {f"inst-{i}": f"sk-live-ArchiveTest{i:04d}xyz" for i in range(12)}


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    home = tmp_path / "home"
    (home / "ssl").mkdir(parents=True)
    (home / "ssl" / "cert.pem").write_text("CERT\n")
    env = ["# ISH Gateway settings, written by test", "ISHGW_ADMIN_API_KEY=admin-key-in-env-0123456789"]
    (home / "gateway.env").write_text("\n".join([*env, "ISHGW_X=1", ""]))
    if request.param == "sqlite":
        yield Settings(home=home, db_url=f"sqlite:///{home / 'ishgw.db'}")
        return
    if shutil.which("pg_dump") is None:
        pytest.skip("pg_dump not installed")
    admin: str = request.getfixturevalue("postgres_server")
    database = f"t_{uuid.uuid4().hex[:16]}"
    pg_admin(admin, f"CREATE DATABASE {database}")
    try:
        yield Settings(home=home, db_url=admin.rsplit("/", 1)[0] + f"/{database}")
    finally:
        pg_admin(admin, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def open_store(settings: Settings) -> Store:
    store = Store(settings.database_url)
    store.migrate()
    store.attach_sealer(registry_sealer(settings.registry_key_path, store.registry_key_id()))
    return store


def test_archive_under_writes_then_restore(settings: Settings, tmp_path: Path) -> None:
    store = open_store(settings)
    for name, key in SECRETS.items():
        store.create_instance(
            InstanceConfig(name=name, provider_type=ProviderType.OPENAI, api_key=key, supported_models=["m"])
        )
    stop = threading.Event()
    writes = 0

    def writer() -> None:
        nonlocal writes
        while not stop.is_set() and writes < 20_000:
            store.put_state("inst-0", InstanceState(consecutive_failures=writes % 50))
            writes += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        plain = backup.create(settings, tmp_path / "plain.tar.gz", with_secrets=False)
        full = backup.create(settings, tmp_path / "full.tar.gz", with_secrets=True)
    finally:
        stop.set()
        thread.join(30)
    assert writes > 0
    assert plain["instances"] == 12 and plain["registry_key_id"] == store.registry_key_id()
    assert backup.REGISTRY_KEY_MEMBER in full["files"] and backup.REGISTRY_KEY_MEMBER not in plain["files"]
    raw = gzip.decompress((tmp_path / "plain.tar.gz").read_bytes())
    assert not any(key.encode() in raw for key in SECRETS.values())
    assert b"admin-key-in-env" not in raw and b"ISHGW_X=1" in raw

    for name in list(SECRETS)[:8]:
        store.delete_instance(name)
    store.close()  # the controller is stopped for a restore
    backup.restore(settings, tmp_path / "plain.tar.gz")
    again = open_store(settings)
    try:
        assert {c.name: c.api_key for c, _ in again.list_instances()} == SECRETS
    finally:
        again.close()
    assert "admin-key-in-env" in (settings.home / "gateway.env").read_text()  # this home's, kept


def test_with_secrets_restores_the_key_into_a_home_without_one(settings: Settings, tmp_path: Path) -> None:
    store = open_store(settings)
    store.create_instance(
        InstanceConfig(name="a", provider_type=ProviderType.OPENAI, api_key=SECRETS["inst-0"])
    )
    store.close()
    backup.create(settings, tmp_path / "full.tar.gz", with_secrets=True)
    backup.create(settings, tmp_path / "plain.tar.gz", with_secrets=False)
    key = settings.registry_key_path.read_bytes()
    settings.registry_key_path.unlink()
    with pytest.raises(backup.BackupError, match="made without secrets"):
        backup.restore(settings, tmp_path / "plain.tar.gz")
    assert not settings.registry_key_path.exists()
    backup.restore(settings, tmp_path / "full.tar.gz")
    assert settings.registry_key_path.read_bytes() == key
    again = open_store(settings)
    try:
        assert again.get_instance("a")[0].api_key == SECRETS["inst-0"]
    finally:
        again.close()
