"""Scaling groups and scaling events in the registry.

Groups are one JSON document in ``settings`` (key ``scaling_groups``): they never reach nginx, so writing
them does not bump the configuration generation. Events are rows of ``scaling_events`` (migration 4), kept
to the newest ``EVENTS_KEPT``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, desc, insert, select, update
from sqlalchemy.engine import Connection

from control_plane.errors import Conflict, NotFound
from control_plane.registry.store import Store, scaling_events, settings
from control_plane.scaling.model import ScalingGroup

GROUPS_KEY = "scaling_groups"
EVENTS_KEPT = 10_000


def _change_groups(conn: Connection, change: Callable[[dict[str, Any]], None]) -> None:
    raw = conn.execute(select(settings.c.value).where(settings.c.key == GROUPS_KEY)).scalar()
    documents: dict[str, Any] = json.loads(raw) if raw is not None else {}
    change(documents)
    value = json.dumps(documents, sort_keys=True, separators=(",", ":"))
    if raw is None:
        conn.execute(insert(settings).values(key=GROUPS_KEY, value=value))
    else:
        conn.execute(update(settings).where(settings.c.key == GROUPS_KEY).values(value=value))


class ScalingStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    # -- groups --------------------------------------------------------------------------------------------

    def groups(self) -> dict[str, ScalingGroup]:
        with self.store._read() as conn:
            raw = conn.execute(select(settings.c.value).where(settings.c.key == GROUPS_KEY)).scalar()
        documents: dict[str, Any] = json.loads(raw) if raw is not None else {}
        return {name: ScalingGroup.model_validate(doc) for name, doc in sorted(documents.items())}

    def _write_groups(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Read, change (a function of the dict of documents) and write back in one write transaction."""
        with self.store._write() as conn:
            _change_groups(conn, change)

    def importer(self, groups: list[ScalingGroup], *, merge: bool) -> Callable[[Connection], None]:
        """The groups of an imported document, written in the import's transaction: merge replaces or adds
        groups by name, replace makes them the only groups (the autoscaler drains and stops the members of
        a group that goes)."""

        def change(documents: dict[str, Any]) -> None:
            if not merge:
                documents.clear()
            documents.update({group.name: group.model_dump(mode="json") for group in groups})

        return lambda conn: _change_groups(conn, change)

    def create_group(self, group: ScalingGroup) -> None:
        def change(documents: dict[str, Any]) -> None:
            if group.name in documents:
                raise Conflict(f"scaling group {group.name!r} already exists")
            documents[group.name] = group.model_dump(mode="json")

        self._write_groups(change)

    def replace_group(self, group: ScalingGroup) -> None:
        def change(documents: dict[str, Any]) -> None:
            if group.name not in documents:
                raise NotFound(f"scaling group {group.name!r} not found")
            documents[group.name] = group.model_dump(mode="json")

        self._write_groups(change)

    def delete_group(self, name: str) -> None:
        def change(documents: dict[str, Any]) -> None:
            if documents.pop(name, None) is None:
                raise NotFound(f"scaling group {name!r} not found")

        self._write_groups(change)

    # -- events --------------------------------------------------------------------------------------------

    def add_event(self, event: dict[str, Any]) -> int:
        with self.store._write() as conn:
            result = conn.execute(
                insert(scaling_events).values(
                    at=datetime.now(UTC), group_name=str(event["group"]), data=json.dumps(event)
                )
            )
            event_id = int(result.inserted_primary_key[0])  # type: ignore[index]
            if event_id % 100 == 0:  # now and then: keep the newest EVENTS_KEPT
                conn.execute(delete(scaling_events).where(scaling_events.c.id <= event_id - EVENTS_KEPT))
            return event_id

    def update_event(self, event_id: int, event: dict[str, Any]) -> None:
        with self.store._write() as conn:
            conn.execute(
                update(scaling_events).where(scaling_events.c.id == event_id).values(data=json.dumps(event))
            )

    def events(
        self, group: str | None = None, limit: int = 100, before: int | None = None
    ) -> list[dict[str, Any]]:
        query = (
            select(scaling_events.c.id, scaling_events.c.data)
            .order_by(desc(scaling_events.c.id))
            .limit(limit)
        )
        if group is not None:
            query = query.where(scaling_events.c.group_name == group)
        if before is not None:
            query = query.where(scaling_events.c.id < before)
        with self.store._read() as conn:
            rows = conn.execute(query).all()
        return [{"id": row.id, **json.loads(row.data)} for row in rows]
