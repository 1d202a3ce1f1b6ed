"""The status page on the admin listener: GET / (server-rendered HTML), GET /admin/overview (the same content
as JSON, which the page's script polls), the login form, logout and the page's two static files.

The page is read-only. It loads nothing from elsewhere and runs no inline script or style: its
Content-Security-Policy allows only this origin's /static files and fetches to this origin.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from control_plane.api import scaling as scaling_api
from control_plane.api.app_keys import ADMIN_KEY, HEALTH, RECONCILER, SETTINGS, STORE
from control_plane.api.auth import AUTH_FAILED, AUTH_THROTTLE, key_matches
from control_plane.api.bodies import ApiError, literal_keys, redact
from control_plane.api.sessions import COOKIE, SESSIONS, Sessions, same_origin, set_session_cookie
from control_plane.errors import InvalidInput
from control_plane.registry.models import InstanceConfig, InstanceState
from control_plane.registry.store import Store
from control_plane.registry.usage import UsageStore
from control_plane.status import model
from control_plane.usage.model import DAY_S, UsageQuery

HERE = Path(__file__).resolve().parents[1] / "status"
# Whoever keeps alerts (the alert service) sets this: limit -> the most recent alerts, newest first.
RECENT_ALERTS: web.AppKey[Callable[[int], list[dict[str, Any]]]] = web.AppKey("recent_alerts")
ALERTS_SHOWN = 10

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer would make the form's Origin "null"
    "Cache-Control": "no-store",
}
STATIC_TYPES = {"status.js": "text/javascript", "status.css": "text/css"}
FORM_TYPE = "application/x-www-form-urlencoded"


@functools.cache
def _templates() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_page(page: dict[str, Any]) -> str:
    return _templates().get_template("status.html.j2").render(page=page)


def render_login(error: str | None = None) -> str:
    return _templates().get_template("login.html.j2").render(error=error)


@functools.cache
def _static(name: str) -> bytes:
    return (HERE / "static" / name).read_bytes()


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(
        text=text, status=status, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS
    )


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _sessions(request: web.Request) -> Sessions:
    return request.app[SESSIONS]


# -- the content -----------------------------------------------------------------------------------------


def _usage_today(store: Store, now: float) -> dict[str, Any] | None:
    today = int(now) // DAY_S * DAY_S
    rows = UsageStore(store).query(UsageQuery(start=today, end=today + DAY_S, group_by=()))
    return rows[0] if rows else None


def _reloads(request: web.Request, pairs: list[tuple[InstanceConfig, InstanceState]]) -> list[dict[str, Any]]:
    """The reconciler's history, with any literal provider key in an error masked (as POST /admin/reload)."""
    keys = literal_keys(config for config, _ in pairs)
    history = request.app[RECONCILER].history
    return [
        {**result.to_dict(), "error": redact(result.error, keys) if result.error else result.error}
        for result in history
    ]


def _alerts(request: web.Request) -> list[dict[str, Any]] | None:
    recent = request.app.get(RECENT_ALERTS)
    return None if recent is None else recent(ALERTS_SHOWN)


async def overview_data(request: web.Request) -> dict[str, Any]:
    app = request.app
    store = app[STORE]
    health = app[HEALTH]
    now = time.time()
    pairs = await asyncio.to_thread(store.list_instances)
    errors = []
    try:
        usage = await asyncio.to_thread(_usage_today, store, now)
    except Exception:  # the page must show the fleet even when the usage tables cannot be read
        usage = None
        errors.append("usage totals unavailable (see the controller log)")
    inputs = model.Inputs(
        status=app[RECONCILER].status(),
        states={c.name: s for c, s in pairs},
        enabled={c.name: c.enabled for c, _ in pairs},
        breaker_reasons={c.name: health.tracker.breaker_reason(c.name) for c, _ in pairs},
        recent=health.recent,
        now=now,
        usage_today=usage,
        reloads=_reloads(request, pairs),
        alerts=_alerts(request),
        refresh_s=app[SETTINGS].status_refresh_s,
        errors=errors,
        scaling=await scaling_api.overview(app),
    )
    return model.build(inputs)


# -- handlers --------------------------------------------------------------------------------------------


async def page(request: web.Request) -> web.Response:
    return _html(render_page(await overview_data(request)))


async def overview(request: web.Request) -> web.Response:
    return web.json_response(await overview_data(request), headers={"Cache-Control": "no-store"})


async def static(request: web.Request) -> web.Response:
    name = request.match_info["file"]
    if name not in STATIC_TYPES:
        raise web.HTTPNotFound()
    return web.Response(
        body=_static(name),
        content_type=STATIC_TYPES[name],
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )


async def login_form(request: web.Request) -> web.Response:
    if _sessions(request).valid(request.cookies.get(COOKIE)):
        return _see_other("/")
    return _html(render_login())


def _check_form_post(request: web.Request) -> None:
    if not same_origin(request.headers, request.host):
        raise ApiError(403, "forbidden", "cross-origin form post refused")
    if request.content_type != FORM_TYPE:
        raise ApiError(415, "unsupported_media_type", f"expected Content-Type: {FORM_TYPE}")


async def login(request: web.Request) -> web.Response:
    """The admin key from the form, compared in constant time; wrong keys count towards the same
    per-address throttle as wrong keys in headers."""
    _check_form_post(request)
    form = await request.post()
    key = form.get("key")
    if not isinstance(key, str) or not key:
        raise InvalidInput([{"field": "key", "message": "the admin key is required"}])
    client = request.remote or "unknown"
    throttle = request.app[AUTH_THROTTLE]
    if key_matches(key, request.app[ADMIN_KEY]):
        token = _sessions(request).create()
        response = _see_other("/")
        set_session_cookie(response, token, _sessions(request).ttl_s, request.secure)
        return response
    wait = throttle.retry_after(client)
    if wait is not None:
        return _html(render_login(f"Too many failed attempts: try again in {wait} s."), 429)
    throttle.record_failure(client)
    request[AUTH_FAILED] = True
    return _html(render_login("That is not the admin key."), 401)


async def logout(request: web.Request) -> web.Response:
    if not same_origin(request.headers, request.host):
        raise ApiError(403, "forbidden", "cross-origin form post refused")
    _sessions(request).end(request.cookies.get(COOKIE))
    response = _see_other("/login")
    response.del_cookie(COOKIE, path="/")
    return response


BROWSER_ROUTES = (
    ("GET", "/", page, "status_page"),
    ("GET", "/login", login_form, "login_form"),
    ("POST", "/login", login, "login"),
    ("POST", "/logout", logout, "logout"),
    ("GET", "/static/{file}", static, "status_static"),
)


def setup_status_page(app: web.Application, session_ttl_s: float) -> None:
    """The page's routes (GET /admin/overview is in routes.ROUTES with the rest of the admin API)."""
    app[SESSIONS] = Sessions(session_ttl_s)
    for method, path, handler, name in BROWSER_ROUTES:
        app.router.add_route(method, path, handler, name=name)
