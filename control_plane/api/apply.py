"""Read your writes: an admin call that changes what nginx serves returns once nginx serves it.

``?wait=true`` (the default) waits for the reconcile pass that includes the write; the answer then has its
usual status and ``X-ISHGW-Applied: true``. When that pass fails, or does not finish within
``APPLY_TIMEOUT_S``, the write is kept and the answer is ``202`` with ``X-ISHGW-Applied: false`` and
``applied: false`` in the body (``GET /admin/status`` shows why). ``?wait=false`` answers ``202`` at once
with ``X-ISHGW-Applied: pending``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from control_plane.api.keys import RECONCILER
from control_plane.errors import InvalidInput

APPLY_TIMEOUT_S = 30.0
APPLIED_HEADER = "X-ISHGW-Applied"
WAIT_VALUES = {"true": True, "1": True, "false": False, "0": False}
NOT_APPLIED = (
    "the change is stored, but nginx does not serve it yet; GET /admin/status shows last_reload, "
    "and the next reconcile tries again"
)


@dataclass(frozen=True)
class Applied:
    state: str  # "true" | "false" | "pending"

    @property
    def done(self) -> bool:
        return self.state == "true"


def wants_wait(request: web.Request) -> bool:
    value = request.query.get("wait", "true").lower()
    if value not in WAIT_VALUES:
        raise InvalidInput([{"field": "wait", "message": "must be true or false"}])
    return WAIT_VALUES[value]


async def apply_change(request: web.Request, reason: str, wait: bool) -> Applied:
    """Tell the reconciler about a committed write and, with ``wait`` (from ``wants_wait``, read before
    the write so a bad value changes nothing), wait until nginx serves it."""
    reconciler = request.app[RECONCILER]
    if not wait:
        reconciler.request(reason)
        return Applied("pending")
    try:
        result = await asyncio.wait_for(reconciler.apply(reason), APPLY_TIMEOUT_S)
    except TimeoutError:
        return Applied("false")
    return Applied("true" if result.ok else "false")


def respond(applied: Applied, body: dict[str, Any] | None, status: int) -> web.Response:
    """The handler's answer, or 202 (with ``applied: false`` and why) when nginx does not serve it yet."""
    headers = {APPLIED_HEADER: applied.state}
    if applied.done:
        if body is None:
            return web.Response(status=status, headers=headers)
        return web.json_response(body, status=status, headers=headers)
    extra: dict[str, Any] = {"applied": False, "detail": NOT_APPLIED if applied.state == "false" else None}
    if applied.state == "pending":
        extra["detail"] = "stored; nginx serves it within about a second (GET /admin/status)"
    return web.json_response({**(body or {}), **extra}, status=202, headers=headers)
