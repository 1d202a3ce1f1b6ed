"""Persistence of the registry: SQLite (WAL) by default, PostgreSQL from a URL. Synchronous SQLAlchemy Core;
callers in the event loop use ``asyncio.to_thread``.

INTERFACE CONTRACT (implemented by the store helper; signatures are fixed):

- Tables: ``schema_migrations`` (applied versions), ``instances`` (configuration JSON), ``instance_state``
  (the operator's ``status`` and the observed state as JSON, cascades with its instance) and ``settings``
  (``routing`` and ``generation``). What derives from other fields is computed on read, never stored.
- Every configuration write (create/replace/delete/set_routing/replace_all) bumps the generation in the same
  transaction; ``put_state`` never does.
- A literal ``api_key`` is stored sealed (AES-GCM, registry/sealing.py) once a key is attached
  (``attach_sealer``, which also seals rows still in clear and records the key's id under
  ``registry_key_id``); references stay readable. Reads return it in clear; masking is the API's job.
- SQLite write transactions start with ``BEGIN IMMEDIATE`` so concurrent writers queue on ``busy_timeout``
  instead of failing on a lock upgrade; on PostgreSQL config writers serialise on the generation row.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Select,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool

from control_plane.errors import Conflict, InvalidInput, NotFound
from control_plane.registry.models import (
    OBSERVED_FIELDS,
    InstanceConfig,
    InstanceState,
    ObservedState,
    OperatorStatus,
    RoutingConfig,
    read_state,
)
from control_plane.registry.sealing import RegistryKeyError, Sealer, is_sealed, needs_sealing

SQLITE_BUSY_TIMEOUT_MS = 10_000
# Key for pg_advisory_xact_lock around migrations (any constant bigint; "ISHGWMIG" in ASCII).
MIGRATION_LOCK_KEY = 0x4953_4847_574D_4947

GENERATION_KEY = "generation"
ROUTING_KEY = "routing"
REGISTRY_KEY_ID = "registry_key_id"

metadata = MetaData()

schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)

instances = Table(
    "instances",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("config", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

instance_state = Table(
    "instance_state",
    metadata,
    Column("name", String(255), ForeignKey("instances.name", ondelete="CASCADE"), primary_key=True),
    Column("state", Text, nullable=False),  # ObservedState as JSON
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("status", String(16), nullable=False, server_default=OperatorStatus.ACTIVE.value),  # migration 5
)

settings = Table(
    "settings",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("value", Text, nullable=False),
)

# Client API keys (migration 2): only the sha256 of a key is stored; the rest is in ``data`` (JSON).
client_keys = Table(
    "client_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False, unique=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("data", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Admin audit trail (migration 2): who changed what, when; never a secret.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
    Column("actor", String(64), nullable=False),
    Column("client_ip", String(64), nullable=False),
    Column("method", String(16), nullable=False),
    Column("path", String(512), nullable=False),
    Column("target", String(255), nullable=True),
    Column("status", Integer, nullable=False),
)


def _usage_table(name: str) -> Table:
    """Usage per (bucket start, key id, instance, model) (migration 3): minute and day buckets. ``start`` is
    the bucket's first second (Unix time, UTC); key_id "" is an anonymous client."""
    return Table(
        name,
        metadata,
        Column("start", BigInteger, nullable=False),
        Column("key_id", String(64), nullable=False),
        Column("instance", String(255), nullable=False),
        Column("model", String(255), nullable=False),
        Column("requests", BigInteger, nullable=False),
        Column("prompt_tokens", BigInteger, nullable=False),
        Column("completion_tokens", BigInteger, nullable=False),
        Column("estimated_requests", BigInteger, nullable=False),
        Column("cost_usd", Float, nullable=False),
        PrimaryKeyConstraint("start", "key_id", "instance", "model", name=f"pk_{name}"),
    )


usage_minute = _usage_table("usage_minute")
usage_day = _usage_table("usage_day")

# Drained usage batches (migration 3): each id once, written in the transaction of its rows, so a batch
# nginx hands out again (its ack lost) is never counted twice.
usage_batches = Table(
    "usage_batches",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
)

