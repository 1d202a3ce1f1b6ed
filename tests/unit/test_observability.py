"""Traffic series from log records, scrape-time state series, alert conditions: pure and fast."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from control_plane.alerts import rules
from control_plane.alerts.rules import (
    Condition,
    InstanceView,
    PoolView,
    RateLimit,
    StateView,
    backoff,
    conditions,
    transitions,
)
from control_plane.alerts.service import (
    AlertConfig,
    AlertRecord,
    AlertService,
    SmtpConfig,
    email_message,
    webhook_label,
)
from control_plane.alerts.view import state_view
from control_plane.health import breaker as br
from control_plane.health.logstream import (
    LogRecord,
    format_line,
    last_seconds_ms,
    parse_attempts,
    parse_datagram,
)
from control_plane.health.tracker import HealthTracker
from control_plane.health.traffic import (
    NO_INSTANCE,
    OTHER,
    Histogram,
    TrafficSeries,
    bounded,
    client_error_reason,
    code_class,
    is_stream,
)
from control_plane.registry.models import BreakerState, HealthStatus, InstanceConfig, InstanceState
from control_plane.settings import Settings
from control_plane.state_metrics import StateCollector, StubStatus, parse_stub_status, stub_families
from tests.tls_util import make_self_signed

# --- traffic ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [(200, "2xx"), (201, "2xx"), (404, "4xx"), (503, "5xx"), (0, "other"), (999, "other")],
)
def test_code_class(status: int, expected: str) -> None:
    assert code_class(status) == expected


def test_bounded_labels_keep_only_what_the_registry_knows() -> None:
    known = frozenset({"llama3"})
    assert bounded("llama3", known) == "llama3"
    assert bounded("a-model-a-client-made-up", known) == OTHER
    assert bounded("", known) == ""
    assert bounded("-", known) == ""


def rec(status: int, addresses: str = "", statuses: str = "", times: str = "", **kw: object) -> LogRecord:
    fields: dict[str, object] = {
        "at": 1.0,
        "request_id": "r",
        "pool": "p_m",
        "model": "m",
        "status": status,
        "request_ms": 1500.0,
        "attempts": parse_attempts(addresses, statuses, times),
        "retry_after": "",
        "retry_after_ms": "",
    }
    fields.update(kw)
    return LogRecord(**fields)  # type: ignore[arg-type]


def test_client_errors_are_the_gateways_own_refusals() -> None:
    assert client_error_reason(rec(401)) == "unauthorized"
    assert client_error_reason(rec(403)) == "forbidden"
    assert client_error_reason(rec(429)) == "rate_limited"
    assert client_error_reason(rec(404)) is None
    # An instance's 429 or 401 passed on is not the gateway's refusal.
    assert client_error_reason(rec(429, "127.0.0.1:1", "429", "0.01")) is None
    assert client_error_reason(rec(401, "127.0.0.1:1", "401", "0.01")) is None


@pytest.mark.parametrize(
    ("content_type", "stream"),
    [
        ("text/event-stream", True),
        ("text/event-stream; charset=utf-8", True),
        ("application/x-ndjson", True),
        ("Application/X-NDJSON", True),
        ("application/json", False),
        ("", False),
    ],
)
def test_is_stream(content_type: str, stream: bool) -> None:
    assert is_stream(content_type) is stream


def test_the_log_line_carries_header_time_and_content_type() -> None:
    line = format_line(
        status="200",
        upstream_addr="127.0.0.1:1, 127.0.0.1:2",
        upstream_status="502, 200",
        upstream_response_time="0.010, 0.500",
        upstream_header_time="0.005, 0.250",
        sent_http_content_type="text/event-stream",
    )
    record = parse_datagram(line)
    assert record is not None
    assert record.header_ms == 250.0
    assert record.content_type == "text/event-stream"
    assert last_seconds_ms("-") is None
    assert last_seconds_ms("") is None
    assert last_seconds_ms("0.1 : 0.2") == 200.0


def series() -> tuple[TrafficSeries, CollectorRegistry]:
    registry = CollectorRegistry()
    traffic = TrafficSeries()
    registry.register(traffic)
    traffic.follow(frozenset({"p_m"}), frozenset({"m"}))
    return traffic, registry


NAMES = {"127.0.0.1:1": "a", "127.0.0.1:2": "b"}


def test_a_retried_stream_counts_once_per_request_and_per_attempt() -> None:
    traffic, registry = series()
    traffic.observe(
        rec(
            200,
            "127.0.0.1:1, 127.0.0.1:2",
            "502, 200",
            "0.010, 1.000",
            header_ms=300.0,
            content_type="text/event-stream",
        ),
        NAMES,
    )
    value = registry.get_sample_value
    labels = {"pool": "p_m", "model": "m", "instance": "b", "code_class": "2xx"}
    assert value("ishgw_requests_total", labels) == 1
    assert value("ishgw_retries_total") == 1
    assert value("ishgw_request_duration_seconds_count", {"model": "m", "instance": "b"}) == 1
    assert value("ishgw_request_duration_seconds_sum", {"model": "m", "instance": "b"}) == 1.5
    assert value("ishgw_upstream_duration_seconds_count", {"model": "m", "instance": "a"}) == 1
    assert value("ishgw_upstream_duration_seconds_sum", {"model": "m", "instance": "b"}) == 1.0
    assert value("ishgw_time_to_first_byte_seconds_sum", {"model": "m", "instance": "b"}) == 0.3
    # A bucket at 50 ms and one at 120 s: LLM latencies.
    bucket = {"model": "m", "instance": "b", "le": "0.05"}
    assert value("ishgw_request_duration_seconds_bucket", bucket) == 0
    assert value("ishgw_request_duration_seconds_bucket", {**bucket, "le": "120.0"}) == 1


def test_a_plain_answer_has_no_first_byte_sample() -> None:
    traffic, registry = series()
    traffic.observe(
        rec(200, "127.0.0.1:1", "200", "0.2", header_ms=100.0, content_type="application/json"), NAMES
    )
    assert (
        registry.get_sample_value("ishgw_time_to_first_byte_seconds_count", {"model": "m", "instance": "a"})
        is None
    )
    assert registry.get_sample_value("ishgw_retries_total") == 0


def test_labels_stay_bounded_whatever_clients_send() -> None:
    traffic, registry = series()
    for n in range(200):
        traffic.observe(rec(404, pool="", model=f"made-up-{n}"), NAMES)
        traffic.observe(rec(200, f"10.9.9.{n}:80", "200", "0.1", pool=f"p_{n}", model="m"), NAMES)
    value = registry.get_sample_value
    assert (
        value(
            "ishgw_requests_total", {"pool": "", "model": OTHER, "instance": NO_INSTANCE, "code_class": "4xx"}
        )
        == 200
    )
    assert (
        value("ishgw_requests_total", {"pool": OTHER, "model": "m", "instance": OTHER, "code_class": "2xx"})
        == 200
    )
    names = {
        s.labels.get("model") for m in registry.collect() for s in m.samples if m.name == "ishgw_requests"
    }
    assert names == {OTHER, "m"}


def test_gateway_refusals_are_counted_by_reason_from_zero() -> None:
    traffic, registry = series()
    assert registry.get_sample_value("ishgw_client_errors_total", {"reason": "forbidden"}) == 0
    traffic.observe(rec(401, pool=""), NAMES)
    traffic.observe(rec(429, pool=""), NAMES)
    traffic.observe(rec(429, pool=""), NAMES)
    assert registry.get_sample_value("ishgw_client_errors_total", {"reason": "unauthorized"}) == 1
    assert registry.get_sample_value("ishgw_client_errors_total", {"reason": "rate_limited"}) == 2


# --- state series -------------------------------------------------------------------------------------

# As nginx writes it: every line but the second ends with a space.
STUB_PAGE = (
    "Active connections: 291 \n"
    "server accepts handled requests\n"
    " 16630948 16630947 31070465 \n"
    "Reading: 6 Writing: 179 Waiting: 106 \n"
)


def test_stub_status_parses() -> None:
    assert parse_stub_status(STUB_PAGE) == StubStatus(291, 16630948, 16630947, 31070465, 6, 179, 106)
    assert parse_stub_status("<html>403 Forbidden</html>") is None
    assert parse_stub_status("") is None


def test_stub_series_use_the_exporters_names() -> None:
    names = {
        s.name: s.value for family in stub_families(parse_stub_status(STUB_PAGE)) for s in family.samples
    }
    assert names["nginx_up"] == 1
    assert names["nginx_connections_active"] == 291
    assert names["nginx_http_requests_total"] == 31070465
    assert names["nginx_connections_accepted_total"] == 16630948
    down = [s for family in stub_families(None) for s in family.samples]
    assert [(s.name, s.value) for s in down] == [("nginx_up", 0)]


def instance(name: str) -> InstanceConfig:
    return InstanceConfig(name=name, provider_type="ollama", api_base="http://127.0.0.1:1")


def test_instance_state_series_follow_the_tracker() -> None:
    tracker = HealthTracker()
    tracker.sync([(instance("a"), InstanceState()), (instance("b"), InstanceState())], {}, 0, 0)
    tracker.instances["a"].health = HealthStatus.UNHEALTHY
    tracker.instances["b"].breaker = br.Breaker(state=BreakerState.HALF_OPEN)
    tracker.instances["b"].rate_limited_until = 4e9
    registry = CollectorRegistry()
    registry.register(StateCollector(tracker, None, None))
    value = registry.get_sample_value
    assert value("ishgw_instance_up", {"instance": "a"}) == 0
    assert value("ishgw_instance_up", {"instance": "b"}) == 1
    assert value("ishgw_breaker_state", {"instance": "a"}) == 0
    assert value("ishgw_breaker_state", {"instance": "b"}) == 1
    assert value("ishgw_instance_rate_limited", {"instance": "a"}) == 0
    assert value("ishgw_instance_rate_limited", {"instance": "b"}) == 1
    versions = [
        s.labels["version"]
        for m in registry.collect()
        for s in m.samples
        if s.name == "ishgw_controller_info"
    ]
    assert len(versions) == 1 and versions[0]
    assert value("ishgw_tls_certificate_expiry_timestamp_seconds") is None  # no certificate: no series


# --- alert conditions ---------------------------------------------------------------------------------


def view(**kw: object) -> StateView:
    return StateView(**kw)  # type: ignore[arg-type]


def test_every_event_has_its_condition() -> None:
    found = conditions(
        view(
            instances=(
                InstanceView("a", "unhealthy", "open", "3 consecutive failures"),
                InstanceView("b", "healthy", "closed", None, "credential rejected (HTTP 401)"),
                InstanceView("c", "healthy", "closed"),
            ),
            pools=(
                PoolView("p_x", "openai", "chat", "x", 0, {"a": "unhealthy"}),
                PoolView("p_y", "openai", "chat", "y", 1, {}),
            ),
            reload_error="nginx -t: unknown directive",
            certificate_days_left=3.2,
        )
    )
    assert sorted(found) == [
        "breaker_open:a",
        "certificate_expiring",
        "credential_rejected:b",
        "instance_down:a",
        "pool_without_instance:p_x",
        "reload_failed",
    ]
    assert "3 consecutive failures" in found["breaker_open:a"].text
    assert "a: unhealthy" in found["pool_without_instance:p_x"].text
    assert found["certificate_expiring"].text == "TLS certificate expires in 3 days"
    assert "unknown directive" not in found["reload_failed"].text  # nginx's message stays on the host


def test_nothing_wrong_nothing_open() -> None:
    calm = view(
        instances=(InstanceView("a", "unknown", "closed"),),
        pools=(PoolView("p", "openai", "chat", "m", 2, {}),),
        certificate_days_left=60.0,
    )
    assert conditions(calm) == {}


def test_an_incident_fires_once_and_resolves_once() -> None:
    down = {"k": Condition("k", rules.INSTANCE_DOWN, "a", "instance a is down")}
    assert [t.state for t in transitions({}, down)] == ["firing"]
    assert transitions(down, down) == []
    reworded = {"k": Condition("k", rules.INSTANCE_DOWN, "a", "instance a is down (other words)")}
    assert transitions(down, reworded) == []
    (recovered,) = transitions(down, {})
    assert recovered.state == "resolved"
    assert recovered.text == "[ISH Gateway] RESOLVED instance_down: a is back"


def test_rate_limit_is_a_token_bucket() -> None:
    limit = RateLimit(per_minute=60, burst=2)
    assert [limit.allow(0.0) for _ in range(3)] == [True, True, False]
    assert limit.allow(0.5) is False
    assert limit.allow(1.0) is True  # one token a second


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert backoff(20) == 60


def test_service_dedups_resolves_and_rate_limits() -> None:
    async def scenario() -> None:
        state = {"view": view()}
        service = AlertService(
            AlertConfig(webhooks=("https://hooks.example/secret-path",), per_minute=1, burst=2),
            lambda: state["view"],
            CollectorRegistry(),
        )
        down = view(instances=(InstanceView("a", "unhealthy", "closed"),))
        assert [r.state for r in service.evaluate(down, 0.0)] == ["firing"]
        assert service.evaluate(down, 1.0) == []
        assert [r.state for r in service.evaluate(view(), 2.0)] == ["resolved"]
        third = service.evaluate(down, 3.0)  # the burst of 2 is spent
        assert third[0].deliveries == {"webhook 1 (hooks.example)": "suppressed: rate limit"}
        listed = service.recent(10)
        assert [a["state"] for a in listed] == ["firing", "resolved", "firing"]
        assert "secret-path" not in str(listed)

    asyncio.run(scenario())


def test_webhook_label_hides_the_path() -> None:
    assert webhook_label(0, "https://hooks.slack.com/services/T0/B0/XYZ") == "webhook 1 (hooks.slack.com)"


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"ISHGW_ALERT_WEBHOOK_URLS": "ftp://x/y"}, "alert_webhook_urls"),
        ({"ISHGW_ALERT_WEBHOOK_URLS": "http:///nohost"}, "alert_webhook_urls"),
        ({"ISHGW_ALERT_EMAIL_TO": "ops@example.com, not-an-address"}, "alert_email_to"),
        ({"ISHGW_ALERT_SMTP_FROM": "a@b\r\nBcc: x@y"}, "alert_smtp_from"),
        ({"ISHGW_ALERT_RATE_PER_MIN": "0"}, "alert_rate_per_min"),
    ],
)
def test_bad_alert_settings_name_the_field(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], field: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert field in str(caught.value)


def test_alert_settings_split_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISHGW_ALERT_WEBHOOK_URLS", "http://127.0.0.1:9/a, https://hooks.slack.com/x")
    monkeypatch.setenv("ISHGW_ALERT_EMAIL_TO", "ops@example.com,oncall@example.com")
    monkeypatch.setenv("ISHGW_ALERT_SMTP_PASSWORD", "hunter2-secret")
    settings = Settings()
    assert settings.alert_webhook_urls == ["http://127.0.0.1:9/a", "https://hooks.slack.com/x"]
    assert settings.alert_email_to == ["ops@example.com", "oncall@example.com"]
    assert "hunter2-secret" not in repr(settings)


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    histogram = Histogram()
    for seconds in (0.05, 0.0501, 121.0):
        histogram.observe(seconds)
    buckets = dict(histogram.buckets())
    assert buckets["0.05"] == 1  # le: an observation equal to the bound is in it
    assert buckets["0.1"] == 2
    assert buckets["120.0"] == 2
    assert buckets["+Inf"] == 3
    assert histogram.total == pytest.approx(121.1001)


def test_email_subject_is_one_line() -> None:
    record = AlertRecord(
        1, "2026-01-01T00:00:00+00:00", "firing", "breaker_open", "a", "line one\r\nBcc: x@y"
    )
    smtp = SmtpConfig("127.0.0.1", 25, "gw@example.com", ("ops@example.com",))
    message = email_message(record, smtp)
    assert message["Subject"] == "line one Bcc: x@y"
    assert message["Bcc"] is None


def test_state_view_reads_tracker_pools_last_result_and_certificate(tmp_path: Path) -> None:
    tracker = HealthTracker()
    tracker.sync([(instance("a"), InstanceState())], {}, 0, 0)
    tracker.instances["a"].quarantined = "HTTP 401: credential rejected"
    pool = SimpleNamespace(
        name="p_m", family="openai", kind="chat", model="m", members=(), excluded=(("a", "quarantined"),)
    )
    failed = SimpleNamespace(ok=False, error="nginx -t failed")
    reconciler = SimpleNamespace(spec=SimpleNamespace(pools=(pool,)), last_result=failed)
    make_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem", days=2)
    now = time.time()
    state = state_view(tracker, reconciler, str(tmp_path / "cert.pem"), 14.0, now)  # type: ignore[arg-type]
    assert sorted(conditions(state)) == [
        "certificate_expiring",
        "credential_rejected:a",
        "pool_without_instance:p_m",
        "reload_failed",
    ]
    assert state.certificate_days_left is not None and 1.9 < state.certificate_days_left <= 2.0
    reconciler.last_result = SimpleNamespace(ok=True, error=None)
    assert state_view(tracker, reconciler, None, 14.0, now).reload_error is None  # type: ignore[arg-type]


def test_state_view_holds_only_what_can_raise_an_incident() -> None:
    """Evaluated every second: a healthy instance with a closed breaker and a pool with members raise
    nothing and are not copied into the view; the others are, and their conditions are unchanged."""
    tracker = HealthTracker()
    tracker.sync([(instance(n), InstanceState()) for n in ("ok", "down", "tripped")], {}, 0, 0)
    tracker.instances["ok"].health = HealthStatus.HEALTHY
    tracker.instances["down"].health = HealthStatus.UNHEALTHY
    tracker.instances["tripped"].breaker = br.Breaker(state=BreakerState.HALF_OPEN)
    full = SimpleNamespace(name="p_a", family="openai", kind="chat", model="a", members=("ok",), excluded=())
    empty = SimpleNamespace(name="p_b", family="openai", kind="chat", model="b", members=(), excluded=())
    reconciler = SimpleNamespace(spec=SimpleNamespace(pools=(full, empty)), last_result=None)
    state = state_view(tracker, reconciler, None, 14.0, time.time())  # type: ignore[arg-type]
    assert [i.name for i in state.instances] == ["down", "tripped"]
    assert [p.name for p in state.pools] == ["p_b"]
    assert sorted(conditions(state)) == [
        "breaker_open:tripped",
        "instance_down:down",
        "pool_without_instance:p_b",
    ]
