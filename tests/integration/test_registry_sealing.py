"""Provider keys encrypted at rest, against SQLite (a temp file) and a real PostgreSQL server: the raw rows
and the database file hold no provider key in clear, reads give it back, rows in clear are migrated, and a
registry refuses a key other than the one it was sealed with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from control_plane.registry.models import InstanceConfig, ProviderType
from control_plane.registry.sealing import KEY_BYTES, RegistryKeyError, Sealer, is_sealed, registry_sealer
from control_plane.registry.store import Store, instances
from tests.integration.postgres import pg_admin

SECRET = "sk-live-Zq81cleartext0123456789"
OTHER = "sk-ant-Yw55secondsecret98765"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    admin: str = request.getfixturevalue("postgres_server")
    database = f"t_{uuid.uuid4().hex[:16]}"
    pg_admin(admin, f"CREATE DATABASE {database}")
    try:
        yield admin.rsplit("/", 1)[0] + f"/{database}"
    finally:
        pg_admin(admin, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def cfg(name: str, api_key: str | None) -> InstanceConfig:
    return InstanceConfig(
        name=name, provider_type=ProviderType.OPENAI, supported_models=["gpt-4o"], api_key=api_key
    )


def raw_keys(store: Store) -> dict[str, str | None]:
    with store._engine.connect() as conn:
        rows = conn.execute(select(instances.c.name, instances.c.config)).all()
    return {name: json.loads(text).get("api_key") for name, text in rows}


def opened(url: str, sealer: Sealer) -> Store:
    store = Store(url)
    store.migrate()
    store.attach_sealer(sealer)
    return store


def test_writes_are_sealed_reads_are_clear(db_url: str) -> None:
    sealer = Sealer(bytes(range(KEY_BYTES)))
    store = opened(db_url, sealer)
    try:
        store.create_instance(cfg("a", SECRET))
        store.create_instance(cfg("ref", "env:OPENAI_KEY"))
        store.replace_all([cfg("b", OTHER), cfg("a", SECRET)], None, merge=True)
        raw = raw_keys(store)
        assert is_sealed(raw["a"]) and is_sealed(raw["b"])
        assert raw["ref"] == "env:OPENAI_KEY"  # a reference names a place, not a secret
        assert {c.name: c.api_key for c, _ in store.list_instances()} == {
            "a": SECRET,
            "b": OTHER,
            "ref": "env:OPENAI_KEY",
        }
        assert store.get_instance("b")[0].api_key == OTHER
        assert store.registry_key_id() == sealer.key_id
    finally:
        store.close()


def test_rows_in_clear_are_migrated_without_a_generation_bump(db_url: str) -> None:
    before = Store(db_url)  # a registry written before encryption at rest: no key attached
    before.migrate()
    before.create_instance(cfg("old", SECRET))
    assert raw_keys(before)["old"] == SECRET
    generation = before.generation()
    before.close()

    store = Store(db_url)
    store.migrate()
    assert store.attach_sealer(Sealer(bytes(range(KEY_BYTES)))) == 1
    try:
        assert is_sealed(raw_keys(store)["old"])
        assert store.get_instance("old")[0].api_key == SECRET
        assert store.generation() == generation
        assert store.attach_sealer(Sealer(bytes(range(KEY_BYTES)))) == 0  # idempotent
    finally:
        store.close()


def test_another_key_is_refused_and_changes_nothing(db_url: str) -> None:
    store = opened(db_url, Sealer(bytes(range(KEY_BYTES))))
    store.create_instance(cfg("a", SECRET))
    raw = raw_keys(store)
    store.close()
    other = Store(db_url)
    other.migrate()
    try:
        with pytest.raises(RegistryKeyError, match="encrypted with registry key"):
            other.attach_sealer(Sealer(bytes(KEY_BYTES)))
        assert raw_keys(other) == raw
        with pytest.raises(RegistryKeyError, match="no registry key"):
            other.list_instances()
    finally:
        other.close()


def test_the_sqlite_file_holds_no_provider_key(tmp_path: Path) -> None:
    path = tmp_path / "ishgw.db"
    store = opened(f"sqlite:///{path}", Sealer(bytes(range(KEY_BYTES))))
    for i in range(20):
        store.create_instance(cfg(f"inst-{i}", f"{SECRET}{i:02d}"))
    store.close()  # checkpoints the WAL into the file
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("ishgw.db"))
    assert b"inst-7" in data  # the rows are there
    assert SECRET.encode() not in data and SECRET[8:].encode() not in data


def test_the_controller_refuses_to_start_without_the_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    key_file = home / "secrets" / "registry.key"
    store = opened(f"sqlite:///{home / 'ishgw.db'}", registry_sealer(key_file, None))
    store.create_instance(cfg("a", SECRET))
    sealed_with = store.registry_key_id()
    store.close()
    key_file.unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISHGW_")}
    env.update(
        {"ISHGW_HOME": str(home), "ISHGW_ADMIN_LISTEN": "127.0.0.1:1", "ISHGW_PROBES_ENABLED": "false"}
    )
    result = subprocess.run(
        [sys.executable, "-m", "control_plane"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert f"refusing to start: {key_file} is missing" in result.stderr
    assert f"encrypted with registry key {sealed_with}" in result.stderr
    assert SECRET not in result.stderr
    assert not key_file.exists()  # no new key that could not open the old rows
