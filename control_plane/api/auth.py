"""Admin API authentication: the admin key (``X-Admin-API-Key`` or ``Authorization: Bearer``) on every route
but the public ones, a status page session cookie on the few reads it may authorize, and a per-address
throttle of failures that never refuses the right key."""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler

from control_plane.api.app_keys import ADMIN_KEY
from control_plane.api.bodies import error_body
from control_plane.api.sessions import COOKIE, SESSIONS, cookie_may_authorize

# Routes (by canonical path) that answer without the admin key.
PUBLIC_ROUTES = frozenset({"/admin/openapi.json", "/admin/health"})
# The status page's login, logout and static files (no data in them) answer without a key too.
PUBLIC_ROUTES = PUBLIC_ROUTES | {"/login", "/logout", "/static/{file}"}
ADMIN_PREFIX = "/admin"
KEY_HEADER = "X-Admin-API-Key"


@dataclass
class _Failures:
    window_start: float
    count: int


class AuthThrottle:
    """Counts failed authentications per client address in fixed windows; bounded in size.

    After ``limit`` failures inside ``window_s`` seconds the address gets 429 for every wrong key until
    the window ends. The right key always passes: a throttle that also refused it would let anyone who
    can reach the listener lock the operator out. Guessing gains nothing from that: the admin key is
    long and random, and a wrong guess meets 429 exactly like a wrong guess before.
    """

    def __init__(
        self,
        *,
        limit: int = 10,
        window_s: float = 60.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, _Failures] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def _current(self, client: str, now: float) -> _Failures | None:
        entry = self._entries.get(client)
        if entry is not None and now - entry.window_start >= self.window_s:
            del self._entries[client]
            return None
        return entry

    def retry_after(self, client: str) -> int | None:
        """Seconds until ``client`` may try again, or None when it is not blocked."""
        now = self._clock()
        entry = self._current(client, now)
        if entry is None or entry.count < self.limit:
            return None
        return max(1, math.ceil(entry.window_start + self.window_s - now))

    def record_failure(self, client: str) -> None:
        now = self._clock()
        entry = self._current(client, now)
        if entry is None:
            self._make_room(now)
            self._entries[client] = _Failures(window_start=now, count=1)
        else:
            entry.count += 1

    def _make_room(self, now: float) -> None:
        if len(self._entries) < self.max_entries:
            return
        expired = [k for k, e in self._entries.items() if now - e.window_start >= self.window_s]
        for key in expired:
            del self._entries[key]
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]  # oldest window first (insertion order)


AUTH_THROTTLE = web.AppKey("auth_throttle", AuthThrottle)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key from ``X-Admin-API-Key`` or ``Authorization: Bearer``; None when neither is present."""
    key = headers.get(KEY_HEADER)
    if key is not None:
        return key
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def key_matches(presented: str | None, expected: str) -> bool:
    if presented is None or not expected:
        return False
    return hmac.compare_digest(
        presented.encode("utf-8", "backslashreplace"), expected.encode("utf-8", "backslashreplace")
    )


def _needs_auth(request: web.Request) -> bool:
    info = request.match_info
    matched = info.http_exception is None
    if matched and info.route.resource is not None and info.route.resource.canonical in PUBLIC_ROUTES:
        return False
    return matched or request.path.startswith(ADMIN_PREFIX)


def _unauthorized() -> web.Response:
    return web.json_response(
        error_body("unauthorized", f"send the admin key in {KEY_HEADER} or Authorization: Bearer"),
        status=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


def _throttled(retry_after: int) -> web.Response:
    return web.json_response(
        error_body(
            "too_many_requests",
            "too many failed authentications from this address (ISHGW_ADMIN_AUTH_FAILURE_LIMIT per "
            "ISHGW_ADMIN_AUTH_FAILURE_WINDOW_S)",
        ),
        status=429,
        headers={"Retry-After": str(retry_after)},
    )


def _session_reads(request: web.Request) -> bool:
    """A status page session cookie, on one of the few reads it may authorize (sessions.COOKIE_READABLE)."""
    sessions = request.app.get(SESSIONS)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else None
    return (
        sessions is not None
        and cookie_may_authorize(request.method, route)
        and sessions.valid(request.cookies.get(COOKIE))
    )


# Set on a request whose admin key was refused (401): the audit middleware records the attempt.
AUTH_FAILED = web.RequestKey("auth_failed", bool)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every admin route but the public ones needs the admin key; failures are throttled per address,
    the right key never is."""
    if not _needs_auth(request) or key_matches(presented_key(request.headers), request.app[ADMIN_KEY]):
        return await handler(request)
    if _session_reads(request):
        return await handler(request)
    if request.method in ("GET", "HEAD") and request.path == "/" and presented_key(request.headers) is None:
        return web.Response(status=303, headers={"Location": "/login"})  # a browser: to the login form
    throttle = request.app[AUTH_THROTTLE]
    client = request.remote or "unknown"
    wait = throttle.retry_after(client)
    if wait is not None:
        return _throttled(wait)
    throttle.record_failure(client)
    request[AUTH_FAILED] = True
    return _unauthorized()