# Scaling events (migration 4): every decision the autoscaler acted on, with what it measured.
scaling_events = Table(
    "scaling_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
    Column("group_name", String(255), nullable=False, index=True),
    Column("data", Text, nullable=False),
)


def _now() -> datetime:
    return datetime.now(UTC)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _migration_1(conn: Connection) -> None:
    """Initial schema: instances, their state, settings with generation 0."""
    metadata.create_all(conn, tables=[instances, instance_state, settings], checkfirst=True)
    exists = conn.execute(select(settings.c.key).where(settings.c.key == GENERATION_KEY)).first()
    if exists is None:
        conn.execute(insert(settings).values(key=GENERATION_KEY, value=_dumps(0)))


def _migration_2(conn: Connection) -> None:
    """Client API keys and the admin audit log."""
    metadata.create_all(conn, tables=[client_keys, audit_log], checkfirst=True)


def _migration_3(conn: Connection) -> None:
    """Usage accounting: minute and day buckets, drained batch ids."""
    metadata.create_all(conn, tables=[usage_minute, usage_day, usage_batches], checkfirst=True)


def _migration_4(conn: Connection) -> None:
    """Autoscaling: the scaling events (groups live in ``settings``)."""
    metadata.create_all(conn, tables=[scaling_events], checkfirst=True)


def _migration_5(conn: Connection) -> None:
    """The operator's status leaves the observed-state JSON for a column of its own; the fields that derive
    from others (connection_status, utilization_percentage, updated_at) are no longer stored."""
    if "status" not in {column["name"] for column in inspect(conn).get_columns("instance_state")}:
        conn.exec_driver_sql(
            "ALTER TABLE instance_state ADD COLUMN status VARCHAR(16) NOT NULL DEFAULT 'active'"
        )
    known = {status.value for status in OperatorStatus}
    for name, text in conn.execute(select(instance_state.c.name, instance_state.c.state)).all():
        data = json.loads(text) if text else {}
        status = data.get("status") if data.get("status") in known else OperatorStatus.ACTIVE.value
        observed = {field: value for field, value in data.items() if field in OBSERVED_FIELDS}
        conn.execute(
            update(instance_state)
            .where(instance_state.c.name == name)
            .values(status=status, state=_dumps(observed))
        )


# Ordered, append-only. Each runs in its own transaction and is recorded in schema_migrations.
MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [
    (1, _migration_1),
    (2, _migration_2),
    (3, _migration_3),
    (4, _migration_4),
    (5, _migration_5),
]


def normalise_url(url: str) -> URL:
    """``postgresql://`` / ``postgres://`` mean psycopg 3; everything else is taken as given."""
    parsed = make_url(
        url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url
    )
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


IN_LIST_MAX = 256  # names per "IN (...)" read


def in_list_chunks(names: list[str], most: int = IN_LIST_MAX) -> list[list[str]]:
    """``names`` in lists of a power-of-two length (the last name repeated to fill: the same rows), at
    most ``most`` long. An IN list renders one placeholder per name, and SQLite keeps each statement text
    it prepared (128 per connection): batches of every size between 1 and 250 had each connection hold
    about 3 MB of prepared statements; these lengths make at most 9 texts."""
    chunks = []
    for start in range(0, len(names), most):
        chunk = names[start : start + most]
        size = 1 << (len(chunk) - 1).bit_length()
        chunks.append(chunk + [chunk[-1]] * (size - len(chunk)))
    return chunks


def select_in(
    conn: Connection, query: Select[Any], column: ColumnElement[Any], names: list[str]
) -> list[Any]:
    """The rows of ``query`` whose ``column`` is one of ``names``, read in in_list_chunks."""
    rows: list[Any] = []
    for chunk in in_list_chunks(names):
        rows.extend(conn.execute(query.where(column.in_(chunk))).all())
    return rows


def power_of_two_slices(count: int, most: int = IN_LIST_MAX) -> list[slice]:
    """Slices of ``count`` rows whose lengths are powers of two (runs of ``most``, a power of two, then
    the rest by its binary digits, longest first): a multi-row INSERT of n rows is one statement text per
    n, and these lengths make at most log2(most) + 1 texts (see in_list_chunks)."""
    slices, start = [], 0
    size = most
    while start < count:
        while size > count - start:
            size //= 2
        slices.append(slice(start, start + size))
        start += size
    return slices


