"""The admin audit trail (table from store migration 2): who changed what, when. Never a secret."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, insert, select

from control_plane.registry.store import Store, audit_log


@dataclass(frozen=True)
class AuditEntry:
    at: datetime
    actor: str  # "key:<fingerprint>" of the admin key used
    client_ip: str
    method: str
    path: str
    target: str | None
    status: int
    id: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = self.at.astimezone(UTC).isoformat()
        return data


class AuditLog:
    def __init__(self, store: Store, keep: int = 100_000) -> None:
        self.store = store
        self.keep = keep
        self._writes = 0

    def record(self, entry: AuditEntry) -> None:
        with self.store._write() as conn:
            conn.execute(
                insert(audit_log).values(
                    at=entry.at,
                    actor=entry.actor[:64],
                    client_ip=entry.client_ip[:64],
                    method=entry.method[:16],
                    path=entry.path[:512],
                    target=entry.target[:255] if entry.target else None,
                    status=entry.status,
                )
            )
            self._writes += 1
            if self._writes % 1000 == 0:  # trim now and then, not on every write
                newest = conn.execute(select(func.max(audit_log.c.id))).scalar() or 0
                conn.execute(delete(audit_log).where(audit_log.c.id <= newest - self.keep))

    def recent(self, limit: int = 100, before: int | None = None) -> list[AuditEntry]:
        """Newest first; ``before`` pages back by id."""
        query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
        if before is not None:
            query = query.where(audit_log.c.id < before)
        with self.store._read() as conn:
            rows = conn.execute(query).mappings().all()
        return [
            AuditEntry(
                at=row["at"] if row["at"].tzinfo else row["at"].replace(tzinfo=UTC),
                actor=row["actor"],
                client_ip=row["client_ip"],
                method=row["method"],
                path=row["path"],
                target=row["target"],
                status=row["status"],
                id=row["id"],
            )
            for row in rows
        ]
