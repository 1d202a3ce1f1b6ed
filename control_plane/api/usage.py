"""Admin API for usage: GET /admin/usage (sums by key, instance, model or day; JSON or CSV) and
GET /admin/keys/{key_id}/usage (one key: today, this month, its budget left)."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from typing import Any

from aiohttp import web

from control_plane.api.app_keys import STORE
from control_plane.api.bodies import invalid
from control_plane.api.client_keys import client_keys, key_id_of
from control_plane.registry import validators as v
from control_plane.registry.client_keys import ClientKey, check_key_id
from control_plane.registry.usage import UsageStore
from control_plane.usage.limits import period_bounds
from control_plane.usage.model import DAY_S, GROUPS, TOTALS, UsageQuery, csv_text

DEFAULT_DAYS = 30


LAST_T = 253_402_300_740  # 9999-12-31T23:59:00Z: times are kept within 1970-01-01 .. year 9999


def _instant(field: str, text: str, *, end: bool) -> int:
    """A date (a whole day: `to` includes it) or an ISO 8601 date-time (UTC when it names no zone), in Unix
    seconds rounded down to the minute, within 1970 .. 9999."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            at = datetime(day.year, day.month, day.day, tzinfo=UTC)
            if end:
                at = at + timedelta(days=1) if day < date.max else datetime.max.replace(tzinfo=UTC)
        else:
            at = datetime.fromisoformat(text)
            at = at if at.tzinfo else at.replace(tzinfo=UTC)
        t = int(at.timestamp())
    except (ValueError, OverflowError):
        raise invalid(field, "a date (YYYY-MM-DD) or an ISO 8601 date-time") from None
    t = min(max(t, 0), LAST_T)
    return t - t % 60


def _iso(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _group_by(text: str) -> tuple[str, ...]:
    """One or more of GROUPS, comma separated (a repeated one counts once)."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in GROUPS]
    if unknown or not names:
        raise invalid("group_by", f"one or more of {', '.join(GROUPS)} (comma separated)")
    return names


def _checked(request: web.Request, field: str, check: Any) -> str | None:
    value = request.query.get(field)
    if value is None:
        return None
    try:
        return str(check(value))
    except ValueError as exc:
        raise invalid(field, str(exc)) from None


def parse_query(request: web.Request, now: datetime) -> UsageQuery:
    tomorrow = int(now.timestamp()) // DAY_S * DAY_S + DAY_S
    end = _instant("to", request.query["to"], end=True) if "to" in request.query else tomorrow
    start = (
        _instant("from", request.query["from"], end=False)
        if "from" in request.query
        else end - end % DAY_S - DEFAULT_DAYS * DAY_S
    )
    return UsageQuery(
        start=start,
        end=end,
        group_by=_group_by(request.query.get("group_by", "key")),
        key=_checked(request, "key", check_key_id),
        instance=_checked(request, "instance", v.check_name),
        model=_checked(request, "model", v.check_model),
    )


def _usage(request: web.Request) -> UsageStore:
    return UsageStore(request.app[STORE])


async def get_usage(request: web.Request) -> web.Response:
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise invalid("format", "json or csv")
    query = parse_query(request, datetime.now(UTC))
    rows = await asyncio.to_thread(_usage(request).query, query)
    if fmt == "csv":
        return web.Response(
            text=csv_text(rows),
            content_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="usage.csv"'},
        )
    return web.json_response({"rows": rows, "from": _iso(query.start), "to": _iso(query.end)})


def _totals(usage: UsageStore, key_id: str, start: int, end: int) -> dict[str, Any]:
    rows = usage.query(UsageQuery(start=start, end=end, group_by=(), key=key_id))
    row = rows[0] if rows else {}
    return {
        "from": _iso(start),
        "to": _iso(end),
        **{name: row.get(name, 0.0 if name == "cost_usd" else 0) for name in TOTALS},
    }


def _budget(usage: UsageStore, key: ClientKey, now: datetime) -> dict[str, Any] | None:
    """The key's budget this period: spent as drained (nginx enforces its own, fresher count), left, reset."""
    if key.max_budget_usd <= 0:
        return None
    start, end = period_bounds(key.budget_period, now)
    spent = usage.spent(key.id, start)
    return {
        "max_budget_usd": key.max_budget_usd,
        "period": key.budget_period,
        "from": _iso(start),
        "spent_usd": spent,
        "left_usd": max(0.0, key.max_budget_usd - spent),
        "resets_at": _iso(end) if end is not None else None,
    }


async def get_key_usage(request: web.Request) -> web.Response:
    """One key: today and this month (UTC), from the day buckets; its limits and the budget left."""
    key = await asyncio.to_thread(client_keys(request).get, key_id_of(request))
    now = datetime.now(UTC)
    today = int(now.timestamp()) // DAY_S * DAY_S
    month = int(datetime(now.year, now.month, 1, tzinfo=UTC).timestamp())
    usage = _usage(request)
    today_totals = await asyncio.to_thread(_totals, usage, key.id, today, today + DAY_S)
    month_totals = await asyncio.to_thread(_totals, usage, key.id, month, today + DAY_S)
    budget = await asyncio.to_thread(_budget, usage, key, now)
    return web.json_response(
        {
            "key": key.id,
            "key_name": key.name,
            "today": today_totals,
            "month": month_totals,
            "tpm_limit": key.tpm_limit,
            "budget": budget,
        }
    )
