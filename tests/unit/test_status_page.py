"""Status page: the session rules, the traffic rings, the page model, and who may read what (aiohttp app
with the real middlewares and handlers; the page's data handler replaced by a stand-in)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from control_plane.api.app_keys import ADMIN_KEY, SETTINGS
from control_plane.api.auth import AUTH_THROTTLE, AuthThrottle
from control_plane.api.middleware import MIDDLEWARES
from control_plane.api.sessions import (
    COOKIE,
    SESSIONS,
    Sessions,
    cookie_may_authorize,
    same_origin,
    set_session_cookie,
)
from control_plane.api.status_page import CSP, login, login_form, logout, render_login, render_page, static
from control_plane.health.logstream import Attempt, LogRecord
from control_plane.health.recent import BOUNDS, MINUTES, SPARSE_MAX, RecentTraffic, Series, percentile
from control_plane.registry.models import BreakerState, HealthStatus, InstanceState
from control_plane.settings import Settings
from control_plane.status import model

ADMIN = "admin-key-for-tests-0123456789"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- sessions --------------------------------------------------------------------------------------------


def test_session_lives_until_its_expiry_and_not_after() -> None:
    clock = Clock()
    sessions = Sessions(ttl_s=60, clock=clock)
    token = sessions.create()
    assert sessions.valid(token)
    clock.now += 59.9
    assert sessions.valid(token)
    clock.now += 0.1
    assert not sessions.valid(token)
    assert len(sessions) == 0  # an expired session is forgotten


def test_session_end_and_unknown_tokens() -> None:
    sessions = Sessions(ttl_s=60)
    token = sessions.create()
    assert not sessions.valid(None) and not sessions.valid("") and not sessions.valid(token + "x")
    sessions.end(token)
    assert not sessions.valid(token)
    sessions.end(None)  # harmless


def test_session_table_is_bounded_and_holds_no_token() -> None:
    clock = Clock()
    sessions = Sessions(ttl_s=60, max_sessions=3, clock=clock)
    tokens = []
    for _ in range(5):
        tokens.append(sessions.create())
        clock.now += 1
    assert len(sessions) == 3
    assert [sessions.valid(t) for t in tokens] == [False, False, True, True, True]  # oldest expiry first
    assert not any(t in repr(vars(sessions)) for t in tokens)  # kept by digest only


@pytest.mark.parametrize(
    ("method", "route", "allowed"),
    [
        ("GET", "/", True),
        ("HEAD", "/", True),
        ("get", "/admin/overview", True),
        ("GET", "/admin/status", False),
        ("GET", "/admin/instances", False),
        ("GET", "/admin/keys", False),
        ("GET", "/admin/config/export", False),
        ("POST", "/", False),
        ("POST", "/admin/overview", False),
        ("POST", "/admin/reload", False),
        ("PUT", "/admin/instances/{name}/state", False),
        ("DELETE", "/admin/instances/{name}", False),
        ("GET", None, False),
    ],
)
def test_cookie_only_reads_the_page_and_its_json(method: str, route: str | None, allowed: bool) -> None:
    assert cookie_may_authorize(method, route) is allowed


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({}, True),  # curl: no Origin
        ({"Origin": "http://127.0.0.1:9000"}, True),
        ({"Origin": "http://127.0.0.1:9000", "Sec-Fetch-Site": "same-origin"}, True),
        ({"Origin": "http://127.0.0.1:9001"}, False),
        ({"Origin": "https://evil.example"}, False),
        ({"Origin": "null"}, False),
        ({"Sec-Fetch-Site": "cross-site"}, False),
        ({"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:9000"}, False),
    ],
)
def test_same_origin(headers: dict[str, str], allowed: bool) -> None:
    assert same_origin(headers, "127.0.0.1:9000") is allowed


@pytest.mark.parametrize("secure", [False, True])
def test_cookie_flags(secure: bool) -> None:
    response = web.Response()
    set_session_cookie(response, "tok", 3600, secure)
    header = response.cookies[COOKIE].OutputString()
    assert "HttpOnly" in header and "SameSite=Strict" in header and "Max-Age=3600" in header
    assert "Path=/" in header
    assert ("Secure" in header) is secure


# -- traffic rings ---------------------------------------------------------------------------------------


def test_percentiles_from_the_histogram() -> None:
    series = Series()
    for ms in [10.0] * 90 + [1000.0] * 10:
        series.add(100, ms, False)
    point = series.points(100)[-1]
    assert point.requests == 100
    assert point.p50_ms is not None and 10.0 <= point.p50_ms < 12.5  # at most 25 % high
    assert point.p95_ms is not None and 1000.0 <= point.p95_ms < 1250.0
    assert percentile([0] * (len(BOUNDS) + 1), 0, 0.5) is None
    slow = Series()
    slow.add(1, 10_000_000.0, True)  # beyond the last bound: read as the last bound
    assert slow.points(1)[-1].p95_ms == BOUNDS[-1]


@pytest.mark.parametrize("requests", [1, 2, SPARSE_MAX - 1, SPARSE_MAX, SPARSE_MAX + 1, 3 * SPARSE_MAX])
def test_a_minute_of_few_requests_reads_as_one_of_many(requests: int) -> None:
    """A minute keeps bucket numbers while sparse and counts past SPARSE_MAX: both read the same."""
    latencies = [0.5 + (i * 37 % 101) ** 2 for i in range(requests)]  # spread over many buckets
    series = Series()
    for ms in latencies:
        series.add(7, ms, False)
    counts = [0] * (len(BOUNDS) + 1)
    for ms in latencies:
        counts[sum(bound < ms for bound in BOUNDS)] += 1
    point = series.points(7)[-1]
    assert point.requests == requests
    assert point.p50_ms == percentile(counts, requests, 0.50)
    assert point.p95_ms == percentile(counts, requests, 0.95)
    assert series.summary(7) == (requests, point.p50_ms, point.p95_ms)
    slot = series.slots[7 % MINUTES]
    assert slot is not None and slot.buckets.typecode == ("B" if requests <= SPARSE_MAX else "I")


def test_ring_keeps_fifteen_minutes_and_drops_late_records() -> None:
    series = Series()
    series.add(100, 5.0, False)
    series.add(100 + MINUTES, 5.0, True)  # the same slot, fifteen minutes on: replaces minute 100
    points = series.points(100 + MINUTES)
    assert len(points) == MINUTES
    assert [p.requests for p in points] == [0] * (MINUTES - 1) + [1]
    assert points[-1].errors == 1
    series.add(100, 5.0, False)  # a datagram older than the ring: dropped
    assert series.points(100 + MINUTES)[-1].requests == 1
    assert all(p.p50_ms is None for p in points[:-1])


def test_rate_counts_the_last_sixty_seconds() -> None:
    series = Series()
    for _ in range(60):
        series.add(10, 1.0, False)  # minute 10: 600-659 s
    for _ in range(30):
        series.add(11, 1.0, False)
    assert series.rate(660.0) == pytest.approx((30 + 60) / 60)
    assert series.rate(690.0) == pytest.approx((30 + 30) / 60)  # half of minute 10 still inside
    assert series.rate(60 * 13.0) == 0.0


def record(pool: str, at: float, *attempts: tuple[str, int | None, float], status: int = 200) -> LogRecord:
    return LogRecord(
        at=at,
        request_id="r",
        pool=pool,
        model="m",
        status=status,
        request_ms=sum(a[2] for a in attempts),
        attempts=tuple(Attempt(*a) for a in attempts),
        retry_after="",
        retry_after_ms="",
    )


def test_recent_traffic_per_pool_and_instance() -> None:
    recent = RecentTraffic()
    addresses = {"10.0.0.1:80": "a", "10.0.0.2:80": "b"}
    recent.observe(record("p1", 6000.0, ("10.0.0.1:80", 502, 3.0), ("10.0.0.2:80", 200, 40.0)), addresses)
    recent.observe(record("p1", 6001.0, ("10.0.0.2:80", 200, 50.0)), addresses)
    recent.observe(record("p2", 6001.0, ("10.0.0.9:80", 200, 5.0)), addresses)  # an unknown address
    recent.observe(record("", 6001.0), addresses)  # not proxied
    pool = recent.pool("p1")
    assert pool is not None and pool.points(100)[-1].requests == 2
    a, b = recent.instance("p1", "a"), recent.instance("p1", "b")
    assert a is not None and a.points(100)[-1].errors == 1
    assert b is not None and b.points(100)[-1].requests == 2
    assert recent.instance("p2", "b") is None  # per pool: b served nothing in p2
    assert set(recent.pools) == {"p1", "p2"}


def test_recent_traffic_is_bounded() -> None:
    recent = RecentTraffic(max_series=4)
    for minute in range(10):
        recent.observe(record(f"p{minute}", minute * 60.0, ("x", 200, 1.0)), {"x": "i"})
    assert len(recent.pools) + len(recent.instances) <= 4
    assert "p9" in recent.pools  # the newest stays


# -- the page model --------------------------------------------------------------------------------------


def state(health: HealthStatus = HealthStatus.HEALTHY, **kw: Any) -> InstanceState:
    return InstanceState(health_status=health, **kw)


def inputs(**kw: Any) -> model.Inputs:
    recent = RecentTraffic()
    now = 6030.0
    recent.observe(record("p_m", now - 5, ("a:1", 200, 20.0)), {"a:1": "a"})
    status = {
        "pools": [
            {
                "name": "p_m",
                "model": "m",
                "family": "openai",
                "kind": "chat",
                "strategy": "weighted",
                "instances": ["a"],
                "backup": ["c"],
                "excluded": {"b": "unhealthy since 2026-11-30T12:00:00+00:00"},
            },
            {
                "name": "p_x",
                "model": "x",
                "family": "openai",
                "kind": "chat",
                "strategy": "weighted",
                "instances": [],
                "backup": [],
                "excluded": {"b": "breaker open (5 consecutive failures)"},
            },
        ],
        "reloads": 3,
        "reload_failures": 1,
        "last_reload": {"ok": False},
    }
    base: dict[str, Any] = {
        "status": status,
        "states": {
            "a": state(),
            "b": state(HealthStatus.UNHEALTHY, breaker_state=BreakerState.OPEN),
            "c": state(),
        },
        "enabled": {"a": True, "b": True, "c": True},
        "breaker_reasons": {"b": "5 consecutive failures"},
        "recent": recent,
        "now": now,
        "reloads": [
            {"at": "2026-11-30T12:00:00+00:00", "ok": True, "changed": True, "generation": 1},
            {
                "at": "2026-11-30T12:01:00+00:00",
                "ok": False,
                "changed": True,
                "generation": 2,
                "error": "bad",
            },
        ],
    }
    base.update(kw)
    return model.Inputs(**base)


def test_model_shows_every_instance_and_why_it_is_out() -> None:
    page = model.build(inputs())
    first = page["pools"][0]
    rows = {row["name"]: row for row in first["instances"]}
    assert [(r["name"], r["role"]) for r in first["instances"]] == [
        ("a", "primary"),
        ("c", "backup"),
        ("b", "out"),
    ]
    assert rows["b"]["reason"].startswith("unhealthy since")
    assert rows["b"]["breaker"] == "open" and rows["b"]["breaker_reason"] == "5 consecutive failures"
    assert rows["a"]["requests"] == 1 and rows["a"]["spark"] is not None and rows["c"]["spark"] is None
    assert page["pools"][1]["available"] is False
    assert page["summary"] == {
        "pools": 2,
        "pools_down": 1,
        "instances": 3,
        "instances_out": 1,
        "rps": page["summary"]["rps"],
        "reloads": 3,
        "reload_failures": 1,
        "last_reload_ok": False,
    }
    assert [r["generation"] for r in page["reloads"]] == [2, 1]  # newest first
    assert page["alerts"] is None and page["usage_today"] is None
    assert page["generated_at"] == datetime.fromtimestamp(6030, UTC).isoformat(timespec="seconds")


def test_model_usage_and_alerts() -> None:
    usage = {
        "requests": 4,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "cost_usd": 0.123456,
    }
    page = model.build(
        inputs(usage_today=usage, alerts=[{"at": "t", "subject": "instance b down", "state": "firing"}])
    )
    assert page["usage_today"] == {**usage, "cost_usd": 0.1235}
    assert page["alerts"] == [{"at": "t", "subject": "instance b down", "state": "firing"}]
    html = render_page(page)
    assert '<li class="firing">t instance b down</li>' in html and "$0.1235" in html
    assert "This controller keeps no alerts" in render_page(model.build(inputs()))
    assert "No alert." in render_page(model.build(inputs(alerts=[])))
    assert model.build(inputs(usage_today={"requests": 0}))["usage_today"] is None


def test_model_scaling_groups() -> None:
    evil = "<img src=x onerror=alert(1)>"
    group = {
        "name": "llama",
        "models": ["llama3"],
        "current": 1,
        "desired": 2,
        "min": 1,
        "max": 4,
        "starting": 1,
        "busy": True,
        "evaluation": "utilisation 0.9 > 0.8 for 60 s",
        "events": [
            {
                "at": "2026-11-30T12:00:00Z",
                "group": "llama",
                "direction": "out",
                "from": 1,
                "to": 2,
                "outcome": "failed",
                "error": evil,
                "reason": "utilisation 0.9 > 0.8 for 60 s",
            },
            {
                "at": "2026-11-30T11:00:00Z",
                "group": "llama",
                "direction": "adopt",
                "outcome": "ok",
                "instance": "llama-1",
            },
        ],
    }
    page = model.build(inputs(scaling=[group]))
    (view,) = page["scaling"]
    assert (view["current"], view["desired"], view["starting"]) == (1, 2, 1)
    assert view["events"][0] == {
        "at": "2026-11-30T12:00:00Z",
        "direction": "out",
        "counts": "1 \u2192 2",
        "instance": None,
        "outcome": "failed",
        "why": evil,  # the error, before the reason
        "duration_s": None,
    }
    assert view["events"][1]["counts"] == "" and view["events"][1]["instance"] == "llama-1"
    html = render_page(page)
    assert 'data-group="llama"' in html and "1/2 serving/desired" in html and "1 starting" in html
    assert "2026-11-30 12:00:00" in html and "utilisation 0.9 &gt; 0.8 for 60 s" in html
    assert evil not in html and "&lt;img" in html
    assert "No scaling group" in render_page(model.build(inputs(scaling=[])))
    without = model.build(inputs())
    assert without["scaling"] is None and 'id="scaling"' not in render_page(without)


def test_spark_path() -> None:
    assert model.spark_path([None, None], 10.0) == ""
    assert model.spark_path([1.0, 2.0], 0.0) == ""
    path = model.spark_path([10.0, None, 5.0, 10.0], 10.0)
    assert path.startswith("M0.0,1.0 h-3 M80.0,")  # a lone minute is a dash; a gap breaks the line
    assert "L120.0,1.0" in path


def test_rendered_page_escapes_everything_and_has_no_inline_code() -> None:
    evil = '<script>alert(1)</script>"'
    page = model.build(inputs(reloads=[{"at": "t", "ok": False, "changed": True, "error": evil}]))
    page["pools"][0]["instances"][2]["reason"] = evil
    html = render_page(page)
    assert evil not in html and "&lt;script&gt;" in html
    assert "<script>" not in html.replace('<script src="/static/status.js" defer></script>', "")
    assert "style=" not in html and "<style" not in html and "on" + "click" not in html
    assert "http://" not in html and "https://" not in html  # nothing from elsewhere
    assert 'tr class="out" data-instance="b"' in html
    login_html = render_login('wrong "key"')
    assert "wrong &#34;key&#34;" in login_html and "<script" not in login_html


# -- who may read what -----------------------------------------------------------------------------------


async def fake_page(_request: web.Request) -> web.Response:
    return web.Response(text="page", content_type="text/html")


async def fake_overview(_request: web.Request) -> web.Response:
    return web.json_response({"pools": []})


async def fake_change(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@pytest.fixture
async def client(aiohttp_client: Any) -> Any:
    clock = Clock()
    app = web.Application(middlewares=MIDDLEWARES)
    app[SETTINGS] = Settings()
    app[ADMIN_KEY] = ADMIN
    app[AUTH_THROTTLE] = AuthThrottle(limit=3, clock=clock)
    app[SESSIONS] = Sessions(ttl_s=600, clock=clock)
    app.router.add_get("/", fake_page)
    app.router.add_get("/admin/overview", fake_overview)
    app.router.add_get("/admin/status", fake_overview)
    app.router.add_post("/admin/reload", fake_change)
    app.router.add_put("/admin/instances/{name}/state", fake_change)
    app.router.add_route("GET", "/login", login_form)
    app.router.add_route("POST", "/login", login)
    app.router.add_route("POST", "/logout", logout)
    app.router.add_route("GET", "/static/{file}", static)
    test_client = await aiohttp_client(app)
    test_client.clock = clock
    return test_client


async def log_in(client: Any, key: str = ADMIN, **headers: str) -> Any:
    return await client.post("/login", data={"key": key}, headers=headers, allow_redirects=False)


async def test_anonymous_browser_goes_to_the_login_form(client: Any) -> None:
    r = await client.get("/", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/login"
    r = await client.get("/admin/overview")
    assert r.status == 401 and (await r.json())["error"] == "unauthorized"
    r = await client.get("/login")
    assert r.status == 200 and r.headers["Content-Security-Policy"] == CSP
    assert 'name="key"' in await r.text()
    for name, ctype in (("status.js", "text/javascript"), ("status.css", "text/css")):
        r = await client.get(f"/static/{name}")
        assert r.status == 200 and r.content_type == ctype
    r = await client.get("/static/../app.py")
    assert r.status == 404


async def test_login_sets_a_session_that_only_reads(client: Any) -> None:
    r = await log_in(client, Origin=str(client.make_url("")).rstrip("/"))
    assert r.status == 303 and r.headers["Location"] == "/"
    cookie = r.cookies[COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and not cookie["secure"]
    assert (await client.get("/")).status == 200
    assert (await client.get("/admin/overview")).status == 200
    # The cookie never authorizes anything else: no change, no other read.
    assert (await client.post("/admin/reload")).status == 401
    assert (await client.put("/admin/instances/a/state", json={"status": "inactive"})).status == 401
    assert (await client.get("/admin/status")).status == 401
    # The admin key in a header still works as before, cookie or not.
    assert (await client.post("/admin/reload", headers={"X-Admin-API-Key": ADMIN})).status == 200


async def test_wrong_key_is_refused_and_throttled(client: Any) -> None:
    for _ in range(3):
        r = await log_in(client, "not-the-key")
        assert r.status == 401 and COOKIE not in r.cookies
        assert "not the admin key" in await r.text()
    r = await log_in(client, "not-the-key")
    assert r.status == 429
    assert (await log_in(client)).status == 303  # the right key always passes


async def test_login_refuses_other_origins_and_other_bodies(client: Any) -> None:
    r = await log_in(client, Origin="https://evil.example")
    assert r.status == 403 and (await r.json())["error"] == "forbidden" and COOKIE not in r.cookies
    r = await client.post("/login", json={"key": ADMIN}, allow_redirects=False)
    assert r.status == 415 and (await r.json())["error"] == "unsupported_media_type"
    r = await client.post("/login", data={"other": "x"}, allow_redirects=False)
    assert r.status == 422 and (await r.json())["detail"] == [
        {"field": "key", "message": "the admin key is required"}
    ]
    r = await client.post("/logout", headers={"Origin": "https://evil.example"}, allow_redirects=False)
    assert r.status == 403


async def test_logout_ends_the_session_on_the_server(client: Any) -> None:
    r = await log_in(client)
    token = r.cookies[COOKIE].value
    r = await client.post("/logout", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/login"
    replay = {"Cookie": f"{COOKIE}={token}"}  # a copy of the old cookie is worth nothing
    assert (await client.get("/admin/overview", headers=replay)).status == 401


async def test_session_expires(client: Any) -> None:
    await log_in(client)
    assert (await client.get("/admin/overview")).status == 200
    client.clock.now += 601
    assert (await client.get("/admin/overview")).status == 401
    r = await client.get("/", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/login"
