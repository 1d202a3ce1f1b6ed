"""Series read at scrape time: instance state (the health tracker), the TLS certificate, the controller's
version and nginx's stub_status. Nothing is kept per event: a scrape reads what the controller already holds.

nginx's stub_status is read by the controller when Prometheus scrapes /metrics (one loopback GET to
/nginx_status, 1 s at most), under the names nginx-prometheus-exporter uses (nginx_up,
nginx_connections_*, nginx_http_requests_total): one scrape target, no second daemon to run, secure and
keep in step, and dashboards made for the exporter work unchanged.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from control_plane import certs
from control_plane.health.tracker import HealthTracker
from control_plane.registry.models import BreakerState, HealthStatus

log = logging.getLogger(__name__)

BREAKER_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
STUB_TIMEOUT_S = 1.0
_STUB = re.compile(
    r"Active connections:\s*(\d+)\s+server accepts handled requests\s+(\d+)\s+(\d+)\s+(\d+)\s+"
    r"Reading:\s*(\d+)\s+Writing:\s*(\d+)\s+Waiting:\s*(\d+)"
)


@dataclass(frozen=True)
class StubStatus:
    active: int
    accepted: int
    handled: int
    requests: int
    reading: int
    writing: int
    waiting: int


def parse_stub_status(text: str) -> StubStatus | None:
    """nginx's stub_status page -> its numbers, or None when it is not one."""
    match = _STUB.search(text)
    if match is None:
        return None
    return StubStatus(*(int(group) for group in match.groups()))


def controller_version() -> str:
    try:
        return metadata.version("ish-gateway")
    except metadata.PackageNotFoundError:
        return "unknown"


def certificate_expiry(cert: str | None) -> float | None:
    """The certificate's notAfter as unix seconds; None without one (read_cert caches per file version)."""
    if not cert:
        return None
    try:
        return certs.read_cert(cert).not_after.timestamp()
    except certs.CertError:
        return None


def instance_up(health: HealthStatus) -> int:
    """0 once probes found it unhealthy; 1 otherwise (healthy, or not yet probed)."""
    return 0 if health is HealthStatus.UNHEALTHY else 1


class StubReader:
    """Reads nginx's /nginx_status on the loopback listener (before each scrape)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.last: StubStatus | None = None

    async def refresh(self) -> None:
        timeout = aiohttp.ClientTimeout(total=STUB_TIMEOUT_S)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(self.url, headers={"Connection": "close"}) as response,
            ):
                text = await response.text() if response.status == 200 else ""
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.debug("stub_status unreadable: %s", exc)
            text = ""
        self.last = parse_stub_status(text)


class StateCollector(Collector):
    def __init__(self, tracker: HealthTracker, cert: str | None, stub: StubReader | None) -> None:
        self.tracker = tracker
        self.cert = cert
        self.stub = stub
        self.version = controller_version()

    def collect(self) -> Iterator[Metric]:
        yield from self._instances(time.time())
        info = GaugeMetricFamily("ishgw_controller_info", "the controller's version", labels=["version"])
        info.add_metric([self.version], 1)
        yield info
        expiry = certificate_expiry(self.cert)
        if expiry is not None:
            yield GaugeMetricFamily(
                "ishgw_tls_certificate_expiry_timestamp_seconds",
                "when the client-facing TLS certificate expires (unix seconds)",
                value=expiry,
            )
        if self.stub is not None:
            yield from stub_families(self.stub.last)

    def _instances(self, now: float) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "ishgw_instance_up", "0 once probes find the instance unhealthy", labels=["instance"]
        )
        breaker = GaugeMetricFamily(
            "ishgw_breaker_state", "circuit breaker: 0 closed, 1 half-open, 2 open", labels=["instance"]
        )
        limited = GaugeMetricFamily(
            "ishgw_instance_rate_limited", "1 while the instance's 429 Retry-After lasts", labels=["instance"]
        )
        for name, entry in sorted(self.tracker.instances.items()):
            up.add_metric([name], instance_up(entry.health))
            breaker.add_metric([name], BREAKER_VALUES[entry.breaker.state])
            limited.add_metric([name], 1 if entry.rate_limited_until > now else 0)
        yield from (up, breaker, limited)


def stub_families(status: StubStatus | None) -> Iterator[Metric]:
    yield GaugeMetricFamily("nginx_up", "1 when nginx's stub_status answered", value=1 if status else 0)
    if status is None:
        return
    for name, value in (
        ("active", status.active),
        ("reading", status.reading),
        ("writing", status.writing),
        ("waiting", status.waiting),
    ):
        yield GaugeMetricFamily(f"nginx_connections_{name}", f"client connections {name}", value=value)
    yield CounterMetricFamily(
        "nginx_connections_accepted", "accepted client connections", value=status.accepted
    )
    yield CounterMetricFamily("nginx_connections_handled", "handled client connections", value=status.handled)
    yield CounterMetricFamily("nginx_http_requests", "client requests", value=status.requests)