def text_digest(text: str) -> bytes:
    """What the parse caches key a row's text by (128 bits of BLAKE2b: no two texts meet)."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def state_digest(text: str | None, status: str | None, updated_at: datetime | None, max_rpm: int) -> bytes:
    """A state row's cache key: what it is read from (its observed JSON, the operator's status, the row's
    time) and the max_rpm its utilization derives from."""
    return text_digest(f"{text or ''}\0{status}\0{updated_at}\0{max_rpm}")


M = TypeVar("M", bound=BaseModel)
_ALL_FIELDS: dict[type[BaseModel], set[str]] = {}


def share_fields_set(model: M) -> M:
    """``model`` (and the models it holds), each with the one set of every field name its class shares
    when every field was set, as in a model parsed from a stored row: pydantic keeps a set of the fields
    set per model, 2.2 KB for InstanceState's 24 names (more than the values), which at 10,000 instances
    held about 50 MB for configurations and states. Adding a name to a full set changes nothing, and
    model_copy copies the set, so the shared set never changes; the listings' models are not mutated."""
    cls = type(model)
    shared = _ALL_FIELDS.get(cls)
    if shared is None:
        shared = _ALL_FIELDS.setdefault(cls, set(cls.model_fields))
    if model.__pydantic_fields_set__ == shared:
        object.__setattr__(model, "__pydantic_fields_set__", shared)
    for value in model.__dict__.values():
        if isinstance(value, BaseModel):
            share_fields_set(value)
    return model


