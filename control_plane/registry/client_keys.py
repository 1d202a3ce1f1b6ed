"""Client API keys: value objects and their persistence (tables from store migration 2).

A key's secret exists in clear only in the answer to its creation. The store keeps its sha256, a short
prefix and its last 4 characters (to recognise it in listings); the data plane gets the hashes.
Every key write bumps the configuration generation, like any other configuration write.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from control_plane.errors import Conflict, NotFound
from control_plane.registry import validators as v
from control_plane.registry.store import Store, client_keys

KEY_PREFIX = "ishgw-"
KEY_ID_RE = re.compile(r"^key_[0-9a-f]{16}$")
# A model name, or a name prefix ending in '*' ("gpt-4o*"), or '*' alone (everything).
MODEL_PATTERN_RE = re.compile(rf"^(?:\*|{v.MODEL_PATTERN}\*?)$")
SHOWN_PREFIX_LEN = len(KEY_PREFIX) + 4


def check_model_pattern(value: str) -> str:
    if not MODEL_PATTERN_RE.fullmatch(value):
        raise ValueError("a model name (letters, digits and . _ : / @ + -), optionally ending in '*', or '*'")
    return value


def check_key_id(value: str) -> str:
    if not KEY_ID_RE.fullmatch(value):
        raise ValueError("key ids look like key_0123456789abcdef")
    return value


ModelPattern = Annotated[str, AfterValidator(check_model_pattern)]


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError("needs a timezone (e.g. 2030-01-01T00:00:00Z)")
    return value.astimezone(UTC) if value is not None else None


class ClientKeySettings(BaseModel):
    """What an operator sets on a key (creation body; updates are partial)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, AfterValidator(v.check_name)]
    allowed_models: list[ModelPattern] = Field(
        default_factory=list, max_length=512, description="Model names or 'prefix*' patterns; empty: all"
    )
    rpm_limit: int | None = Field(
        default=None,
        ge=0,
        le=10**6,
        description="Requests per minute; 0: no key limit; null: ISHGW_KEY_DEFAULT_RPM (default 0: none)",
    )
    tpm_limit: int = Field(
        default=0,
        ge=0,
        le=10**10,
        description="Tokens per minute (prompt + completion, the last 60 s), enforced in nginx; 0: none",
    )
    max_budget_usd: float = Field(
        default=0.0, ge=0, le=10**9, description="USD the key may spend per budget_period; 0: no budget"
    )
    budget_period: Literal["day", "month", "total"] = Field(
        default="month", description="The budget's period (UTC): day, month or total (never resets)"
    )
    expires_at: datetime | None = Field(default=None, description="RFC 3339 with a timezone; null: never")
    enabled: bool = True

    @field_validator("expires_at")
    @classmethod
    def _expires(cls, value: datetime | None) -> datetime | None:
        return _aware(value)


UPDATABLE_KEY_FIELDS = frozenset(ClientKeySettings.model_fields)


class ClientKey(ClientKeySettings):
    """A stored key: its settings plus what identifies it. Never holds the secret."""

    id: str
    key_hash: str
    key_prefix: str
    key_last4: str
    created_at: datetime
    updated_at: datetime

    def public(self) -> dict[str, Any]:
        """The key as the API shows it: everything but the hash."""
        return self.model_dump(mode="json", exclude={"key_hash"})

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now


def _now() -> datetime:
    return datetime.now(UTC)


def _row_key(data: str) -> ClientKey:
    return ClientKey.model_validate(json.loads(data))


class ClientKeyStore:
    """Key CRUD on the registry store's database (same transactions, same generation counter)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def list(self) -> list[ClientKey]:
        with self.store._read() as conn:
            query = select(client_keys.c.data).order_by(client_keys.c.created_at, client_keys.c.id)
            rows = conn.execute(query)
            return [_row_key(row[0]) for row in rows]

    def get(self, key_id: str) -> ClientKey:
        with self.store._read() as conn:
            data = conn.execute(select(client_keys.c.data).where(client_keys.c.id == key_id)).scalar()
        if data is None:
            raise NotFound(f"key {key_id!r} not found")
        return _row_key(data)

    def create(self, settings: ClientKeySettings) -> tuple[ClientKey, str]:
        """A new key and its secret (the only time the secret exists outside the client)."""
        secret = new_secret()
        now = _now()
        key = ClientKey(
            **settings.model_dump(),
            id="key_" + secrets.token_hex(8),
            key_hash=hash_key(secret),
            key_prefix=secret[:SHOWN_PREFIX_LEN],
            key_last4=secret[-4:],
            created_at=now,
            updated_at=now,
        )
        try:
            with self.store._write() as conn:
                self.store._bump_generation(conn)
                taken = conn.execute(select(client_keys.c.id).where(client_keys.c.name == key.name)).first()
                if taken is not None:
                    raise Conflict(f"a key named {key.name!r} exists")
                conn.execute(
                    insert(client_keys).values(
                        id=key.id,
                        name=key.name,
                        key_hash=key.key_hash,
                        data=key.model_dump_json(),
                        created_at=now,
                        updated_at=now,
                    )
                )
        except IntegrityError as exc:  # a concurrent creator took the name
            raise Conflict(f"a key named {key.name!r} exists") from exc
        return key, secret

    def update(self, key_id: str, changes: dict[str, Any]) -> ClientKey:
        """Apply ``changes`` (fields of ClientKeySettings as JSON data, an admin API body) to a key: merged
        over its current settings, the whole validated strictly, in one transaction."""
        try:
            with self.store._write() as conn:
                self.store._bump_generation(conn)
                data = conn.execute(select(client_keys.c.data).where(client_keys.c.id == key_id)).scalar()
                if data is None:
                    raise NotFound(f"key {key_id!r} not found")
                current = _row_key(data)
                merged = v.validate_strict(
                    ClientKeySettings,
                    {**current.model_dump(mode="json", include=set(UPDATABLE_KEY_FIELDS)), **changes},
                )
                if merged.name != current.name:
                    taken = conn.execute(
                        select(client_keys.c.id).where(client_keys.c.name == merged.name)
                    ).first()
                    if taken is not None:
                        raise Conflict(f"a key named {merged.name!r} exists")
                now = _now()
                key = current.model_copy(update={**merged.model_dump(), "updated_at": now})
                conn.execute(
                    update(client_keys)
                    .where(client_keys.c.id == key_id)
                    .values(name=key.name, data=key.model_dump_json(), updated_at=now)
                )
        except IntegrityError as exc:
            raise Conflict("a key with that name exists") from exc
        return key

    def delete(self, key_id: str) -> ClientKey:
        with self.store._write() as conn:
            self.store._bump_generation(conn)
            data = conn.execute(select(client_keys.c.data).where(client_keys.c.id == key_id)).scalar()
            if data is None:
                raise NotFound(f"key {key_id!r} not found")
            conn.execute(delete(client_keys).where(client_keys.c.id == key_id))
        return _row_key(data)
