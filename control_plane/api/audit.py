"""The admin API's audit trail: every change (who, what, when) and every refused admin key (from where,
when), and GET /admin/audit.

The audit entry names the admin key by a fingerprint (first 12 hex digits of its sha256) and the client
address; the target is a name or id, never a body. Entries go to the ``audit_log`` table and to the
controller log.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.typedefs import Handler

from control_plane.api import paging
from control_plane.api.app_keys import AUDIT_TARGET
from control_plane.api.auth import AUTH_FAILED, presented_key
from control_plane.api.bodies import invalid, query_int
from control_plane.registry.audit import AuditEntry, AuditLog

log = logging.getLogger("control_plane.audit")

AUDIT = web.AppKey("audit", AuditLog)
CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def fingerprint(key: str | None) -> str:
    if not key:
        return "anonymous"
    return "key:" + hashlib.sha256(key.encode("utf-8", "backslashreplace")).hexdigest()[:12]


def _target(request: web.Request, response: web.StreamResponse) -> str | None:
    target = request.get(AUDIT_TARGET)
    if isinstance(target, str):
        return target
    for name in ("name", "key_id"):
        if name in request.match_info:
            return request.match_info[name]
    body = getattr(response, "body", None)
    if response.status in (201, 202) and isinstance(body, bytes):  # 202: created, not yet served
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            return str(data["name"])
    return None


async def _record(audit: AuditLog, entry: AuditEntry) -> None:
    log.info(
        "audit: %s %s target=%s status=%d by %s from %s",
        entry.method,
        entry.path,
        entry.target or "-",
        entry.status,
        entry.actor,
        entry.client_ip,
    )
    try:
        await asyncio.to_thread(audit.record, entry)
    except Exception:  # the change is made; a lost audit row must be loud, not fatal
        log.exception("audit: could not store the entry")


def _audited(request: web.Request, response: web.StreamResponse) -> bool:
    if request.get(AUTH_FAILED):
        return True
    return request.method in CHANGING_METHODS and 200 <= response.status < 300


@web.middleware
async def audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record every successful change made through the admin API, and every refused admin key (around
    authentication: actor "unauthenticated", never a trace of the key tried). Throttled attempts (429)
    are not recorded one by one: the failures that led to the throttle are."""
    response = await handler(request)
    audit = request.app.get(AUDIT)
    if audit is None or not _audited(request, response):
        return response
    failed = bool(request.get(AUTH_FAILED))
    entry = AuditEntry(
        at=datetime.now(UTC),
        actor="unauthenticated" if failed else fingerprint(presented_key(request.headers)),
        client_ip=request.remote or "unknown",
        method=request.method,
        path=request.path,
        target=None if failed else _target(request, response),
        status=response.status,
    )
    await _record(audit, entry)
    return response


async def list_audit(request: web.Request) -> web.Response:
    """Newest first; ``before`` (an entry id) or ``cursor`` (an answer's ``next_cursor``) pages back."""
    limit = query_int(request, "limit", 100, 1, 1000) or 100
    before = query_int(request, "before", None, 1, 2**62)
    if "cursor" in request.query:
        before = _cursor_id(request.query["cursor"])
    audit = request.app.get(AUDIT)
    entries = await asyncio.to_thread(audit.recent, limit, before) if audit else []
    last = entries[-1].id if entries else None
    cursor = paging.encode_cursor(str(last)) if len(entries) == limit and last is not None else None
    return web.json_response({"entries": [entry.to_json() for entry in entries], "next_cursor": cursor})


def _cursor_id(cursor: str) -> int:
    text = paging.decode_cursor(cursor)
    if not text.isdigit() or not 1 <= int(text) <= 2**62:
        raise invalid("cursor", "is not a cursor this API returned")
    return int(text)
