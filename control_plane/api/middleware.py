"""Admin API middlewares: JSON errors for everything, and API-key authentication with failure throttling."""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from pydantic import ValidationError

from control_plane.api.app_keys import ADMIN_KEY
from control_plane.api.sessions import COOKIE, SESSIONS, cookie_may_authorize
from control_plane.errors import Conflict, InvalidInput, NotFound

log = logging.getLogger(__name__)

# Routes (by canonical path) that answer without the admin key.
PUBLIC_ROUTES = frozenset({"/admin/openapi.json", "/admin/health"})
# The status page's login, logout and static files (no data in them) answer without a key too.
PUBLIC_ROUTES = PUBLIC_ROUTES | {"/login", "/logout", "/static/{file}"}
ADMIN_PREFIX = "/admin"
KEY_HEADER = "X-Admin-API-Key"


class ApiError(Exception):
    """An HTTP error with a JSON body, raised by handlers for protocol-level problems (400, 415, ...)."""

    def __init__(self, status: int, error: str, detail: str | None = None) -> None:
        super().__init__(detail or error)
        self.status = status
        self.error = error
        self.detail = detail


def _body(error: str, detail: object = None) -> dict[str, object]:
    """Every admin error has both fields: a stable code and what went wrong."""
    return {"error": error, "detail": error.replace("_", " ") if detail is None else detail}


def _message(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def validation_details(exc: ValidationError) -> list[dict[str, str]]:
    """{field, message} pairs; the offending input value is never included (it may be a secret)."""
    return [
        {"field": ".".join(str(part) for part in err["loc"]) or "body", "message": _message(err["msg"])}
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


def _http_exception_response(exc: web.HTTPException) -> web.Response:
    headers = {
        k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after", "www-authenticate")
    }
    error = exc.reason.lower().replace(" ", "_") if exc.reason else "http_error"
    detail = f"{exc.reason}: {_route_hint(exc)}" if exc.status in (404, 405) else exc.reason
    return web.json_response(_body(error, detail), status=exc.status, headers=headers)


def _route_hint(exc: web.HTTPException) -> str:
    if exc.status == 405 and "Allow" in exc.headers:
        return f"allowed methods are {exc.headers['Allow']}"
    return "no such admin route (GET /admin/openapi.json lists them)"


def error_response(exc: Exception) -> web.StreamResponse:
    """Map an exception to its JSON answer."""
    if isinstance(exc, ApiError):
        return web.json_response(_body(exc.error, exc.detail), status=exc.status)
    if isinstance(exc, InvalidInput):
        return web.json_response(_body("invalid_input", exc.errors), status=422)
    if isinstance(exc, ValidationError):
        return web.json_response(_body("invalid_input", validation_details(exc)), status=422)
    if isinstance(exc, NotFound):
        return web.json_response(_body("not_found", str(exc) or "not found"), status=404)
    if isinstance(exc, Conflict):
        return web.json_response(_body("conflict", str(exc) or "conflict"), status=409)
    if isinstance(exc, web.HTTPException):
        return _http_exception_response(exc)
    log.exception("unhandled error in admin API", exc_info=exc)
    return web.json_response(
        _body("internal_error", "the controller failed to answer; its log has the details"), status=500
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: every answer, including errors and unknown routes, is JSON."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc)
    except Exception as exc:
        return error_response(exc)
    return response


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
        _body("unauthorized", f"send the admin key in {KEY_HEADER} or Authorization: Bearer"),
        status=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


def _throttled(retry_after: int) -> web.Response:
    return web.json_response(
        _body(
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


MIDDLEWARES = (error_middleware, auth_middleware)


def install_auth_state(app: web.Application) -> None:
    """Give the application its throttle (idempotent). Call before the application starts."""
    if AUTH_THROTTLE not in app:
        app[AUTH_THROTTLE] = AuthThrottle()


# Routes that take whole registry documents: these may be up to ISHGW_ADMIN_MAX_BODY_MB; every other admin
# body keeps aiohttp's 1 MiB.
BULK_ROUTES = frozenset({("POST", "/admin/config/import"), ("POST", "/admin/instances/migrate")})


def body_limit_middleware(bulk_max_bytes: int) -> Middleware:
    """Raise the body limit for the bulk routes only (inside error_middleware, so a 413 is JSON)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.method, request.path) in BULK_ROUTES:
            request = request.clone(client_max_size=bulk_max_bytes)
        return await handler(request)

    return middleware
