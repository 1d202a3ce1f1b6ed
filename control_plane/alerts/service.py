"""Alerts from the controller (effects): evaluate the state every interval, send what changed to webhooks and
by e-mail, keep the recent ones for GET /admin/alerts.

Never blocking: evaluation only diffs two snapshots and queues; each delivery runs as its own task, retried
with backoff; a full queue or the rate limit drops an alert (and says so in its record), never waits.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import smtplib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import CollectorRegistry, Counter

from control_plane.alerts.rules import (
    Condition,
    RateLimit,
    StateView,
    Transition,
    backoff,
    conditions,
    transitions,
)
from control_plane.background import running

log = logging.getLogger(__name__)

HISTORY = 200
QUEUE_SIZE = 1000
SEND_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int
    sender: str
    to: tuple[str, ...]
    user: str | None = None
    password: str | None = None
    starttls: bool = False


@dataclass(frozen=True)
class AlertConfig:
    webhooks: tuple[str, ...] = ()
    smtp: SmtpConfig | None = None
    interval_s: float = 1.0
    per_minute: float = 20.0
    burst: int = 10
    retries: int = 5
    retry_base_s: float = 1.0


def webhook_label(index: int, url: str) -> str:
    """How a webhook is named in /admin/alerts: its host only (a Slack URL's path is its secret)."""
    return f"webhook {index + 1} ({urlsplit(url).hostname or '?'})"


@dataclass
class Receiver:
    label: str
    send: Callable[[dict[str, Any]], Any]  # an async callable


@dataclass
class AlertRecord:
    id: int
    at: str
    state: str
    event: str
    subject: str
    text: str
    deliveries: dict[str, str] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        """The webhook body: Slack-compatible `text`, and the fields a program reads."""
        return {
            "text": self.text,
            "state": self.state,
            "event": self.event,
            "subject": self.subject,
            "at": self.at,
            "id": self.id,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.payload(), "deliveries": dict(self.deliveries)}


def email_message(record: AlertRecord, smtp: SmtpConfig) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = " ".join(record.text.split())[:200]  # one line: a reason never becomes a header
    message["From"] = smtp.sender
    message["To"] = ", ".join(smtp.to)
    message.set_content(
        f"{record.text}\n\nevent: {record.event}\nstate: {record.state}\nsubject: {record.subject}\n"
        f"at: {record.at}\n"
    )
    return message


def send_email_blocking(message: EmailMessage, smtp: SmtpConfig) -> None:
    with smtplib.SMTP(smtp.host, smtp.port, timeout=SEND_TIMEOUT_S) as client:
        if smtp.starttls:
            client.starttls()
        if smtp.user and smtp.password:
            client.login(smtp.user, smtp.password)
        client.send_message(message)


class AlertService:
    def __init__(
        self, config: AlertConfig, snapshot: Callable[[], StateView], registry: CollectorRegistry | None
    ) -> None:
        self.config = config
        self.snapshot = snapshot
        self.open: dict[str, Condition] = {}
        self.history: deque[AlertRecord] = deque(maxlen=HISTORY)
        self.limit = RateLimit(config.per_minute, config.burst)
        self._ids = itertools.count(1)
        self._queue: asyncio.Queue[AlertRecord] = asyncio.Queue(QUEUE_SIZE)
        self._deliveries: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.receivers = self._receivers()
        self.counter = (
            Counter(
                "ishgw_alerts_total",
                "alerts the controller raised, by event and state (firing, resolved)",
                ["event", "state"],
                registry=registry,
            )
            if registry is not None
            else None
        )

    def _receivers(self) -> list[Receiver]:
        receivers = [
            Receiver(webhook_label(index, url), self._webhook_sender(url))
            for index, url in enumerate(self.config.webhooks)
        ]
        smtp = self.config.smtp
        if smtp is not None and smtp.to:
            receivers.append(Receiver(f"e-mail ({len(smtp.to)} recipients)", self._email_sender(smtp)))
        return receivers

    def _webhook_sender(self, url: str) -> Callable[[dict[str, Any]], Any]:
        async def send(payload: dict[str, Any]) -> None:
            assert self._session is not None
            async with self._session.post(url, json=payload) as response:
                if response.status >= 300:
                    raise RuntimeError(f"HTTP {response.status}")

        return send

    def _email_sender(self, smtp: SmtpConfig) -> Callable[[dict[str, Any]], Any]:
        async def send(payload: dict[str, Any]) -> None:
            record = AlertRecord(**{k: payload[k] for k in ("id", "at", "state", "event", "subject", "text")})
            await asyncio.to_thread(send_email_blocking, email_message(record, smtp), smtp)

        return send

    # --- evaluation (no waiting) ------------------------------------------------------------------
    def evaluate(self, view: StateView, now: float) -> list[AlertRecord]:
        now_open = conditions(view)
        raised = [self._raise(t, now) for t in transitions(self.open, now_open)]
        self.open = now_open
        return raised

    def _raise(self, transition: Transition, now: float) -> AlertRecord:
        condition = transition.condition
        record = AlertRecord(
            id=next(self._ids),
            at=datetime.fromtimestamp(now, UTC).isoformat(),
            state=transition.state,
            event=condition.event,
            subject=condition.subject,
            text=transition.text,
        )
        self.history.append(record)
        if self.counter is not None:
            self.counter.labels(condition.event, transition.state).inc()
        log.warning("alert: %s", record.text)
        if not self.receivers:
            return record
        if not self.limit.allow(now):
            record.deliveries = {r.label: "suppressed: rate limit" for r in self.receivers}
            return record
        try:
            self._queue.put_nowait(record)
            record.deliveries = {r.label: "pending" for r in self.receivers}
        except asyncio.QueueFull:
            record.deliveries = {r.label: "dropped: queue full" for r in self.receivers}
        return record

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """Newest first."""
        return [record.to_dict() for record in itertools.islice(reversed(self.history), limit)]

    # --- delivery ---------------------------------------------------------------------------------
    async def _deliver(self, record: AlertRecord, receiver: Receiver) -> None:
        for attempt in range(self.config.retries + 1):
            try:
                await asyncio.wait_for(receiver.send(record.payload()), SEND_TIMEOUT_S)
                record.deliveries[receiver.label] = "sent"
                return
            except Exception as exc:  # every failure is retried: a receiver's trouble is its own
                detail = f"{type(exc).__name__}: {exc}"[:200]
                record.deliveries[receiver.label] = f"retrying ({attempt + 1} failed: {detail})"
                if attempt == self.config.retries:
                    record.deliveries[receiver.label] = f"failed after {attempt + 1} attempts: {detail}"
                    log.warning("alert %d to %s failed: %s", record.id, receiver.label, detail)
                    return
                await asyncio.sleep(backoff(attempt + 1, self.config.retry_base_s))

    async def run_sender(self) -> None:
        while True:
            record = await self._queue.get()
            for receiver in self.receivers:
                task = asyncio.create_task(self._deliver(record, receiver))
                self._deliveries.add(task)
                task.add_done_callback(self._deliveries.discard)

    async def run_evaluator(self) -> None:
        while True:
            try:
                self.evaluate(self.snapshot(), time.time())
            except Exception:  # the next pass tries again
                log.exception("alert evaluation failed")
            await asyncio.sleep(self.config.interval_s)

    async def context(self) -> AsyncIterator[None]:
        """An aiohttp cleanup_ctx body."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_S))
        jobs = {"alert-evaluator": self.run_evaluator(), "alert-sender": self.run_sender()}
        try:
            async with running(jobs, spawned=lambda: list(self._deliveries)):
                yield
        finally:
            await self._session.close()
