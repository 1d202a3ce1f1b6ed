"""Paged listings: ``limit`` and an opaque ``cursor``, and the instance filters. Pure.

A listing is sorted by a unique string key (an instance's name, a key's id); the cursor is the last key
of the page before, so pages stay consistent while the registry changes between calls (an instance added
or removed meanwhile shows up or disappears, no other is skipped or repeated). The answer keeps its shape
(``{"instances": [...]}``) and adds ``next_cursor``: null on the last page.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from control_plane.errors import InvalidInput
from control_plane.registry.models import (
    HealthStatus,
    InstanceConfig,
    InstanceState,
    OperatorStatus,
    ProviderType,
)

T = TypeVar("T")

DEFAULT_LIMIT = 1000  # a registry up to this size answers in one page, as before paging existed
MAX_LIMIT = 1000
MAX_CURSOR_LEN = 400
MAX_FILTER_LEN = 256
STATUSES = frozenset(OperatorStatus) | frozenset(HealthStatus)
PROVIDERS = frozenset(ProviderType)


def _invalid(field: str, message: str) -> InvalidInput:
    return InvalidInput([{"field": field, "message": message}])


@dataclass(frozen=True)
class Page:
    limit: int = DEFAULT_LIMIT
    after: str | None = None  # the last key of the previous page


def encode_cursor(key: str) -> str:
    """The cursor is the last key itself: any string is a position in the order (the next page starts
    after it), so a client cannot send a cursor that means nothing."""
    return key


def decode_cursor(cursor: str) -> str:
    if not 1 <= len(cursor) <= MAX_CURSOR_LEN:
        raise _invalid("cursor", f"must be 1-{MAX_CURSOR_LEN} characters")
    return cursor


def page_of(query: Mapping[str, str], default_limit: int = DEFAULT_LIMIT) -> Page:
    """``limit`` (1-1000) and ``cursor`` from a query string; a bad value is an InvalidInput naming it."""
    raw = query.get("limit")
    limit = default_limit
    if raw is not None:
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise _invalid("limit", f"must be an integer 1-{MAX_LIMIT}")
        limit = int(raw)
    cursor = query.get("cursor")
    return Page(limit, decode_cursor(cursor) if cursor is not None else None)


def take(items: Sequence[T], key: Callable[[T], str], page: Page) -> tuple[list[T], str | None]:
    """The page of ``items`` (sorted by ``key``) after ``page.after``, and the cursor of the next page."""
    start = 0 if page.after is None else bisect.bisect_right(items, page.after, key=key)
    chosen = list(items[start : start + page.limit])
    more = start + page.limit < len(items)
    return chosen, encode_cursor(key(chosen[-1])) if more and chosen else None


@dataclass(frozen=True)
class InstanceFilter:
    """Every given filter must hold. ``status`` is an operator status (active, draining, maintenance) or
    a health status (healthy, unhealthy, unknown)."""

    model: str | None = None
    provider: str | None = None
    status: str | None = None
    tag: str | None = None

    def matches(self, config: InstanceConfig, state: InstanceState) -> bool:
        return (
            (self.model is None or self.model in config.models())
            and (self.provider is None or config.provider_type == self.provider)
            and (self.status is None or self.status in (state.status, state.health_status))
            and (self.tag is None or self.tag in config.tags)
        )


def _text(query: Mapping[str, str], field: str, allowed: frozenset[str] | None = None) -> str | None:
    value = query.get(field)
    if value is None:
        return None
    if not value or len(value) > MAX_FILTER_LEN:
        raise _invalid(field, f"must be 1-{MAX_FILTER_LEN} characters")
    if allowed is not None and value not in allowed:
        raise _invalid(field, f"must be one of {', '.join(sorted(allowed))}")
    return value


def instance_filter(query: Mapping[str, str]) -> InstanceFilter:
    return InstanceFilter(
        model=_text(query, "model"),
        provider=_text(query, "provider", PROVIDERS),
        status=_text(query, "status", STATUSES),
        tag=_text(query, "tag"),
    )
