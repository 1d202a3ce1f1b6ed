"""A small Chrome DevTools Protocol client: Debian's chromium, headless, driven over its websocket.

Enough for the status page tests: open a tab, navigate, evaluate, collect console errors and network
sizes, take screenshots. No third-party browser driver.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

Event = dict[str, Any]


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class CdpError(RuntimeError):
    pass


class Tab:
    """One page target, attached with a flat session: commands and its events."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.session: str | None = None
        self._next = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[Event] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self.events.append(data)
                self._changed.set()

    async def send(self, method: str, params: dict[str, Any] | None = None, *, browser: bool = False) -> Any:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if self.session and not browser:
            message["sessionId"] = self.session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next] = future
        await self.ws.send_str(json.dumps(message))
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def wait_event(self, method: str, since: int = 0, timeout: float = 15.0) -> Event:
        """The first ``method`` event at index >= since."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events[since:]:
                if event.get("method") == method:
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {method} event in {timeout}s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def navigate(self, url: str) -> None:
        mark = len(self.events)
        await self.send("Page.navigate", {"url": url})
        await self.wait_event("Page.loadEventFired", since=mark)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in result:
            raise CdpError(f"evaluate failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0, interval: float = 0.2) -> Any:
        """Poll a page expression until it is truthy."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = await self.evaluate(expression)
            if last:
                return last
            await asyncio.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {expression!r} (last: {last!r})")

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(shot["data"]))

    def console_errors(self) -> list[str]:
        """Uncaught exceptions, console.error calls and browser log errors (CSP violations among them)."""
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                errors.append(json.dumps(params.get("args", []))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                errors.append(params["entry"].get("text", "")[:500])
        return errors

    def transferred(self, since: int = 0) -> dict[str, int]:
        """Bytes on the wire per URL for the requests finished since event index ``since``."""
        urls = {}
        sizes: dict[str, int] = {}
        for event in self.events[since:]:
            params = event.get("params", {})
            if event.get("method") == "Network.requestWillBeSent":
                urls[params["requestId"]] = params["request"]["url"]
            elif event.get("method") == "Network.loadingFinished":
                url = urls.get(params["requestId"], params["requestId"])
                sizes[url] = sizes.get(url, 0) + int(params.get("encodedDataLength", 0))
        return sizes

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def chromium(width: int = 1280, height: int = 900) -> AsyncIterator[Tab]:
    """Headless chromium with a private profile; yields one attached tab with Page, Runtime, Log and Network
    events on."""
    binary = chromium_binary()
    if binary is None:
        raise RuntimeError("chromium is not installed: run scripts/test.sh, which installs it")
    profile = Path(tempfile.mkdtemp(prefix="ishgw-chromium-"))
    proc = subprocess.Popen(
        [
            binary,
            "--headless=new",
            "--no-sandbox",  # root in the test container; the profile is private and the pages are ours
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    session = aiohttp.ClientSession()
    tab: Tab | None = None
    try:
        port_file = profile / "DevToolsActivePort"
        endpoint = await _wait(lambda: port_file.is_file() and port_file.read_text().split("\n"), 20)
        url = f"ws://127.0.0.1:{endpoint[0]}{endpoint[1]}"
        ws = await session.ws_connect(url, max_msg_size=64 * 1024 * 1024)
        tab = Tab(ws)
        target = await tab.send("Target.createTarget", {"url": "about:blank"})
        attached = await tab.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        tab.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            await tab.send(f"{domain}.enable")
        await tab.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        yield tab
    finally:
        if tab is not None:
            await tab.close()
        await session.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(profile, ignore_errors=True)


async def _wait(predicate: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value and len(value) >= 2 and value[1]:
            return value
        await asyncio.sleep(0.05)
    raise TimeoutError("chromium did not open its DevTools port")
