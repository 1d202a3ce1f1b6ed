"""The registry store against SQLite (a temp file) and a real PostgreSQL server started for the session."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import threading
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select, text

from control_plane.errors import Conflict, InvalidInput, NotFound
from control_plane.registry import store as store_module
from control_plane.registry.models import (
    HealthStatus,
    InstanceConfig,
    InstanceState,
    OperatorStatus,
    ProviderType,
    RoutingConfig,
    Strategy,
)
from control_plane.registry.store import Store, normalise_url
from control_plane.registry.usage import UsageStore
from control_plane.usage.model import DAY_S, Batch, UsageQuery, parse_batch
from control_plane.world import STATES_MARGIN, gather_world, read_environment, refresh_world
from tests.integration.postgres import pg_admin as _pg_admin

LITERAL_KEY = "sk-live-0123456789abcdef"
LATEST = store_module.MIGRATIONS[-1][0]  # the schema version a fresh database migrates to

# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database per test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    admin: str = request.getfixturevalue("postgres_server")
    database = f"t_{uuid.uuid4().hex[:16]}"
    _pg_admin(admin, f"CREATE DATABASE {database}")
    try:
        yield admin.rsplit("/", 1)[0] + f"/{database}"
    finally:
        _pg_admin(admin, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    s.migrate()
    try:
        yield s
    finally:
        s.close()


def cfg(name: str, **overrides: Any) -> InstanceConfig:
    values: dict[str, Any] = {"provider_type": ProviderType.OPENAI, "supported_models": ["gpt-4o"]}
    values.update(overrides)
    return InstanceConfig(name=name, **values)


def names(store: Store) -> list[str]:
    return [config.name for config, _ in store.list_instances()]


def snapshot(store: Store) -> tuple[Any, ...]:
    return (store.list_instances(), store.get_routing(), store.generation())


def unstamped(state: InstanceState) -> InstanceState:
    """A state without the time of its row's last write, to compare with one built in the test."""
    return state.model_copy(update={"updated_at": None})


def count_rows(store: Store, table: str) -> int:
    with store._engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


# -- schema ----------------------------------------------------------------------------------------------


def test_migrate_is_idempotent(db_url: str) -> None:
    s = Store(db_url)
    try:
        assert s.migrate() == LATEST
        assert s.migrate() == LATEST
        assert s.generation() == 0
        assert count_rows(s, "schema_migrations") == LATEST
        s.create_instance(cfg("a"))
    finally:
        s.close()
    # A restarted process migrates again: nothing changes, data survives.
    again = Store(db_url)
    try:
        assert again.migrate() == LATEST
        assert names(again) == ["a"]
        assert again.generation() == 1
    finally:
        again.close()


