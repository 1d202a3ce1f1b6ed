"""Client keys and the audit log on the real store (migration 2), SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from control_plane.errors import Conflict, NotFound
from control_plane.registry import store as store_module
from control_plane.registry.audit import AuditEntry, AuditLog
from control_plane.registry.client_keys import ClientKeySettings, ClientKeyStore
from control_plane.registry.store import Store
from tests.integration.test_store import db_url, store  # noqa: F401  (fixtures: both dialects)


def test_keys_store_only_hashes(store: Store) -> None:  # noqa: F811
    keys = ClientKeyStore(store)
    generation = store.generation()
    key, secret = keys.create(ClientKeySettings(name="team", allowed_models=["m*"], rpm_limit=60))
    assert store.generation() == generation + 1
    assert keys.get(key.id) == key and keys.list() == [key]
    assert key.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    with store._engine.connect() as conn:
        rows = conn.execute(select(store_module.client_keys)).mappings().all()
    assert secret not in repr(rows) and key.key_hash in repr(rows)

    with pytest.raises(Conflict):
        keys.create(ClientKeySettings(name="team"))
    other, _ = keys.create(ClientKeySettings(name="other"))
    with pytest.raises(Conflict):
        keys.update(other.id, {"name": "team"})
    expires = datetime.now(UTC) + timedelta(days=3)
    updated = keys.update(key.id, {"rpm_limit": 5, "expires_at": expires, "enabled": False})
    assert (updated.rpm_limit, updated.enabled, updated.key_hash) == (5, False, key.key_hash)
    assert keys.get(key.id).expires_at == expires
    before = store.generation()
    with pytest.raises(NotFound):
        keys.update("key_0000000000000000", {"rpm_limit": 1})
    assert store.generation() == before  # a failed write rolls its bump back
    assert keys.delete(key.id).id == key.id
    with pytest.raises(NotFound):
        keys.get(key.id)
    assert [k.name for k in keys.list()] == ["other"]


def test_concurrent_creates_of_one_name(store: Store) -> None:  # noqa: F811
    outcomes: list[str] = []

    def create() -> None:
        try:
            ClientKeyStore(store).create(ClientKeySettings(name="race"))
            outcomes.append("created")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=create) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == ["conflict"] * 5 + ["created"]


def test_audit_log(store: Store) -> None:  # noqa: F811
    audit = AuditLog(store, keep=100)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(5):
        audit.record(AuditEntry(at, "key:abc", "127.0.0.1", "POST", "/admin/keys", f"t{i}", 201))
    recent = audit.recent(3)
    assert [e.target for e in recent] == ["t4", "t3", "t2"]
    assert recent[0].at == at and recent[0].id is not None
    assert [e.target for e in audit.recent(10, before=recent[-1].id)] == ["t1", "t0"]


def test_key_updates_are_merged_and_validated_once_in_the_store(store: Store) -> None:  # noqa: F811
    """The admin API hands the store the body's fields as they came: the store merges them over the key
    and validates the whole strictly (as the OpenAPI schema states it), in its one transaction."""
    keys = ClientKeyStore(store)
    key, _ = keys.create(ClientKeySettings(name="strict", rpm_limit=60, allowed_models=["m*"]))
    before = store.generation()
    for bad in ({"rpm_limit": "5"}, {"enabled": "no"}, {"allowed_models": ["bad model"]}, {"surprise": 1}):
        with pytest.raises(ValidationError):
            keys.update(key.id, bad)
    assert store.generation() == before and keys.get(key.id) == key
    updated = keys.update(key.id, {"rpm_limit": 5, "expires_at": "2030-01-02T03:04:05Z"})
    assert (updated.rpm_limit, updated.allowed_models, updated.name) == (5, ["m*"], "strict")
    assert updated.expires_at == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
