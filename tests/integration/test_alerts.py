"""Alerts from the controller, end to end: a real gateway, a local aiohttp webhook receiver (which fails its
first delivery, so the retry is exercised) and a local SMTP server (aiosmtpd). Kill an instance: one alert;
bring it back: one recovery."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from email import message_from_bytes
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.backends.stub_llm import StubServer
from tests.integration.conftest import start_stub
from tests.integration.gateway import Gateway, wait_for
from tests.integration.test_health_chaos import register
from tests.ports import free_port


class WebhookReceiver:
    """An aiohttp server in its own thread; answers 500 to the first ``fail_first`` posts."""

    def __init__(self, fail_first: int = 1) -> None:
        self.port = free_port()
        self.fail_first = fail_first
        self.posts = 0
        self.received: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        self.posts += 1
        if self.posts <= self.fail_first:
            return web.Response(status=500, text="not now")
        self.received.append(await request.json())
        return web.Response(text="ok")

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], str, str]] = []  # recipients, subject, body

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        message = message_from_bytes(envelope.content)
        body = message.get_payload(decode=True)
        assert isinstance(body, bytes)
        self.messages.append((list(envelope.rcpt_tos), str(message["Subject"]), body.decode()))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield mailbox, controller.port
    finally:
        controller.stop()


def events(alerts: list[dict[str, Any]], event: str, subject: str) -> list[str]:
    return [a["state"] for a in alerts if a["event"] == event and a["subject"] == subject]


def test_kill_one_alert_recover_one_notice(stubs: dict[str, StubServer], smtp: tuple[Mailbox, int]) -> None:
    mailbox, smtp_port = smtp
    with WebhookReceiver(fail_first=1) as hook:
        env = {
            "ISHGW_ALERT_WEBHOOK_URLS": hook.url,
            "ISHGW_ALERT_SMTP_HOST": "127.0.0.1",
            "ISHGW_ALERT_SMTP_PORT": str(smtp_port),
            "ISHGW_ALERT_SMTP_STARTTLS": "false",
            "ISHGW_ALERT_EMAIL_TO": "ops@example.com",
            "ISHGW_ALERT_INTERVAL_S": "0.2",
        }
        with Gateway(extra_env=env) as gw:
            n0, n1 = start_stub(stubs, "n0"), start_stub(stubs, "n1")
            register(gw, "n0", n0)
            register(gw, "n1", n1)
            gw.wait_applied()

            def state(name: str) -> str:
                return str(gw.admin.get(f"/admin/instances/{name}/state").json()["health_status"])

            wait_for(lambda: state("n0") == "healthy", what="n0 healthy")
            n0.kill()
            wait_for(
                lambda: events(hook.received, "instance_down", "n0") == ["firing"], timeout=15, what="alert"
            )
            n0.restart()
            wait_for(
                lambda: events(hook.received, "instance_down", "n0") == ["firing", "resolved"],
                timeout=15,
                what="recovery notice",
            )
            wait_for(lambda: len(mailbox.messages) >= 2, timeout=15, what="two e-mails")

            def all_sent() -> dict[str, Any] | None:
                # The receiver has a message a moment before the controller notes the delivery as sent.
                answer: dict[str, Any] = gw.admin.get("/admin/alerts").json()
                states = {s for a in answer["alerts"] for s in a["deliveries"].values()}
                return answer if states == {"sent"} else None

            listed = wait_for(all_sent, timeout=15, what="every delivery noted as sent")
            bad_limit = gw.admin.get("/admin/alerts", params={"limit": "0"})

    # One alert and one recovery for the incident, on both channels; the first post failed and was retried.
    assert events(hook.received, "instance_down", "n0") == ["firing", "resolved"]
    assert hook.posts == len(hook.received) + 1
    firing = next(a for a in hook.received if a["state"] == "firing")
    assert firing["text"].startswith("[ISH Gateway] FIRING instance_down: instance n0 is down")
    assert all(a["subject"] != "n1" for a in hook.received)  # the healthy instance raised nothing
    subjects = [subject for _, subject, _ in mailbox.messages]
    assert subjects == [a["text"] for a in hook.received]
    assert all(rcpt == ["ops@example.com"] for rcpt, _, _ in mailbox.messages)
    # GET /admin/alerts: newest first, delivered to both receivers, nothing open any more.
    assert events(listed["alerts"], "instance_down", "n0") == ["resolved", "firing"]
    assert listed["open"] == []
    assert listed["receivers"] == ["webhook 1 (127.0.0.1)", "e-mail (1 recipients)"]
    for alert in listed["alerts"]:
        assert set(alert["deliveries"].values()) == {"sent"}, alert
    assert bad_limit.status_code == 422
    assert "limit" in json.dumps(bad_limit.json())