class Store:
    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        self.dialect = self.url.get_backend_name()
        self._sqlite_path: str | None = None
        self.sealer: Sealer | None = None
        if self.dialect == "sqlite":
            self._engine = self._sqlite_engine()
        elif self.dialect == "postgresql":
            self._engine = create_engine(self.url, pool_pre_ping=True)
        else:
            raise ValueError(f"unsupported database URL scheme {self.url.drivername!r}")
        # A row (by a digest of its text and, for a state, its status, time and max_rpm: the texts themselves
        # held about 20 MB at 10,000 instances) -> its parsed model, from the last full listing: a reconcile
        # re-reads every row, and at 10,000 instances validating them all again cost seconds though almost
        # none had changed. Only rows seen in the last listing are kept, so this never outgrows the
        # registry. The models are shared between callers: never mutate one (model_copy makes a changed one).
        self._parsed: dict[bytes, InstanceConfig | InstanceState] = {}
        # The same for states alone (list_states): instance name -> (row digest, state) as last read; and
        # each instance's max_rpm from the last full listing (a state's utilization derives from it).
        self._states: dict[str, tuple[bytes, InstanceState]] = {}
        self._max_rpm: dict[str, int] = {}
        # Connect once so a bad URL fails here, and (SQLite) WAL mode and its files exist.
        with self._engine.connect():
            pass
        self._secure_files()

    # -- connection plumbing -------------------------------------------------------------------------------

    def _sqlite_engine(self) -> Engine:
        database = self.url.database or ""
        if database in ("", ":memory:"):
            engine = create_engine(self.url, poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            path = os.path.abspath(database)
            parent = os.path.dirname(path)
            if not os.path.isdir(parent):
                os.makedirs(parent, mode=0o700, exist_ok=True)
            # The database holds provider keys: create it 0600 before SQLite does (umask-proof via chmod).
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            os.chmod(path, 0o600)
            self._sqlite_path = path
            engine = create_engine(self.url.set(database=path), connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy (not the sqlite3 module) decide where transactions begin.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
                cursor.execute("PRAGMA foreign_keys = ON")
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
            finally:
                cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            immediate = conn.get_execution_options().get("ishgw_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    def _secure_files(self) -> None:
        if self._sqlite_path is None:
            return
        for suffix in ("", "-wal", "-shm", "-journal"):
            candidate = self._sqlite_path + suffix
            try:
                if stat.S_IMODE(os.stat(candidate).st_mode) != 0o600:
                    os.chmod(candidate, 0o600)
            except FileNotFoundError:
                continue

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            conn.execution_options(ishgw_write=True)
            with conn.begin():
                yield conn

    # -- schema --------------------------------------------------------------------------------------------

    def _lock_migrations(self, conn: Connection) -> None:
        if self.dialect == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))

    def migrate(self) -> int:
        """Apply pending versioned migrations; return the schema version now in force."""
        with self._write() as conn:
            self._lock_migrations(conn)
            schema_migrations.create(conn, checkfirst=True)
        for version, apply in MIGRATIONS:
            with self._write() as conn:
                self._lock_migrations(conn)
                applied = conn.execute(
                    select(schema_migrations.c.version).where(schema_migrations.c.version == version)
                ).first()
                if applied is not None:
                    continue
                apply(conn)
                conn.execute(insert(schema_migrations).values(version=version, applied_at=_now()))
        self._secure_files()
        with self._read() as conn:
            current = conn.execute(select(func.max(schema_migrations.c.version))).scalar_one_or_none()
        return int(current or 0)

    def schema_version(self) -> int:
        """The latest migration applied (0 for an empty database); reads only."""
        with self._read() as conn:
            if not self._engine.dialect.has_table(conn, schema_migrations.name):
                return 0
            current = conn.execute(select(func.max(schema_migrations.c.version))).scalar_one_or_none()
        return int(current or 0)

    def instance_count(self) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.count()).select_from(instances)).scalar_one())

    def close(self) -> None:
        self._engine.dispose()
        self._secure_files()

    # -- provider keys at rest -------------------------------------------------------------------------------

    def registry_key_id(self) -> str | None:
        """The id of the key the provider keys are sealed with; None before any key was attached."""
        with self._read() as conn:
            raw = conn.execute(select(settings.c.value).where(settings.c.key == REGISTRY_KEY_ID)).scalar()
        return str(json.loads(raw)) if raw is not None else None

    def attach_sealer(self, sealer: Sealer) -> int:
        """Seal with ``sealer`` from now on: record its id (refusing another key than the recorded one) and
        seal the literal keys still in clear, in one transaction (the migration of rows written before
        encryption at rest, and of imports by an older controller). Returns how many rows were sealed.
        The configuration does not change, so the generation does not either."""
        with self._write() as conn:
            raw = conn.execute(
                select(settings.c.value).where(settings.c.key == REGISTRY_KEY_ID).with_for_update()
            ).scalar()
            if raw is None:
                conn.execute(insert(settings).values(key=REGISTRY_KEY_ID, value=_dumps(sealer.key_id)))
            elif json.loads(raw) != sealer.key_id:
                raise RegistryKeyError(
                    f"the registry's provider keys are encrypted with registry key {json.loads(raw)},"
                    f" not {sealer.key_id}"
                )
            sealed = 0
            for name, text in conn.execute(select(instances.c.name, instances.c.config)).all():
                data = json.loads(text)
                if needs_sealing(data.get("api_key")):
                    data["api_key"] = sealer.seal(name, data["api_key"])
                    conn.execute(
                        update(instances).where(instances.c.name == name).values(config=_dumps(data))
                    )
                    sealed += 1
        self.sealer = sealer
        return sealed

    # -- generation ----------------------------------------------------------------------------------------

    def generation(self) -> int:
        """Configuration generation: bumped by every configuration change (not by state changes)."""
        with self._read() as conn:
            raw = conn.execute(select(settings.c.value).where(settings.c.key == GENERATION_KEY)).scalar()
        return int(json.loads(raw)) if raw is not None else 0

    def _bump_generation(self, conn: Connection) -> int:
        """Lock the generation row (PostgreSQL: FOR UPDATE; SQLite: BEGIN IMMEDIATE already holds the lock)
        and increment it. Called first in every configuration write so writers serialise."""
        raw = conn.execute(
            select(settings.c.value).where(settings.c.key == GENERATION_KEY).with_for_update()
        ).scalar()
        value = (int(json.loads(raw)) if raw is not None else 0) + 1
        if raw is None:
            conn.execute(insert(settings).values(key=GENERATION_KEY, value=_dumps(value)))
        else:
            conn.execute(update(settings).where(settings.c.key == GENERATION_KEY).values(value=_dumps(value)))
        return value

    # -- instances -----------------------------------------------------------------------------------------

    def _config_json(self, config: InstanceConfig) -> str:
        data = config.model_dump(mode="json")
        if self.sealer is not None and needs_sealing(config.api_key):
            data["api_key"] = self.sealer.seal(config.name, str(config.api_key))
        return _dumps(data)

    def _config_of(self, text: str) -> InstanceConfig:
        data = json.loads(text)
        sealed = data.get("api_key")
        if isinstance(sealed, str) and is_sealed(sealed):
            if self.sealer is None:
                raise RegistryKeyError(
                    "the registry holds encrypted provider keys and no registry key is attached"
                )
            data["api_key"] = self.sealer.unseal(str(data.get("name")), sealed)
        return InstanceConfig.model_validate(data)

    @staticmethod
    def _state_json(state: ObservedState) -> str:
        return _dumps(state.model_dump(mode="json", include=set(OBSERVED_FIELDS)))

    @staticmethod
    def _state_of(
        text: str | None, status: str | None, updated_at: datetime | None, max_rpm: int
    ) -> InstanceState:
        """A state row: the stored parts, and what derives from them and the configuration's max_rpm."""
        observed = ObservedState.model_validate_json(text) if text else ObservedState()
        if updated_at is not None and updated_at.tzinfo is None:  # SQLite keeps no offset; all times are UTC
            updated_at = updated_at.replace(tzinfo=UTC)
        operator = OperatorStatus(status or OperatorStatus.ACTIVE)
        return share_fields_set(read_state(observed, operator, updated_at, max_rpm))

    def _joined(self) -> Any:
        return select(
            instances.c.config, instance_state.c.state, instance_state.c.status, instance_state.c.updated_at
        ).select_from(instances.outerjoin(instance_state, instance_state.c.name == instances.c.name))

    def list_instances(self) -> list[tuple[InstanceConfig, InstanceState]]:
        with self._read() as conn:
            rows = conn.execute(self._joined().add_columns(instances.c.name).order_by(instances.c.name)).all()
        previous: dict[bytes, InstanceConfig | InstanceState] = self._parsed
        seen: dict[bytes, InstanceConfig | InstanceState] = {}
        pairs = [self._cached_pair(row, previous, seen) for row in rows]
        self._parsed = seen  # one assignment: a concurrent listing sees the old or the new cache
        self._max_rpm = {config.name: config.max_rpm for config, _ in pairs}
        return pairs

    def list_states(self, since: datetime | None = None) -> dict[str, InstanceState]:
        """The stored states by instance name, without the configurations: every one, or with ``since``
        those written at or after it (what a pass reads when only states may have changed:
        world.refresh_world; the configuration generation is the one of the last list_instances, whose
        max_rpm the derived utilization uses). A state whose row is unchanged since it was last read (by
        this or list_instances) is the object parsed then."""
        query = select(
            instance_state.c.name,
            instance_state.c.state,
            instance_state.c.status,
            instance_state.c.updated_at,
        )
        if since is not None:
            query = query.where(instance_state.c.updated_at >= since)
        with self._read() as conn:
            rows = conn.execute(query).all()
        known, parsed, max_rpm = self._states, self._parsed, self._max_rpm
        fresh: dict[str, tuple[bytes, InstanceState]] = {} if since is None else dict(known)
        states: dict[str, InstanceState] = {}
        for name, text, status, updated_at in rows:
            rpm = max_rpm.get(name, 0)
            key = state_digest(text, status, updated_at, rpm)
            entry = known.get(name)
            if entry is not None and entry[0] == key:
                state = entry[1]
            else:
                cached = parsed.get(key)
                if not isinstance(cached, InstanceState):
                    cached = self._state_of(text, status, updated_at, rpm)
                state = cached
            fresh[name] = (key, state)
            states[name] = state
        self._states = fresh  # one assignment, as in list_instances
        return states

    def _cached_pair(
        self,
        row: Any,
        previous: dict[bytes, InstanceConfig | InstanceState],
        seen: dict[bytes, InstanceConfig | InstanceState],
    ) -> tuple[InstanceConfig, InstanceState]:
        config_text, state_text, status, updated_at, name = row
        config_key = text_digest(config_text)
        config = seen.get(config_key) or previous.get(config_key)
        if not isinstance(config, InstanceConfig):
            config = share_fields_set(self._config_of(config_text))  # unseals the provider key
        seen[config_key] = config
        state_key = state_digest(state_text, status, updated_at, config.max_rpm)
        state = seen.get(state_key) or previous.get(state_key)
        if state is None and (read := self._states.get(name)) is not None and read[0] == state_key:
            state = read[1]  # parsed by list_states since
        if not isinstance(state, InstanceState):
            state = self._state_of(state_text, status, updated_at, config.max_rpm)
        seen[state_key] = state
        return config, state

    def get_instance(self, name: str) -> tuple[InstanceConfig, InstanceState]:
        """Raises NotFound."""
        with self._read() as conn:
            row = conn.execute(self._joined().where(instances.c.name == name)).first()
        if row is None:
            raise NotFound(f"instance {name!r} not found")
        config = self._config_of(row[0])
        return config, self._state_of(row[1], row[2], row[3], config.max_rpm)

    @staticmethod
    def _exists(conn: Connection, name: str) -> bool:
        return conn.execute(select(instances.c.name).where(instances.c.name == name)).first() is not None

    def _insert(self, conn: Connection, config: InstanceConfig, now: datetime) -> None:
        conn.execute(
            insert(instances).values(
                name=config.name, config=self._config_json(config), created_at=now, updated_at=now
            )
        )
        conn.execute(
            insert(instance_state).values(
                name=config.name, state=self._state_json(ObservedState()), updated_at=now
            )
        )

    def _update(self, conn: Connection, config: InstanceConfig, now: datetime) -> None:
        conn.execute(
            update(instances)
            .where(instances.c.name == config.name)
            .values(config=self._config_json(config), updated_at=now)
        )

    def _insert_many(self, conn: Connection, configs: list[InstanceConfig], now: datetime) -> None:
        """One executemany per table: an import of 10,000 instances is two statements, not 20,000."""
        if not configs:
            return
        conn.execute(
            insert(instances),
            [
                {"name": c.name, "config": self._config_json(c), "created_at": now, "updated_at": now}
                for c in configs
            ],
        )
        state = self._state_json(ObservedState())
        conn.execute(
            insert(instance_state), [{"name": c.name, "state": state, "updated_at": now} for c in configs]
        )

    def _update_many(self, conn: Connection, configs: list[InstanceConfig], now: datetime) -> None:
        if not configs:
            return
        conn.execute(
            update(instances)
            .where(instances.c.name == bindparam("row_name"))
            .values(config=bindparam("row_config"), updated_at=now),
            [{"row_name": c.name, "row_config": self._config_json(c)} for c in configs],
        )

    def create_instance(self, config: InstanceConfig) -> None:
        """Raises Conflict when the name exists. Creates a default state row."""
        try:
            with self._write() as conn:
                self._bump_generation(conn)
                if self._exists(conn, config.name):
                    raise Conflict(f"instance {config.name!r} already exists")
                self._insert(conn, config, _now())
        except IntegrityError as exc:  # a concurrent creator won the race
            raise Conflict(f"instance {config.name!r} already exists") from exc

    def replace_config(self, config: InstanceConfig) -> None:
        """Raises NotFound. State is untouched."""
        with self._write() as conn:
            self._bump_generation(conn)
            if not self._exists(conn, config.name):
                raise NotFound(f"instance {config.name!r} not found")
            self._update(conn, config, _now())

    def delete_instance(self, name: str) -> None:
        """Raises NotFound. Removes configuration and state."""
        with self._write() as conn:
            self._bump_generation(conn)
            if not self._exists(conn, name):
                raise NotFound(f"instance {name!r} not found")
            conn.execute(delete(instance_state).where(instance_state.c.name == name))
            conn.execute(delete(instances).where(instances.c.name == name))

    def put_state(self, name: str, state: InstanceState) -> None:
        """Raises NotFound. Never touches configuration; does not bump the generation."""
        with self._write() as conn:
            if not self._exists(conn, name):
                raise NotFound(f"instance {name!r} not found")
            values = {"state": self._state_json(state), "status": state.status.value, "updated_at": _now()}
            where = instance_state.c.name == name
            result = conn.execute(update(instance_state).where(where).values(**values))
            if result.rowcount == 0:
                conn.execute(insert(instance_state).values(name=name, **values))

    @staticmethod
    def _state_texts(conn: Connection, names: list[str]) -> list[Any]:
        """(name, observed-state JSON) of the named instances that exist, read inside the caller's write."""
        query = select(instance_state.c.name, instance_state.c.state)
        return select_in(conn, query, instance_state.c.name, names)

    def patch_states(self, patches: dict[str, dict[str, Any]]) -> None:
        """Merge fields into several states in one transaction (read-modify-write under the write lock, so
        the tracker's observed fields and an operator's ``status`` never overwrite each other). Fields
        derived on read are ignored. Unknown names are skipped."""
        if not patches:
            return
        with self._write() as conn:
            now = _now()
            rows = self._state_texts(conn, list(patches))
            for name, text in rows:
                patch = patches[name]
                values: dict[str, Any] = {"updated_at": now}
                if "status" in patch:
                    values["status"] = OperatorStatus(patch["status"]).value
                observed = {field: value for field, value in patch.items() if field in OBSERVED_FIELDS}
                if observed:
                    current = ObservedState.model_validate_json(text) if text else ObservedState()
                    merged = ObservedState.model_validate({**current.model_dump(), **observed})
                    values["state"] = self._state_json(merged)
                conn.execute(update(instance_state).where(instance_state.c.name == name).values(**values))

    def patch_probe_fields(self, patches: dict[str, dict[str, Any]]) -> None:
        """Merge JSON-ready scalar fields (the last-probe fields: times already ISO strings) into several
        states in one transaction and one executemany: no model round trip per row, for the prober's
        batches of instances whose probes changed nothing else. Unknown names are skipped."""
        if not patches:
            return
        with self._write() as conn:
            now = _now()
            rows = self._state_texts(conn, list(patches))
            params = []
            for name, text in rows:
                state = json.loads(text) if text else {}
                state.update(patches[name])
                params.append({"b_name": name, "b_state": _dumps(state), "b_at": now})
            if params:
                conn.execute(
                    update(instance_state)
                    .where(instance_state.c.name == bindparam("b_name"))
                    .values(state=bindparam("b_state"), updated_at=bindparam("b_at")),
                    params,
                )

    # -- routing -------------------------------------------------------------------------------------------

    def get_routing(self) -> RoutingConfig:
        with self._read() as conn:
            raw = conn.execute(select(settings.c.value).where(settings.c.key == ROUTING_KEY)).scalar()
        return RoutingConfig.model_validate(json.loads(raw)) if raw is not None else RoutingConfig()

    def _write_routing(self, conn: Connection, routing: RoutingConfig) -> None:
        value = _dumps(routing.model_dump(mode="json"))
        result = conn.execute(update(settings).where(settings.c.key == ROUTING_KEY).values(value=value))
        if result.rowcount == 0:
            conn.execute(insert(settings).values(key=ROUTING_KEY, value=value))

    def set_routing(self, routing: RoutingConfig) -> None:
        with self._write() as conn:
            self._bump_generation(conn)
            self._write_routing(conn, routing)

    # -- import --------------------------------------------------------------------------------------------

    def replace_all(
        self,
        configs: list[InstanceConfig],
        routing: RoutingConfig | None,
        *,
        merge: bool,
        also: Callable[[Connection], None] | None = None,
    ) -> None:
        """Import in one transaction. merge=False deletes instances not in ``configs``. ``also`` writes
        more of the document (scaling groups) in the same transaction."""
        names = [config.name for config in configs]
        duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
        if duplicates:
            raise InvalidInput([{"field": "instances", "message": f"duplicate instance names: {duplicates}"}])
        with self._write() as conn:
            self._bump_generation(conn)
            now = _now()
            existing = set(conn.execute(select(instances.c.name)).scalars())
            if routing is not None:
                self._write_routing(conn, routing)
            self._update_many(conn, [c for c in configs if c.name in existing], now)
            self._insert_many(conn, [c for c in configs if c.name not in existing], now)
            if not merge:
                stale = sorted(existing - set(names))
                if stale:
                    conn.execute(delete(instance_state).where(instance_state.c.name.in_(stale)))
                    conn.execute(delete(instances).where(instances.c.name.in_(stale)))
            if also is not None:
                also(conn)
