"""Request series from the access-log stream: labelling is pure (bounded by the registry), updates are cheap.

A record's pool and model are kept only when the registry knows them ("other" otherwise, "" when absent),
instances only through the address map: whatever a client sends, the label sets stay as many as the
registry's pools, models and instances.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from control_plane.health.logstream import LogRecord
from control_plane.metrics import TrafficMetrics

OTHER = "other"
# The instance label of a request no instance answered (refused by the gateway, no pool): not "", which
# Prometheus reads as an absent label and, with honor_labels, fills in with the scrape target.
NO_INSTANCE = "none"
STREAM_TYPES = frozenset({"text/event-stream", "application/x-ndjson"})
CLIENT_ERROR_REASONS = {401: "unauthorized", 403: "forbidden", 429: "rate_limited"}
# Label caches are dropped when they grow past this (a registry of thousands of instances still fits).
MAX_CACHED = 50_000


def code_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else OTHER


def bounded(value: str, known: frozenset[str]) -> str:
    if not value or value == "-":
        return ""
    return value if value in known else OTHER


def client_error_reason(record: LogRecord) -> str | None:
    """The gateway's own refusals: 401/403/429 answered without asking any instance."""
    if record.attempts:
        return None
    return CLIENT_ERROR_REASONS.get(record.status)


def is_stream(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() in STREAM_TYPES


class TrafficSeries:
    """Feeds TrafficMetrics from LogRecords. Labelled children are looked up once and cached: labels() costs
    more than the increment."""

    def __init__(self, metrics: TrafficMetrics) -> None:
        self.metrics = metrics
        self.pools: frozenset[str] = frozenset()
        self.models: frozenset[str] = frozenset()
        self._children: dict[tuple[str, ...], Any] = {}

    def follow(self, pools: frozenset[str], models: frozenset[str]) -> None:
        """The registry's pools and models (after each reconcile)."""
        self.pools, self.models = pools, models

    def _child(self, key: tuple[str, ...]) -> Any:
        child = self._children.get(key)
        if child is None:
            if len(self._children) >= MAX_CACHED:
                self._children.clear()
            kind, *labels = key
            metric = getattr(self.metrics, kind)
            child = metric.labels(*labels) if labels else metric
            self._children[key] = child
        return child

    def observe(self, record: LogRecord, names: Mapping[str, str]) -> None:
        """One request: ``names`` maps an upstream address to its instance name."""
        model = bounded(record.model, self.models)
        attempts = record.attempts
        last = names.get(attempts[-1].address, OTHER) if attempts else NO_INSTANCE
        pool = bounded(record.pool, self.pools)
        self._child(("requests", pool, model, last, code_class(record.status))).inc()
        self._child(("request_duration", model, last)).observe(record.request_ms / 1000)
        for attempt in attempts:
            if attempt.response_ms is not None:
                instance = names.get(attempt.address, OTHER)
                self._child(("upstream_duration", model, instance)).observe(attempt.response_ms / 1000)
        if len(attempts) > 1:
            self._child(("retries",)).inc(len(attempts) - 1)
        if record.header_ms is not None and attempts and is_stream(record.content_type):
            self._child(("first_byte", model, last)).observe(record.header_ms / 1000)
        reason = client_error_reason(record)
        if reason is not None:
            self._child(("client_errors", reason)).inc()
