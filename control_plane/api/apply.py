"""Read your writes: an admin call that changes what nginx serves returns once nginx serves it.

``?wait=true`` (the default) waits for the reconcile pass that includes the write; the answer then has its
usual status and ``X-ISHGW-Applied: true``. When that pass fails, or does not finish within
``APPLY_TIMEOUT_S``, the write is kept and the answer is ``202`` with ``X-ISHGW-Applied: false`` and
``applied: false`` in the body (``GET /admin/status`` shows why). ``?wait=false`` answers ``202`` at once
with ``X-ISHGW-Applied: pending``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from control_plane.api.app_keys import RECONCILER
from control_plane.errors import InvalidInput

APPLY_TIMEOUT_S = 30.0
APPLIED_HEADER = "X-ISHGW-Applied"
WAIT_VALUES = {"true": True, "1": True, "false": False, "0": False}
NOT_APPLIED = (
    "the change is stored, but nginx does not serve it yet; GET /admin/status shows last_reload, "
    "and the next reconcile tries again"
)
PENDING = "stored; nginx serves it within about a second (GET /admin/status)"


def wants_wait(request: web.Request) -> bool:
    value = request.query.get("wait", "true").lower()
    if value not in WAIT_VALUES:
        raise InvalidInput([{"field": "wait", "message": "must be true or false"}])
    return WAIT_VALUES[value]


async def _applied(request: web.Request, reason: str, wait: bool) -> str:
    """The X-ISHGW-Applied value: "true" once nginx serves the write, "false" when the pass failed or took
    too long, "pending" without waiting."""
    reconciler = request.app[RECONCILER]
    if not wait:
        reconciler.request(reason)
        return "pending"
    try:
        result = await asyncio.wait_for(reconciler.apply(reason), APPLY_TIMEOUT_S)
    except TimeoutError:
        return "false"
    return "true" if result.ok else "false"


async def answer_applied(
    request: web.Request, reason: str, wait: bool, body: dict[str, Any] | None, status: int
) -> web.Response:
    """Tell the reconciler about a committed write and answer: with ``wait`` (from ``wants_wait``, read
    before the write so a bad value changes nothing) once nginx serves it with the handler's ``body`` and
    ``status``, else 202 with ``applied: false`` and why."""
    state = await _applied(request, reason, wait)
    headers = {APPLIED_HEADER: state}
    if state == "true":
        if body is None:
            return web.Response(status=status, headers=headers)
        return web.json_response(body, status=status, headers=headers)
    detail = PENDING if state == "pending" else NOT_APPLIED
    return web.json_response(
        {**(body or {}), "applied": False, "detail": detail}, status=202, headers=headers
    )
