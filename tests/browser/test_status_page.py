"""The status page in headless Chromium against a real gateway: kill an instance, see it out with its
reason (by the page's own polling, and with JavaScript off), bring it back, no console errors (CSP
violations included), the page's weight and first paint measured (printed: run with -s)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.browser import status_scenario
from tests.browser.cdp import chromium_binary

pytestmark = pytest.mark.integration

# A bound, not a speed goal: the page, its script and its style sheet together. A web font, a framework
# or a CDN copy would blow it.
MAX_PAGE_BYTES = 100_000


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    if chromium_binary() is None or shutil.which("nginx") is None:
        pytest.fail("chromium and nginx are needed: run scripts/test.sh, which installs them")


async def test_kill_and_recover_in_the_browser(tmp_path: Path) -> None:
    out, back = tmp_path / "out.png", tmp_path / "recovered.png"
    figures = await status_scenario.run(out, back)
    print("\n[status page] " + json.dumps(figures))
    assert "unhealthy" in figures["reason"] or "breaker" in figures["reason"]
    assert figures["reason_without_js"]
    assert figures["console_errors"] == []
    assert figures["cookie"] == {"httpOnly": True, "sameSite": "Strict", "secure": False}
    load = figures["first_load"]
    assert load["requests"] == 3, load["by_url"]  # the page, status.js, status.css: nothing else
    assert 0 < load["bytes"] < MAX_PAGE_BYTES
    assert load["first_contentful_paint_ms"] > 0
    for png in (out, back):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
