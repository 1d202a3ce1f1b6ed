"""The status page's login against the real controller over admin HTTPS: the cookie is Secure there, reads
the page and its JSON, and authorizes nothing else; the admin key still works; logout ends the session."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.integration.gateway import admin_tls_gateway


def test_login_over_admin_tls_sets_a_secure_cookie_that_only_reads(tmp_path: Path) -> None:
    gw = admin_tls_gateway(tmp_path)
    base = str(gw.admin.base_url).rstrip("/")
    with gw, httpx.Client(base_url=base, verify=False, follow_redirects=False) as browser:
        assert browser.get("/").headers["location"] == "/login"
        wrong = browser.post("/login", data={"key": "not-it"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        audit = gw.admin.get("/admin/audit").json()["entries"]
        assert any(e["path"] == "/login" and e["actor"] == "unauthenticated" for e in audit)

        answer = browser.post("/login", data={"key": gw.admin_key}, headers={"Origin": base})
        assert answer.status_code == 303
        cookie = answer.headers["set-cookie"]
        assert all(flag in cookie for flag in ("HttpOnly", "SameSite=Strict", "Secure", "Path=/"))
        page = browser.get("/")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        assert "<h1>ISH Gateway</h1>" in page.text
        overview = browser.get("/admin/overview")
        assert overview.status_code == 200 and {"pools", "summary", "reloads"} <= set(overview.json())
        before = gw.status()["reloads"]
        assert browser.post("/admin/reload").status_code == 401
        assert browser.get("/admin/instances").status_code == 401
        assert browser.get("/admin/config/export").status_code == 401
        assert gw.status()["reloads"] == before

        assert browser.post("/logout", headers={"Origin": base}).status_code == 303
        assert browser.get("/admin/overview").status_code == 401
