"""Usage in the registry: drained batches into minute and day buckets, once each; the sums read back.

Tables in control_plane/registry/store.py (migration 3). A batch's id, its minute rows and its day rows are
written in one transaction: a batch seen again (nginx hands it out until its ack) changes nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, delete, func, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from control_plane.registry.store import (
    Store,
    client_keys,
    instances,
    power_of_two_slices,
    select_in,
    usage_batches,
    usage_day,
    usage_minute,
)
from control_plane.usage.model import (
    DAY_S,
    MINUTE_S,
    Batch,
    Bucket,
    Rates,
    UsageQuery,
    answer_row,
    buckets,
    rates_of,
)

SUMMED = ("requests", "prompt_tokens", "completion_tokens", "estimated_requests", "cost_usd")
KEY_COLUMNS = ("start", "key_id", "instance", "model")
ROWS_PER_STATEMENT = 256  # a power of two: power_of_two_slices


class UsageStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    def _rates(self, conn: Connection, names: set[str]) -> dict[str, Rates]:
        query = select(instances.c.name, instances.c.config)
        rows = select_in(conn, query, instances.c.name, sorted(names))
        return {name: rates_of(self.store._config_of(config)) for name, config in rows}

    def _add(self, conn: Connection, table: Table, rows: list[Bucket]) -> None:
        make = pg_insert if self.store.dialect == "postgresql" else sqlite_insert
        for part in power_of_two_slices(len(rows), ROWS_PER_STATEMENT):
            values = [
                {
                    "start": b.start,
                    "key_id": b.key,
                    "instance": b.instance,
                    "model": b.model,
                    "requests": b.requests,
                    "prompt_tokens": b.prompt_tokens,
                    "completion_tokens": b.completion_tokens,
                    "estimated_requests": b.estimated_requests,
                    "cost_usd": b.cost_usd,
                }
                for b in rows[part]
            ]
            stmt = make(table).values(values)
            stmt = stmt.on_conflict_do_update(
                index_elements=list(KEY_COLUMNS),
                set_={name: table.c[name] + stmt.excluded[name] for name in SUMMED},
            )
            conn.execute(stmt)

    def record(self, batch: Batch, now: datetime) -> list[Bucket] | None:
        """Store a batch: its minute buckets (with their cost), or None when its id was stored before."""
        if batch.id is None or not batch.rows:
            return []
        try:
            with self.store._write() as conn:
                seen = conn.execute(select(usage_batches.c.id).where(usage_batches.c.id == batch.id)).first()
                if seen is not None:
                    return None
                conn.execute(insert(usage_batches).values(id=batch.id, at=now))
                rates = self._rates(conn, {row.instance for row in batch.rows})
                minutes = buckets(batch.rows, rates, MINUTE_S)
                self._add(conn, usage_minute, minutes)
                self._add(conn, usage_day, buckets(batch.rows, rates, DAY_S))
                return minutes
        except IntegrityError:  # the same id written meanwhile (PostgreSQL, another connection)
            return None

    def prune(self, now: datetime, minute_retention_h: float, day_retention_d: int) -> None:
        """Drop minute buckets (and batch ids) older than minute_retention_h, day buckets older than
        day_retention_d. A batch id outlives any chance of its batch coming back (one drain interval)."""
        t = int(now.timestamp())
        minutes_from = t - int(minute_retention_h * 3600)
        with self.store._write() as conn:
            conn.execute(delete(usage_minute).where(usage_minute.c.start < minutes_from))
            conn.execute(delete(usage_day).where(usage_day.c.start < t - day_retention_d * DAY_S))
            ids_from = now - timedelta(hours=minute_retention_h)
            conn.execute(delete(usage_batches).where(usage_batches.c.at < ids_from))

    def spent(self, key_id: str, start: int) -> float:
        """USD a key spent from `start` (a day's start) on, as drained: the seed of its budget."""
        stmt = select(func.sum(usage_day.c.cost_usd)).where(
            usage_day.c.key_id == key_id, usage_day.c.start >= start
        )
        with self.store._read() as conn:
            return float(conn.execute(stmt).scalar() or 0.0)

    def key_names(self, conn: Connection) -> dict[str, str]:
        return {key_id: name for key_id, name in conn.execute(select(client_keys.c.id, client_keys.c.name))}

    def query(self, q: UsageQuery) -> list[dict[str, Any]]:
        table = usage_day if q.by_day else usage_minute
        dims: list[Any] = []
        if "key" in q.group_by:
            dims.append(table.c.key_id.label("key"))
        if "instance" in q.group_by:
            dims.append(table.c.instance.label("instance"))
        if "model" in q.group_by:
            dims.append(table.c.model.label("model"))
        if "day" in q.group_by:
            dims.append((table.c.start - table.c.start % DAY_S).label("day"))
        sums = [func.sum(table.c[name]).label(name) for name in SUMMED]
        stmt = select(*dims, *sums).where(table.c.start >= q.start, table.c.start < q.end)
        for column, value in (("key_id", q.key), ("instance", q.instance), ("model", q.model)):
            if value is not None:
                stmt = stmt.where(table.c[column] == value)
        if dims:
            stmt = stmt.group_by(*dims).order_by(*dims)
        with self.store._read() as conn:
            rows = [dict(row._mapping) for row in conn.execute(stmt)]
            names = self.key_names(conn) if "key" in q.group_by else {}
        return [answer_row(q.group_by, row, names) for row in rows if row["requests"] is not None]
