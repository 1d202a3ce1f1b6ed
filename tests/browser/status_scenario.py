"""The status page in a real browser: a real gateway (controller + nginx) with three stand-in instances and
a paced trickle of traffic; log in through the form, kill one instance, watch the page show it out with
its reason, look at it with JavaScript off, measure weight and first paint, bring the instance back.

Used by tests/browser/test_status_page.py and by scripts/status-page-screenshot.sh (the README's PNG):

    python -m tests.browser.status_scenario --out docs/status-page.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.backends.stub_llm import StubServer
from tests.browser.cdp import Tab, chromium
from tests.integration.gateway import Gateway, wait_for

MODELS = ("llama3.1:8b", "qwen2.5:7b")
FAST = {
    "probe_interval_s": 1.0,
    "probe_timeout_s": 1.0,
    "rise": 2,
    "fall": 3,
    "breaker_cooldown_s": 3.0,
    "breaker_min_requests": 20,
    "breaker_consecutive_failures": 3,
}
KILLED = "gpu-b"


class Trickle:
    """One thread sending a chat request every ``every_s`` (bounded in count and time)."""

    def __init__(
        self, url: str, every_s: float = 0.05, seconds: float = 150.0, max_requests: int = 3000
    ) -> None:
        self.url, self.every_s, self.seconds, self.max_requests = url, every_s, seconds, max_requests
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set() and time.monotonic() < deadline and self.sent < self.max_requests:
                model = MODELS[self.sent % len(MODELS)]
                # Every fourth pair of requests by Ollama's API: both families' pools get traffic.
                path = "/api/chat" if self.sent % 8 >= 6 else "/v1/chat/completions"
                with contextlib.suppress(httpx.HTTPError):
                    client.post(path, json={"model": model, "messages": [], "stream": False})
                self.sent += 1
                self._stop.wait(self.every_s)

    def __enter__(self) -> Trickle:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(20)


def excluded(gw: Gateway, name: str) -> bool:
    return any(name in pool["excluded"] for pool in gw.status()["pools"])


def healthy(gw: Gateway, name: str) -> bool:
    return bool(gw.admin.get(f"/admin/instances/{name}/state").json()["health_status"] == "healthy")


ROW = "document.querySelector('tr[data-instance=\"{name}\"]')"
OUT_REASON = (
    "(() => {{ const r = document.querySelector('tr.out[data-instance=\"{name}\"] td.reason');"
    " return r && r.textContent.trim(); }})()"
)
IN_POOL = "document.querySelectorAll('tr.primary[data-instance=\"{name}\"]').length"


async def login(tab: Tab, admin: str, key: str) -> dict[str, Any]:
    await tab.navigate(f"{admin}/")
    assert await tab.evaluate("location.pathname") == "/login", "an anonymous browser goes to the login form"
    mark = len(tab.events)
    await tab.evaluate(
        f"document.getElementById('key').value = {json.dumps(key)}; document.querySelector('form').submit()"
    )
    await tab.wait_event("Page.loadEventFired", since=mark)
    where = await tab.evaluate("location.pathname + ' ' + document.body.innerText.slice(0, 200)")
    assert where.startswith("/ "), f"after the login the page itself, not {where!r}"
    cookies = (await tab.send("Network.getCookies", {"urls": [f"{admin}/"]}))["cookies"]
    session = next(c for c in cookies if c["name"] == "ishgw_session")
    return session  # type: ignore[no-any-return]


async def first_load(tab: Tab, admin: str) -> dict[str, Any]:
    """A cold load of the page (cache off): bytes on the wire and the paint timings."""
    await tab.send("Network.setCacheDisabled", {"cacheDisabled": True})
    mark = len(tab.events)
    await tab.navigate(f"{admin}/")
    await asyncio.sleep(0)  # let the last loadingFinished events in
    sizes = tab.transferred(mark)
    paints = await tab.wait_for(  # paint entries may land just after the load event
        "(() => { const p = Object.fromEntries(performance.getEntriesByType('paint').map(e => [e.name,"
        " e.startTime])); return p['first-contentful-paint'] !== undefined && p; })()",
        timeout=10,
    )
    nav = await tab.evaluate(
        "(() => { const n = performance.getEntriesByType('navigation')[0];"
        " return {response_start_ms: n.responseStart, response_end_ms: n.responseEnd,"
        " dom_content_loaded_ms: n.domContentLoadedEventEnd, load_ms: n.loadEventEnd}; })()"
    )
    await tab.send("Network.setCacheDisabled", {"cacheDisabled": False})
    return {
        "requests": len(sizes),
        "bytes": sum(sizes.values()),
        "by_url": sizes,
        "first_paint_ms": round(paints.get("first-paint", -1), 1),
        "first_contentful_paint_ms": round(paints.get("first-contentful-paint", -1), 1),
        **{k: round(v, 1) for k, v in nav.items()},
    }


async def without_javascript(tab: Tab, admin: str, name: str) -> str:
    """The server-rendered page alone shows the instance out, with its reason."""
    await tab.send("Emulation.setScriptExecutionDisabled", {"value": True})
    try:
        await tab.navigate(f"{admin}/")
        reason = await tab.evaluate(OUT_REASON.format(name=name))
        live = await tab.evaluate("document.getElementById('live').textContent")
    finally:
        await tab.send("Emulation.setScriptExecutionDisabled", {"value": False})
    assert "reload the page" in live, f"with JavaScript off the page says it does not refresh: {live!r}"
    return str(reason or "")


async def run(
    out: Path | None = None, recovered_out: Path | None = None, warmup_s: float = 0.0
) -> dict[str, Any]:
    """The whole scenario; returns what it measured. Raises AssertionError when the page is wrong.
    ``warmup_s``: minutes of traffic before the kill, so the sparklines have a history to draw (the
    README's picture)."""
    figures: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        stubs = {
            n: stack.enter_context(StubServer(name=n, models=list(MODELS)))
            for n in ("gpu-a", KILLED, "gpu-c")
        }
        gw = stack.enter_context(Gateway(extra_env={"ISHGW_STATUS_REFRESH_S": "1"}))
        for name, stub in stubs.items():
            response = gw.add_instance(
                name=name,
                provider_type="ollama",
                api_base=stub.url,
                supported_models=list(MODELS),
                health=FAST,
            )
            assert response.status_code == 201, response.text
        gw.wait_applied()
        for name in stubs:
            wait_for(lambda n=name: healthy(gw, n), timeout=15, what=f"{name} healthy")  # type: ignore[misc]
        admin = f"http://127.0.0.1:{gw.admin_port}"
        stack.enter_context(Trickle(gw.url, seconds=150 + warmup_s, max_requests=3000 + int(20 * warmup_s)))
        async with chromium() as tab:
            cookie = await login(tab, admin, gw.admin_key)
            figures["cookie"] = {k: cookie[k] for k in ("httpOnly", "sameSite", "secure")}
            await tab.wait_for(IN_POOL.format(name=KILLED))
            await tab.wait_for("document.querySelectorAll('svg.spark path.p95').length")  # traffic drawn
            await asyncio.sleep(warmup_s)

            stubs[KILLED].kill()
            killed = time.monotonic()
            await asyncio.to_thread(wait_for, lambda: excluded(gw, KILLED), 15, 0.1, f"{KILLED} out")
            reason = await tab.wait_for(OUT_REASON.format(name=KILLED), timeout=10)  # the page's own polling
            figures["out_on_page_after_s"] = round(time.monotonic() - killed, 2)
            figures["reason"] = reason
            assert "unhealthy" in reason or "breaker" in reason, reason
            await asyncio.sleep(2.5)  # a few more refreshes of traffic for the picture
            await tab.screenshot(out or Path(tempfile.gettempdir()) / "ishgw-status-out.png")

            figures["reason_without_js"] = await without_javascript(tab, admin, KILLED)
            assert figures["reason_without_js"] == reason or "unhealthy" in figures["reason_without_js"]
            figures["first_load"] = await first_load(tab, admin)

            stubs[KILLED].restart()
            restarted = time.monotonic()
            await tab.wait_for(IN_POOL.format(name=KILLED), timeout=20)
            figures["back_on_page_after_s"] = round(time.monotonic() - restarted, 2)
            await tab.screenshot(recovered_out or Path(tempfile.gettempdir()) / "ishgw-status-recovered.png")
            figures["console_errors"] = tab.console_errors()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="PNG of the page with one instance out")
    parser.add_argument("--warmup-s", type=float, default=0.0, help="traffic before the kill (sparklines)")
    args = parser.parse_args()
    figures = asyncio.run(run(args.out, warmup_s=args.warmup_s))
    print(json.dumps(figures, indent=2))
    if figures["console_errors"]:
        raise SystemExit("console errors on the page")


if __name__ == "__main__":
    main()
