"""Browser sessions for the status page: the rules (pure) and the server-side session table.

A person logs in with the admin key (compared in constant time) and gets an ``HttpOnly; SameSite=Strict``
cookie (``Secure`` over TLS) naming a random session. The cookie only ever reads: it is accepted for GET
(and HEAD) of the status page and its JSON, and for nothing else; every other admin call still needs the
admin key in a header, which a browser never sends on its own, so no cross-site request can change
anything. Sessions live in the controller's memory (a restart logs everyone out), expire after
ISHGW_ADMIN_SESSION_TTL_S, and are kept by the sha256 of their token: the table never holds a usable
cookie, and looking one up leaks nothing about another by timing.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from aiohttp import web

COOKIE = "ishgw_session"
MAX_SESSIONS = 1000
# (method, canonical route) pairs a session cookie may authorize: the page and its JSON, reading only.
COOKIE_READABLE = frozenset((method, path) for method in ("GET", "HEAD") for path in ("/", "/admin/overview"))


def cookie_may_authorize(method: str, route: str | None) -> bool:
    """True only for reading the status page or its JSON: never for a change, never for other reads."""
    return (method.upper(), route) in COOKIE_READABLE


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "backslashreplace")).hexdigest()


class Sessions:
    """Server-side sessions: token digest -> expiry (unix seconds). Bounded: past MAX_SESSIONS the
    session closest to expiry goes first."""

    def __init__(
        self, ttl_s: float, max_sessions: int = MAX_SESSIONS, clock: Callable[[], float] = time.time
    ) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._expiry: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def create(self) -> str:
        now = self._clock()
        self._expire(now)
        while len(self._expiry) >= self.max_sessions:
            del self._expiry[min(self._expiry, key=self._expiry.__getitem__)]
        token = secrets.token_urlsafe(32)
        self._expiry[_digest(token)] = now + self.ttl_s
        return token

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        digest = _digest(token)
        expiry = self._expiry.get(digest)
        if expiry is None:
            return False
        if self._clock() >= expiry:
            del self._expiry[digest]
            return False
        return True

    def end(self, token: str | None) -> None:
        if token:
            self._expiry.pop(_digest(token), None)

    def _expire(self, now: float) -> None:
        for digest in [d for d, expiry in self._expiry.items() if now >= expiry]:
            del self._expiry[digest]


SESSIONS = web.AppKey("sessions", Sessions)


def set_session_cookie(response: web.StreamResponse, token: str, ttl_s: float, secure: bool) -> None:
    """HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it), Secure over TLS."""
    response.set_cookie(
        COOKIE, token, path="/", max_age=int(ttl_s), httponly=True, samesite="Strict", secure=secure or None
    )


def same_origin(headers: Mapping[str, str], host: str | None) -> bool:
    """A form post from this origin (or from a client that sends no Origin, like curl). A browser sends
    Origin on every POST, and Sec-Fetch-Site when it knows it: another site's form is refused."""
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = headers.get("Origin")
    if origin is None:
        return True
    if origin == "null" or not host:
        return False
    return urlsplit(origin).netloc.lower() == host.lower()