def test_concurrent_migrate(db_url: str) -> None:
    stores = [Store(db_url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    results: list[int] = []
    failures: list[BaseException] = []

    def run(s: Store) -> None:
        barrier.wait()
        try:
            results.append(s.migrate())
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert not failures
        assert results == [LATEST] * len(stores)
        assert count_rows(stores[0], "schema_migrations") == LATEST
        assert stores[0].generation() == 0
    finally:
        for s in stores:
            s.close()


def test_later_migrations_apply_in_order(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Store(db_url)
    try:
        assert s.migrate() == LATEST
        applied: list[int] = []

        def step(version: int) -> Any:
            return lambda conn: applied.append(version)

        later = [(LATEST + 1, step(LATEST + 1)), (LATEST + 2, step(LATEST + 2))]
        monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, *later])
        assert s.migrate() == LATEST + 2
        assert s.migrate() == LATEST + 2
        assert applied == [LATEST + 1, LATEST + 2]
    finally:
        s.close()


def test_migration_5_moves_the_status_out_of_the_observed_state(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry at schema 4 (the operator's status and derived fields inside the state JSON) keeps
    every status and observation; the JSON keeps only what is observed."""
    s = Store(db_url)
    try:
        with monkeypatch.context() as patched:
            patched.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:4])
            assert s.migrate() == 4
        s.create_instance(cfg("a", max_rpm=10))
        s.create_instance(cfg("b"))
        old_state = sa.Table(
            "instance_state",
            sa.MetaData(),
            sa.Column("name", sa.String(255), primary_key=True),
            sa.Column("state", sa.Text, nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        )
        old_a = {
            "status": "maintenance",
            "health_status": "healthy",
            "connection_status": "connected",
            "current_rpm": 4,
            "utilization_percentage": 40.0,
            "total_requests": 7,
            "updated_at": "2026-01-01T00:00:00Z",
        }
        at = datetime(2026, 1, 2, tzinfo=UTC)
        with s._engine.begin() as conn:
            conn.execute(text("DROP TABLE instance_state"))
            old_state.create(conn)
            conn.execute(sa.insert(old_state).values(name="a", state=json.dumps(old_a), updated_at=at))
            conn.execute(sa.insert(old_state).values(name="b", state='{"status": "bogus"}', updated_at=at))
        assert s.migrate() == LATEST
        states = {config.name: state for config, state in s.list_instances()}
        a, b = states["a"], states["b"]
        assert (a.status, a.health_status, a.total_requests, a.current_rpm) == (
            OperatorStatus.MAINTENANCE,
            HealthStatus.HEALTHY,
            7,
            4,
        )
        assert (a.connection_status, a.utilization_percentage, a.updated_at) == ("connected", 40.0, at)
        assert b.status is OperatorStatus.ACTIVE  # an unknown status was never valid: active, as before
        with s._engine.connect() as conn:
            stored = json.loads(
                conn.execute(text("SELECT state FROM instance_state WHERE name = 'a'")).scalar_one()
            )
        assert set(stored) == {"health_status", "current_rpm", "total_requests"}
        assert s.migrate() == LATEST  # again: nothing to do
    finally:
        s.close()


def test_status_and_observations_are_written_apart(store: Store) -> None:
    store.create_instance(cfg("a"))
    store.patch_states({"a": {"status": OperatorStatus.DRAINING}})
    store.patch_states({"a": {"health_status": HealthStatus.UNHEALTHY, "connection_status": "ignored"}})
    state = store.get_instance("a")[1]
    assert (state.status, state.health_status, state.connection_status) == (
        OperatorStatus.DRAINING,
        HealthStatus.UNHEALTHY,
        "disconnected",
    )
    store.put_state("a", InstanceState(status=OperatorStatus.ACTIVE, total_requests=3))
    state = store.get_instance("a")[1]
    assert (state.status, state.total_requests, state.health_status) == (
        OperatorStatus.ACTIVE,
        3,
        HealthStatus.UNKNOWN,
    )
    assert state.updated_at is not None and state.updated_at.tzinfo is not None


def test_postgres_url_without_driver_uses_psycopg(request: pytest.FixtureRequest) -> None:
    assert normalise_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    admin: str = request.getfixturevalue("postgres_server")
    s = Store(admin.replace("postgresql+psycopg://", "postgresql://"))
    try:
        assert s.dialect == "postgresql"
        with s._engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        s.close()


def test_unsupported_url() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        Store("mysql://u@h/db")


# -- CRUD ----------------------------------------------------------------------------------------------------


def test_crud(store: Store) -> None:
    assert store.list_instances() == []
    b = cfg("b-inst", api_key=LITERAL_KEY, weight=7, model_deployments={"gpt-4o": "dep1"}, tags=["x=1"])
    store.create_instance(b)
    store.create_instance(cfg("a-inst", provider_type=ProviderType.ANTHROPIC))
    assert names(store) == ["a-inst", "b-inst"]

    config, state = store.get_instance("b-inst")
    assert config == b
    assert unstamped(state) == InstanceState()

    changed = b.model_copy(update={"weight": 9, "enabled": False})
    store.replace_config(changed)
    assert store.get_instance("b-inst")[0] == changed

    store.delete_instance("a-inst")
    assert names(store) == ["b-inst"]
    with pytest.raises(NotFound):
        store.get_instance("a-inst")


def test_api_key_stored_literally(store: Store) -> None:
    store.create_instance(cfg("a", api_key=LITERAL_KEY))
    with store._engine.connect() as conn:
        raw = conn.execute(text("SELECT config FROM instances WHERE name = 'a'")).scalar_one()
    assert json.loads(raw)["api_key"] == LITERAL_KEY
    assert store.get_instance("a")[0].api_key == LITERAL_KEY


def test_conflict_and_not_found(store: Store) -> None:
    store.create_instance(cfg("a"))
    with pytest.raises(Conflict):
        store.create_instance(cfg("a", weight=3))
    assert store.get_instance("a")[0].weight == 1
    with pytest.raises(NotFound):
        store.get_instance("missing")
    with pytest.raises(NotFound):
        store.replace_config(cfg("missing"))
    with pytest.raises(NotFound):
        store.delete_instance("missing")
    with pytest.raises(NotFound):
        store.put_state("missing", InstanceState())
    assert names(store) == ["a"]


def test_generation(store: Store) -> None:
    assert store.generation() == 0
    store.create_instance(cfg("a"))
    assert store.generation() == 1
    store.replace_config(cfg("a", weight=2))
    assert store.generation() == 2
    store.set_routing(RoutingConfig(default_strategy=Strategy.ROUND_ROBIN))
    assert store.generation() == 3
    store.replace_all([cfg("b")], None, merge=True)
    assert store.generation() == 4
    store.delete_instance("b")
    assert store.generation() == 5

    store.put_state("a", InstanceState(status=OperatorStatus.DRAINING))
    assert store.generation() == 5

    # Failed writes roll their bump back.
    with pytest.raises(Conflict):
        store.create_instance(cfg("a"))
    with pytest.raises(NotFound):
        store.replace_config(cfg("nope"))
    with pytest.raises(NotFound):
        store.delete_instance("nope")
    assert store.generation() == 5


def test_concurrent_writers_do_not_lose_generation_bumps(store: Store, db_url: str) -> None:
    others = [Store(db_url) for _ in range(4)]
    failures: list[BaseException] = []

    def work(index: int, s: Store) -> None:
        try:
            for n in range(5):
                s.create_instance(cfg(f"w{index}-{n}"))
                s.put_state(f"w{index}-{n}", InstanceState(total_requests=n))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i, s)) for i, s in enumerate(others)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for s in others:
        s.close()
    assert not failures
    assert store.generation() == 20
    assert len(names(store)) == 20


# -- state ---------------------------------------------------------------------------------------------------


def test_state_round_trip_and_independence(store: Store) -> None:
    store.create_instance(cfg("a", api_key=LITERAL_KEY))
    state = InstanceState(
        status=OperatorStatus.MAINTENANCE,
        health_status=HealthStatus.UNHEALTHY,
        error_count=3,
        last_error="HTTP 503",
        last_error_time=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        total_requests=100,
        successful_requests=97,
        avg_latency_ms=321.5,
        discovered_models=["gpt-4o", "gpt-4o-mini"],
    )
    store.put_state("a", state)
    written = store.get_instance("a")[1]
    # What derives is computed on read (connection_status from health_status; updated_at is the row's).
    assert unstamped(written) == state.model_copy(update={"connection_status": "disconnected"})
    state = written

    # Configuration writes never overwrite state.
    store.replace_config(cfg("a", weight=50))
    config, kept = store.get_instance("a")
    assert config.weight == 50
    assert kept == state
    store.replace_all([cfg("a", weight=60)], RoutingConfig(), merge=True)
    assert store.get_instance("a")[1] == state
    store.replace_all([cfg("a", weight=70)], None, merge=False)
    assert store.get_instance("a")[1] == state

    # State writes never touch configuration.
    config_before = store.get_instance("a")[0]
    store.put_state("a", InstanceState())
    config_after, state_after = store.get_instance("a")
    assert (config_after, unstamped(state_after)) == (config_before, InstanceState())


def test_delete_removes_state(store: Store) -> None:
    store.create_instance(cfg("a"))
    store.put_state("a", InstanceState(status=OperatorStatus.DRAINING, error_count=4))
    assert count_rows(store, "instance_state") == 1
    store.delete_instance("a")
    assert count_rows(store, "instance_state") == 0
    store.create_instance(cfg("a"))
    assert unstamped(store.get_instance("a")[1]) == InstanceState()


def test_foreign_key_cascade(store: Store) -> None:
    store.create_instance(cfg("a"))
    with store._engine.begin() as conn:
        conn.execute(text("DELETE FROM instances WHERE name = 'a'"))
    assert count_rows(store, "instance_state") == 0


# -- routing -------------------------------------------------------------------------------------------------


def test_routing(store: Store) -> None:
    assert store.get_routing() == RoutingConfig()
    routing = RoutingConfig(
        model_aliases={"gpt4": "gpt-4o"},
        default_strategy=Strategy.IP_HASH,
        strategies={"gpt-4o": Strategy.SESSION},
        session_header="X-Conversation",
    )
    store.set_routing(routing)
    assert store.get_routing() == routing
    store.set_routing(RoutingConfig())
    assert store.get_routing() == RoutingConfig()


# -- replace_all ---------------------------------------------------------------------------------------------


def seed(store: Store) -> RoutingConfig:
    routing = RoutingConfig(model_aliases={"fast": "gpt-4o-mini"})
    store.create_instance(cfg("a", weight=1))
    store.create_instance(cfg("b", weight=2))
    store.set_routing(routing)
    store.put_state("b", InstanceState(status=OperatorStatus.DRAINING, total_requests=42))
    return routing


def test_replace_all_merge(store: Store) -> None:
    routing = seed(store)
    generation = store.generation()
    store.replace_all([cfg("b", weight=20), cfg("c", weight=3)], None, merge=True)
    assert store.generation() == generation + 1
    got = {config.name: (config.weight, unstamped(state)) for config, state in store.list_instances()}
    assert set(got) == {"a", "b", "c"}
    assert got["a"][0] == 1
    assert got["b"] == (20, InstanceState(status=OperatorStatus.DRAINING, total_requests=42))
    assert got["c"] == (3, InstanceState())
    assert store.get_routing() == routing  # routing None: unchanged


def test_replace_all_replace(store: Store) -> None:
    seed(store)
    new_routing = RoutingConfig(default_strategy=Strategy.RANDOM_TWO)
    store.replace_all([cfg("b", weight=20), cfg("c")], new_routing, merge=False)
    assert names(store) == ["b", "c"]
    assert store.get_instance("b")[1].status is OperatorStatus.DRAINING
    assert store.get_routing() == new_routing
    assert count_rows(store, "instance_state") == 2

    store.replace_all([], None, merge=False)
    assert names(store) == []
    assert count_rows(store, "instance_state") == 0


def test_replace_all_rejects_duplicates(store: Store) -> None:
    seed(store)
    before = snapshot(store)
    with pytest.raises(InvalidInput):
        store.replace_all([cfg("x"), cfg("x", weight=2)], RoutingConfig(), merge=False)
    assert snapshot(store) == before


def test_replace_all_is_atomic_on_db_error(store: Store) -> None:
    seed(store)
    before = snapshot(store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        broken = InstanceConfig.model_construct(name=None, provider_type=ProviderType.OPENAI)  # type: ignore[arg-type]
    with pytest.raises(Exception, match=r"(?i)null|constraint"):
        store.replace_all(
            [cfg("a", weight=99), cfg("new-one"), broken],
            RoutingConfig(default_strategy=Strategy.ROUND_ROBIN),
            merge=False,
        )
    assert snapshot(store) == before


def test_replace_all_is_atomic_on_midway_failure(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(store)
    before = snapshot(store)
    real_insert = Store._insert_many
    calls: list[list[str]] = []

    def flaky_insert(self: Store, conn: Any, configs: list[InstanceConfig], now: datetime) -> None:
        calls.append([config.name for config in configs])
        real_insert(self, conn, configs, now)  # the updates and these inserts are written, then:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Store, "_insert_many", flaky_insert)
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.replace_all(
            [cfg("a", weight=99), cfg("n1"), cfg("n2")], RoutingConfig(session_header="X-Other"), merge=False
        )
    assert calls == [["n1", "n2"]]
    assert snapshot(store) == before


def test_replace_all_bulk_updates_and_inserts(store: Store) -> None:
    store.replace_all([cfg(f"i{n:03d}") for n in range(150)], None, merge=False)
    generation = store.generation()
    changed = [cfg(f"i{n:03d}", weight=n + 1) for n in range(0, 150, 2)] + [cfg(f"new{n}") for n in range(50)]
    store.replace_all(changed, None, merge=True)
    listed = {config.name: config for config, _ in store.list_instances()}
    assert len(listed) == 200 and store.generation() == generation + 1
    assert all(listed[f"i{n:03d}"].weight == n + 1 for n in range(0, 150, 2))
    assert all(listed[f"i{n:03d}"].weight == 1 for n in range(1, 150, 2))
    assert count_rows(store, "instance_state") == 200


# -- SQLite specifics ----------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_sqlite_files_are_private_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "registry.db"
    old_umask = os.umask(0)  # the most permissive umask: the store must not rely on it
    try:
        s = Store(f"sqlite:///{path}")
        s.migrate()
        s.create_instance(cfg("a", api_key=LITERAL_KEY))
    finally:
        os.umask(old_umask)
    try:
        assert _mode(path) == 0o600
        for suffix in ("-wal", "-shm"):
            sidecar = Path(f"{path}{suffix}")
            assert sidecar.exists()
            assert _mode(sidecar) == 0o600
        with s._engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
            assert conn.execute(text("PRAGMA busy_timeout")).scalar_one() >= 1000
    finally:
        s.close()
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    finally:
        raw.close()


def test_sqlite_existing_file_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.touch()
    path.chmod(0o644)
    s = Store(f"sqlite:///{path}")
    try:
        s.migrate()
        assert _mode(path) == 0o600
    finally:
        s.close()


def test_sqlite_in_memory(tmp_path: Path) -> None:
    s = Store("sqlite://")
    try:
        assert s.migrate() == LATEST
        s.create_instance(cfg("a"))
        result: list[list[str]] = []
        thread = threading.Thread(target=lambda: result.append(names(s)))
        thread.start()
        thread.join(10)
        assert result == [["a"]]
    finally:
        s.close()


def test_schema_tables(store: Store) -> None:
    with store._engine.connect() as conn:
        versions = conn.execute(select(store_module.schema_migrations.c.version)).scalars().all()
        generation_rows = conn.execute(
            select(func.count())
            .select_from(store_module.settings)
            .where(store_module.settings.c.key == "generation")
        ).scalar_one()
    assert versions == list(range(1, LATEST + 1))
    assert generation_rows == 1


# -- usage (issue 12) ----------------------------------------------------------------------------------------


def _batch(batch_id: str, *rows: tuple[int, str, str, str, int, int, int, int]) -> Batch:
    return parse_batch({"id": batch_id, "rows": [list(row) for row in rows]})


def test_usage_batches_are_stored_once_in_minute_and_day_buckets(store: Store) -> None:
    """A batch seen again (its ack lost) adds nothing; minutes of one day sum into its day bucket; the cost
    is the instance's rates at the time of writing, input/output each falling back to cost_per_1k_tokens."""
    store.create_instance(cfg("a", cost_per_1k_tokens=1.0, output_cost_per_1k_tokens=4.0))
    usage = UsageStore(store)
    day = 1_796_083_200  # a UTC midnight
    now = datetime.fromtimestamp(day + 3600, UTC)
    first = _batch("b1", (day, "k1", "a", "m", 2, 100, 50, 0), (day + 60, "k1", "a", "m", 1, 10, 5, 1))
    stored = usage.record(first, now)
    assert stored is not None and len(stored) == 2
    assert usage.record(first, now) is None  # the same id again
    assert usage.record(_batch("b2", (day + 60, "", "gone", "m", 3, 0, 0, 0)), now) is not None

    by_day = usage.query(UsageQuery(start=day, end=day + DAY_S, group_by=("key", "instance")))
    fields = ("key", "instance", "requests", "prompt_tokens", "completion_tokens")
    summed = [tuple(r[f] for f in fields) for r in by_day]
    assert summed == [(None, "gone", 3, 0, 0), ("k1", "a", 3, 110, 55)]
    assert by_day[1]["cost_usd"] == pytest.approx((110 * 1.0 + 55 * 4.0) / 1000)
    assert by_day[1]["estimated_requests"] == 1 and by_day[0]["cost_usd"] == 0
    minute = usage.query(UsageQuery(start=day + 60, end=day + 120, group_by=("model",), key="k1"))
    assert [(r["model"], r["requests"], r["total_tokens"]) for r in minute] == [("m", 1, 15)]

    usage.prune(datetime.fromtimestamp(day + 49 * 3600, UTC), 48, 400)
    assert usage.query(UsageQuery(start=day, end=day + 120, group_by=("key",))) == []
    assert len(usage.query(UsageQuery(start=day, end=day + DAY_S, group_by=("key",)))) == 2


# -- the parse cache of list_instances --------------------------------------------------------------------


def test_listing_reuses_unchanged_rows_and_sees_every_change(store: Store) -> None:
    store.replace_all([cfg("a"), cfg("b"), cfg("c")], None, merge=False)
    first = dict((c.name, (c, s)) for c, s in store.list_instances())
    store.replace_config(cfg("b", weight=7))
    store.patch_states({"c": {"health_status": HealthStatus.UNHEALTHY}})
    second = dict((c.name, (c, s)) for c, s in store.list_instances())
    # Unchanged rows come back as the very same parsed models; changed ones are parsed anew.
    assert second["a"][0] is first["a"][0] and second["a"][1] is first["a"][1]
    assert second["b"][0] is not first["b"][0] and second["b"][0].weight == 7
    assert second["c"][1].health_status is HealthStatus.UNHEALTHY
    assert first["c"][1].health_status is HealthStatus.UNKNOWN  # what a caller held is unchanged
    store.delete_instance("a")
    assert names(store) == ["b", "c"]
    # Only the last listing's rows are kept: the cache never outgrows the registry.
    assert len(store._parsed) <= 2 * len(names(store))


def test_list_states_reads_the_states_alone_through_the_same_cache(store: Store) -> None:
    """What a pass reads when only states may have changed (world.refresh_world): every state by name,
    an unchanged one as the object parsed before (by either listing), a changed one parsed anew."""
    store.replace_all([cfg("a"), cfg("b")], None, merge=False)
    listed = {c.name: s for c, s in store.list_instances()}
    states = store.list_states()
    assert states == listed and states["a"] is listed["a"] and states["b"] is listed["b"]
    store.patch_states({"b": {"health_status": HealthStatus.UNHEALTHY}})
    again = store.list_states()
    assert again["a"] is listed["a"] and again["b"].health_status is HealthStatus.UNHEALTHY
    # The next full listing reuses what list_states parsed (no second parse of a changed state).
    assert {c.name: s for c, s in store.list_instances()}["b"] is again["b"]
    assert len(store._states) <= 2
    # Only those written since a time: what a pass reads between its full reads (world.refresh_world).
    since = datetime.now(UTC)
    assert store.list_states(since) == {}
    store.patch_states({"a": {"health_status": HealthStatus.HEALTHY}})
    delta = store.list_states(since)
    assert list(delta) == ["a"] and delta["a"].health_status is HealthStatus.HEALTHY
    assert store.list_states()["b"] is again["b"] and len(store._states) == 2


def test_listed_models_share_one_set_of_field_names(store: Store) -> None:
    """(share_fields_set) A model parsed from a stored row has every field set; all such models of a
    class share one set, which model_copy does not change."""
    store.replace_all([cfg("a"), cfg("b")], None, merge=False)
    (a, sa), (b, sb) = store.list_instances()
    assert a.model_fields_set is b.model_fields_set and sa.model_fields_set is sb.model_fields_set
    assert a.health.model_fields_set is b.health.model_fields_set
    assert a.model_fields_set == set(InstanceConfig.model_fields)
    copied = sa.model_copy(update={"error_count": 3})
    assert copied.error_count == 3 and copied.model_fields_set is not sa.model_fields_set
    assert sa.model_fields_set == set(InstanceState.model_fields) and sa.error_count == 0
    assert store.list_states()["a"].model_fields_set is sa.model_fields_set


def test_refresh_world_reads_states_while_the_generation_stays(store: Store) -> None:
    store.replace_all([cfg("a", api_base="http://127.0.0.1:1"), cfg("b")], None, merge=False)
    world = asyncio.run(gather_world(store))
    store.patch_states({"a": {"health_status": HealthStatus.UNHEALTHY}})
    fresh = asyncio.run(refresh_world(store, world))
    assert fresh is not None and fresh.generation == world.generation and fresh.now >= world.now
    assert [c for c, _ in fresh.instances] == [c for c, _ in world.instances]
    assert all(a is b for (a, _), (b, _) in zip(fresh.instances, world.instances, strict=True))
    assert fresh.instances[0][1].health_status is HealthStatus.UNHEALTHY
    assert fresh.instances[1][1] is world.instances[1][1]
    assert fresh.addresses is world.addresses and fresh.secrets is world.secrets
    # Secrets, DNS and files read again (once a resync interval): equal values keep their objects.
    env = asyncio.run(read_environment([c for c, _ in fresh.instances]))
    again = asyncio.run(refresh_world(store, fresh, env))
    assert again is not None and again.addresses is fresh.addresses and again.secrets is fresh.secrets
    moved = asyncio.run(refresh_world(store, fresh, replace(env, addresses={})))
    assert moved is not None and moved.addresses == {}
    # Between full reads only the states written since the last read (less a margin) are read.
    later = replace(fresh, states_read_at=datetime.now(UTC) + STATES_MARGIN)
    assert asyncio.run(refresh_world(store, later)).instances == later.instances  # type: ignore[union-attr]
    store.patch_states({"b": {"health_status": HealthStatus.UNHEALTHY}})
    seen = asyncio.run(refresh_world(store, later))
    assert seen is not None and seen.instances[1][1].health_status is HealthStatus.UNHEALTHY
    assert seen.instances[0][1] is later.instances[0][1] and seen.states_read_at is not None
    store.replace_config(cfg("b", weight=3))  # a configuration write: the next pass reads everything
    assert asyncio.run(refresh_world(store, fresh)) is None


def test_patch_probe_fields_merges_the_last_probe_fields_and_keeps_the_rest(store: Store) -> None:
    """The prober's batch of instances whose probes changed nothing else: its fields land, every other
    observed field (a verdict written by patch_states) stays, unknown names are skipped."""
    store.replace_all([cfg("a"), cfg("b")], None, merge=False)
    store.patch_states({"a": {"health_status": HealthStatus.UNHEALTHY, "error_count": 3}})
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    fields = InstanceState(last_probe_at=at, probe_latency_ms=12.5).model_dump(
        mode="json", include={"last_probe_at", "probe_latency_ms"}
    )
    store.patch_probe_fields({"a": fields, "gone": fields})
    states = {c.name: s for c, s in store.list_instances()}
    assert states["a"].last_probe_at == at and states["a"].probe_latency_ms == 12.5
    assert states["a"].health_status is HealthStatus.UNHEALTHY and states["a"].error_count == 3
    assert states["a"].updated_at is not None
    assert states["b"].last_probe_at is None


def test_list_states_reads_what_list_instances_reads_without_the_configurations(store: Store) -> None:
    store.create_instance(cfg("a", max_rpm=10))
    store.create_instance(cfg("b"))
    store.patch_states({"a": {"current_rpm": 5, "health_status": HealthStatus.HEALTHY}})
    listed = {config.name: state for config, state in store.list_instances()}
    states = store.list_states()
    assert states == listed and states["a"].utilization_percentage == 50.0
    assert states["b"] is listed["b"]  # an unchanged row: the object parsed by the listing
    store.patch_states({"b": {"status": OperatorStatus.DRAINING}})
    again = store.list_states()
    assert again["a"] is states["a"] and again["b"].status is OperatorStatus.DRAINING
