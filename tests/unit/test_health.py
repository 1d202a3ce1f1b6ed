"""Breaker transitions, tracker verdicts, log parsing and probe reading: pure and fast."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from control_plane import providers
from control_plane.health import breaker as br
from control_plane.health.logstream import (
    FIELDS,
    Attempt,
    Limited,
    LogRecord,
    format_line,
    parse_attempts,
    parse_datagram,
    parse_limited,
    parse_tokens,
    retry_after_seconds,
)
from control_plane.health.probes import Outcome, ProbeResult, evaluate, probe_request
from control_plane.health.statuses import classify
from control_plane.health.tracker import DEFAULT_429_COOLDOWN_S, HealthTracker, tokens_per_minute
from control_plane.registry.models import (
    BreakerState,
    HealthPolicy,
    HealthStatus,
    InstanceConfig,
    InstanceState,
    ObservedState,
    OperatorStatus,
    ProbeKind,
    config_fingerprint,
    read_state,
)

POLICY = HealthPolicy(breaker_consecutive_failures=3, breaker_min_requests=10, breaker_cooldown_s=5)


def run(samples: list[tuple[float, bool, float]], policy: HealthPolicy = POLICY) -> br.Breaker:
    """Feed samples with window counts kept the way the tracker keeps them."""
    b = br.Breaker()
    failures = 0
    for count, (at, ok, ms) in enumerate(samples, start=1):
        failures += not ok
        b = br.observe(b, br.Sample(at, ok, ms), br.WindowStats(count, failures), policy)
    return b


NO_STATS = br.WindowStats(0, 0)


def test_consecutive_failures_open() -> None:
    b = run([(0, True, 10), (1, False, 0), (2, False, 0)])
    assert b.state is BreakerState.CLOSED
    b = run([(0, True, 10), (1, False, 0), (2, False, 0), (3, False, 0)])
    assert b.state is BreakerState.OPEN and b.open_until == 8 and "consecutive" in (b.reason or "")


def test_error_rate_over_window_opens() -> None:
    samples = [(float(i), i % 2 == 0, 10.0) for i in range(10)]  # alternating: never 3 in a row
    b = run(samples)
    assert b.state is BreakerState.OPEN and "error rate" in (b.reason or "")


def test_error_rate_needs_the_minimum_sample() -> None:
    assert run([(float(i), i % 2 == 0, 10.0) for i in range(9)]).state is BreakerState.CLOSED


def test_latency_degradation_opens_and_baseline_does_not_chase_it() -> None:
    policy = HealthPolicy(breaker_min_requests=10, latency_factor=5, latency_floor_ms=100)
    recent: float | None = None
    baseline: float | None = None
    b = br.Breaker()
    for i, ms in enumerate([20.0] * 50 + [2000.0] * 20):
        recent = br.ewma(recent, ms, br.RECENT_ALPHA)
        baseline = br.learn_baseline(baseline, ms, policy)
        b = br.observe(b, br.Sample(float(i), True, ms), br.WindowStats(60, 0, recent, baseline), policy)
        if b.state is BreakerState.OPEN:
            break
    assert b.state is BreakerState.OPEN and "latency" in (b.reason or "")
    assert baseline == pytest.approx(20.0)


def test_slow_but_under_the_floor_is_fine() -> None:
    policy = HealthPolicy(breaker_min_requests=10, latency_factor=5, latency_floor_ms=1000)
    stats = br.WindowStats(60, 0, recent_ms=500.0, baseline_ms=20.0)
    assert br.window_verdict(stats, policy) is None
    assert br.window_verdict(br.WindowStats(60, 0, recent_ms=1500.0, baseline_ms=20.0), policy)


def test_open_half_open_closed_cycle() -> None:
    b = run([(0, False, 0)] * 3)
    assert br.tick(b, 4.9).state is BreakerState.OPEN
    b = br.tick(b, 5.0)
    assert b.state is BreakerState.HALF_OPEN
    for i in range(POLICY.breaker_half_open_successes):
        b = br.observe(b, br.Sample(6 + i, True, 10), NO_STATS, POLICY)
    assert b.state is BreakerState.CLOSED and b.cooldown_factor == 1


def test_failure_while_half_open_reopens_with_longer_cooldown() -> None:
    b = br.tick(run([(0, False, 0)] * 3), 5.0)
    b = br.observe(b, br.Sample(6, False, 0), NO_STATS, POLICY)
    assert b.state is BreakerState.OPEN and b.cooldown_factor == 2 and b.open_until == 6 + 10


def test_probe_recovery_skips_the_cooldown() -> None:
    b = br.tick(run([(0, False, 0)] * 3), 5.0)
    b = br.observe(b, br.Sample(6, False, 0), NO_STATS, POLICY)
    assert br.recover(b).state is BreakerState.HALF_OPEN and br.recover(b).cooldown_factor == 1
    assert br.recover(br.Breaker()) == br.Breaker()


@given(st.lists(st.tuples(st.booleans(), st.floats(min_value=0, max_value=1e5)), max_size=200))
def test_breaker_invariants(outcomes: list[tuple[bool, float]]) -> None:
    b = br.Breaker()
    count = failures = 0
    for i, (ok, ms) in enumerate(outcomes):
        count, failures = count + 1, failures + (not ok)
        b = br.tick(
            br.observe(b, br.Sample(float(i), ok, ms), br.WindowStats(count, failures), POLICY), float(i)
        )
        assert 1 <= b.cooldown_factor <= br.MAX_COOLDOWN_FACTOR
        assert (b.state is BreakerState.OPEN) == (b.open_until > i)


def test_tracker_window_counts_stay_exact() -> None:
    t = tracker_with(config(health=HealthPolicy(breaker_window_s=10, breaker_min_requests=1000)))
    for i in range(100):
        status = 500 if i % 4 == 0 else 200
        t.observe(record("127.0.0.0:1", status, at=1000.0 + i), now_mono=float(i))
    entry = t.instances["a"]
    assert len(entry.window) == 11  # samples within the last 10 s, inclusive
    assert entry.window_failures == sum(1 for s in entry.window if not s.ok)
    assert entry.window_ok_latency_ms == pytest.approx(sum(s.latency_ms for s in entry.window if s.ok))


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, "ok"),
        (400, "ok"),
        (404, "ok"),
        (413, "ok"),
        (422, "ok"),
        (401, "credential"),
        (402, "credential"),
        (403, "credential"),
        (429, "rate_limited"),
        (500, "failure"),
        (502, "failure"),
        (504, "failure"),
        (None, "failure"),
    ],
)
def test_what_counts_against_an_instance(status: int | None, verdict: str) -> None:
    assert classify(status) == verdict


def test_parse_datagram_and_attempt_lists() -> None:
    line = format_line(
        msec="1700000000.5",
        request_id="r1",
        pool="p_x",
        model="m",
        status="200",
        request_time="0.012",
        upstream_addr="127.0.0.1:1, unix:/r/i_a.sock : 127.0.0.1:2",
        upstream_status="502, 429 : 200",
        upstream_response_time="0.001, 0.002 : 0.009",
        client_id="key_0123456789abcdef",
    )
    record = parse_datagram(line)
    assert record is not None
    assert [(a.address, a.status) for a in record.attempts] == [
        ("127.0.0.1:1", 502),
        ("unix:/r/i_a.sock", 429),
        ("127.0.0.1:2", 200),
    ]
    assert record.attempts[2].response_ms == pytest.approx(9.0)
    assert record.status == 200 and record.request_ms == pytest.approx(12.0)
    assert record.key_id == "key_0123456789abcdef" and record.retry_after == ""
    assert parse_datagram(line.replace(b"ishgw:", b"other:")) is None
    assert parse_datagram(line[:-1]) is None  # cut short: not JSON
    odd = parse_datagram(line.replace(b'"m",', b'"m\xff",'))  # not UTF-8: still read
    assert odd is not None and odd.request_id == "r1" and odd.model == "m\ufffd"
    assert parse_datagram(line.split(b": ", 1)[0] + b": [1, 2]") is None  # JSON, not a line's fields
    assert parse_datagram(b"garbage") is None
    assert parse_attempts("-", "-", "-") == ()
    assert record.limited == ()  # no 429 went to a pool's _429_<n> location


def test_the_line_is_read_field_by_field_at_its_position() -> None:
    """Each LOG_FIELDS entry lands in its own part of the record (the parser reads the array by position);
    a tree that does not count usage sends the line without its last field; a line of any other length,
    or an older nginx's JSON object, is not read (and raises nothing)."""
    values = {
        "msec": "1700000000.25",
        "request_id": "rid-1",
        "pool": "p_pool",
        "model": "m-model",
        "status": "201",
        "request_time": "0.125",
        "upstream_addr": "127.0.0.1:7",
        "upstream_status": "202",
        "upstream_response_time": "0.5",
        "retry_after": "7",
        "retry_after_ms": "8",
        "client_id": "key_x",
        "limited_429s": "127.0.0.1:7|9|10;",
        "upstream_header_time": "0.25",
        "sent_http_content_type": "text/plain",
        "tokens": "3 4",
    }
    assert set(values) == set(FIELDS)
    expected = LogRecord(
        1700000000.25,
        "rid-1",
        "p_pool",
        "m-model",
        201,
        125.0,
        (Attempt("127.0.0.1:7", 202, 500.0),),
        "7",
        "8",
        "key_x",
        (Limited(0, "9", "10"),),
        250.0,
        "text/plain",
        3,
        4,
    )
    line = format_line(**values)
    assert parse_datagram(line) == expected
    head, _, body = line.partition(b"ishgw: ")
    fields = json.loads(body)
    uncounted = head + b"ishgw: " + json.dumps(fields[:-1]).encode()
    assert parse_datagram(uncounted) == expected._replace(prompt_tokens=None, completion_tokens=None)
    for other in (fields[:-2], [*fields, ""], dict(zip(FIELDS, fields, strict=True))):
        assert parse_datagram(head + b"ishgw: " + json.dumps(other).encode()) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12 345", (12, 345)),
        ("0 0", (0, 0)),
        ("", (None, None)),
        ("12", (None, None)),
        ("12 ", (None, None)),
        ("-1 3", (None, None)),
        ("1.5 3", (None, None)),
        ("1e+15 3", (None, None)),
        ("\u00b2 3", (None, None)),  # a digit to str.isdigit, not to int()
        ("1 2 3", (None, None)),
        ("1234567890123 1", (None, None)),
    ],
)
def test_token_counts_of_the_log_line(text: str, expected: tuple[int | None, int | None]) -> None:
    assert parse_tokens(text) == expected
    record = parse_datagram(format_line(status="200", model="m", tokens=text))
    assert record is not None and (record.prompt_tokens, record.completion_tokens) == expected


def test_parse_datagram_keeps_the_intercepted_429s() -> None:
    """Each _429_<n> location appended the attempts up to the 429 it caught and that answer's headers."""
    line = format_line(
        status="200",
        upstream_addr="127.0.0.1:1, 127.0.0.1:2 : 127.0.0.1:3 : 127.0.0.1:4",
        upstream_status="502, 429 : 429 : 200",
        upstream_response_time="0.001, 0.002 : 0.001 : 0.009",
        limited_429s="127.0.0.1:1, 127.0.0.1:2|7|;"
        "127.0.0.1:1, 127.0.0.1:2 : 127.0.0.1:3|Wed, 21 Oct 2026 07:28:30 GMT|1500;",
    )
    record = parse_datagram(line)
    assert record is not None
    assert [(x.attempt, x.retry_after, x.retry_after_ms) for x in record.limited] == [
        (1, "7", ""),
        (2, "Wed, 21 Oct 2026 07:28:30 GMT", "1500"),
    ]
    assert [record.attempts[x.attempt].status for x in record.limited] == [429, 429]
    assert parse_limited("127.0.0.1:1 no bars;;") == ()  # what does not parse is skipped


@pytest.mark.parametrize(
    ("value", "ms", "expected"),
    [
        ("20", "", 20.0),
        ("", "1500", 1.5),
        ("", "", None),
        ("soon", "", None),
        ("Wed, 21 Oct 2026 07:28:30 GMT", "", 30.0),
        ("-5", "", 0.0),
    ],
)
def test_retry_after(value: str, ms: str, expected: float | None) -> None:
    now = datetime(2026, 10, 21, 7, 28, 0, tzinfo=UTC).timestamp()
    assert retry_after_seconds(value, ms, now) == expected


def config(name: str = "a", **kw: object) -> InstanceConfig:
    kw.setdefault("health", POLICY)
    return InstanceConfig(name=name, provider_type="ollama", api_base="http://127.0.0.1:1", **kw)


def tracker_with(*configs: InstanceConfig) -> HealthTracker:
    t = HealthTracker()
    t.sync(
        [(c, InstanceState()) for c in configs],
        {f"127.0.0.{i}:1": c.name for i, c in enumerate(configs)},
        0,
        0,
    )
    return t


def record(address: str, status: int, ra: str = "", at: float = 1000.0) -> LogRecord:
    return LogRecord(at, "r", "p", "m", status, 1.0, parse_attempts(address, str(status), "0.001"), ra, "")


def test_tracker_429_honours_retry_after_and_expires() -> None:
    t = tracker_with(config())
    t.observe(record("127.0.0.0:1", 429, ra="20"), now_mono=1)
    assert t.membership_changed
    assert t.state_fields("a", 1000, 1)["rate_limited_until"] == datetime.fromtimestamp(1020, UTC)
    t.membership_changed = False
    t.tick(now_mono=2, now_wall=1019)
    assert not t.membership_changed
    t.tick(now_mono=3, now_wall=1020)
    assert t.membership_changed and t.state_fields("a", 1020, 3)["rate_limited_until"] is None


def test_intercepted_429_sets_the_cooldown_of_the_attempt_it_belongs_to() -> None:
    """The 429 caught by the pool's _429 location keeps its Retry-After (2 s) for that attempt; a 429
    nginx retried in place after it has none in the line (default); the last attempt's own header
    (5 s) is its own."""
    t = tracker_with(config("a"), config("b"), config("c"))
    line = record("127.0.0.0:1 : 127.0.0.1:1, 127.0.0.2:1", 429, ra="5")._replace(
        attempts=parse_attempts("127.0.0.0:1 : 127.0.0.1:1, 127.0.0.2:1", "429 : 429, 429", "0 : 0, 0"),
        limited=(Limited(0, "2", ""),),
    )
    t.observe(line, now_mono=1)
    until = {name: t.instances[name].rate_limited_until for name in "abc"}
    assert until == {"a": 1002.0, "b": 1000.0 + DEFAULT_429_COOLDOWN_S, "c": 1005.0}


def test_tracker_quarantines_on_401_until_config_changes() -> None:
    t = tracker_with(config())
    t.observe(record("127.0.0.0:1", 401), now_mono=1)
    fields = t.state_fields("a", 1000, 1)
    assert fields["quarantined_reason"] == "credential rejected (HTTP 401)" and fields["quarantine_config"]
    assert t.instances["a"].breaker.state is BreakerState.CLOSED  # not a host failure
    changed = config(api_key="sk-new-key-0123456")
    t.sync([(changed, InstanceState())], {}, 0, 0)
    assert t.state_fields("a", 1000, 1)["quarantined_reason"] is None


def test_tracker_client_errors_never_count() -> None:
    t = tracker_with(config())
    for _ in range(50):
        t.observe(record("127.0.0.0:1", 400), now_mono=1)
    assert t.instances["a"].breaker.state is BreakerState.CLOSED and t.instances["a"].errors == 0


def test_tracker_probes_rise_and_fall() -> None:
    t = tracker_with(config())
    fail = ProbeResult(Outcome.FAIL, "refused", 1.0)
    ok = ProbeResult(Outcome.OK, "HTTP 200", 1.0, ("m1",), listed=True)
    for _ in range(POLICY.fall - 1):
        t.probe("a", fail, 0)
    assert t.instances["a"].health is HealthStatus.UNKNOWN
    t.probe("a", fail, 0)
    # mypy keeps the narrowing from the assert above across the call in between
    assert t.instances["a"].health is HealthStatus.UNHEALTHY  # type: ignore[comparison-overlap]
    t.probe("a", ok, 0)
    assert t.instances["a"].health is HealthStatus.UNHEALTHY
    t.probe("a", ok, 0)
    assert t.instances["a"].health is HealthStatus.HEALTHY
    assert t.state_fields("a", 0, 0)["discovered_models"] == ["m1"]
    assert len(t.history("a")) == POLICY.fall + 2


def test_tracker_restart_adopts_stored_verdicts() -> None:
    c = config()
    state = InstanceState(
        health_status=HealthStatus.UNHEALTHY,
        breaker_state=BreakerState.OPEN,
        breaker_open_until=datetime.fromtimestamp(1010, UTC),
    )
    t = HealthTracker()
    t.sync([(c, state)], {}, now_mono=50, now_wall=1000)
    entry = t.instances["a"]
    assert entry.health is HealthStatus.UNHEALTHY and entry.breaker.state is BreakerState.OPEN
    assert entry.breaker.open_until == pytest.approx(60)
    assert not t.membership_changed


@pytest.mark.parametrize(
    ("provider", "base", "url", "headers"),
    [
        ("ollama", "http://h:11434", "http://h:11434/api/tags", {}),
        ("vllm", "http://h:8000/v1", "http://h:8000/v1/models", {"Authorization": "Bearer k0123456789ab"}),
        ("openai", None, "https://api.openai.com/v1/models", {"Authorization": "Bearer k0123456789ab"}),
        (
            "anthropic",
            None,
            "https://api.anthropic.com/v1/models",
            {"x-api-key": "k0123456789ab", "anthropic-version": "2023-06-01"},
        ),
        (
            "azure",
            "https://r.openai.azure.com",
            "https://r.openai.azure.com/openai/models?api-version=2024-10-21",
            {"api-key": "k0123456789ab"},
        ),
    ],
)
def test_probe_requests(provider: str, base: str | None, url: str, headers: dict[str, str]) -> None:
    c = InstanceConfig(name="x", provider_type=provider, api_base=base, api_key="k0123456789ab")
    request = probe_request(c, "k0123456789ab")
    assert request is not None and request.url == url
    assert all(request.headers.get(k) == v for k, v in headers.items())


def test_probe_evaluation() -> None:
    c = InstanceConfig(name="x", provider_type="ollama", api_base="http://h:1")
    request = probe_request(c, None)
    assert request is not None
    good = evaluate(request, 200, b'{"models":[{"name":"b"},{"name":"a"}]}', 3.0)
    assert good.outcome is Outcome.OK and good.models == ("a", "b")
    assert evaluate(request, 403, b"", 1.0).outcome is Outcome.CREDENTIAL
    assert evaluate(request, 429, b"", 1.0, 7.0).retry_after_s == 7.0
    assert evaluate(request, 503, b"", 1.0).outcome is Outcome.FAIL
    lightrag = probe_request(
        InstanceConfig(
            name="l", provider_type="openai_compatible", api_base="http://h:9621", tags=["probe=lightrag"]
        ),
        None,
    )
    assert lightrag is not None and lightrag.url == "http://h:9621/health"
    assert evaluate(lightrag, 200, b'{"status":"healthy"}', 1).outcome is Outcome.OK
    assert evaluate(lightrag, 200, b'{"status":"degraded"}', 1).outcome is Outcome.FAIL


def test_probe_kind_is_a_field_and_the_legacy_tag_becomes_it() -> None:
    base = {"name": "l", "provider_type": "openai_compatible", "api_base": "http://h:9621"}
    by_field = InstanceConfig.model_validate({**base, "health": {"probe_kind": "lightrag"}})
    by_tag = InstanceConfig.model_validate({**base, "tags": ["x", "probe=lightrag"], "health": {"rise": 4}})
    assert by_tag.health.probe_kind is ProbeKind.LIGHTRAG and by_tag.tags == ["x"] and by_tag.health.rise == 4
    for config in (by_field, by_tag):
        request = probe_request(config, None)
        assert request is not None and request.url == "http://h:9621/health" and request.lightrag
    # A probe_kind given with the tag wins.
    both = {**base, "tags": ["probe=lightrag"], "health": {"probe_kind": "model_list"}}
    plain = InstanceConfig.model_validate(both)
    assert plain.health.probe_kind is ProbeKind.MODEL_LIST and plain.tags == []
    request = probe_request(plain, None)
    assert request is not None and request.url == "http://h:9621/v1/models" and not request.lightrag
    with pytest.raises(ValidationError):
        InstanceConfig.model_validate({**base, "health": {"probe_kind": "ping"}})


def test_fingerprints_of_unchanged_configurations_survive_the_probe_kind_field() -> None:
    """Values computed before health.probe_kind existed: a stored quarantine outlives the upgrade."""
    assert config_fingerprint(InstanceConfig(name="a", provider_type="openai")) == "c9928b97d58e9d7f"
    other = InstanceConfig(
        name="b",
        provider_type="ollama",
        api_base="http://h:1",
        tags=["x"],
        health=HealthPolicy(rise=3, probe_path="/ok"),
    )
    assert config_fingerprint(other) == "c6d78186fde136cb"
    lightrag = other.model_copy(
        update={"health": other.health.model_copy(update={"probe_kind": ProbeKind.LIGHTRAG})}
    )
    assert config_fingerprint(lightrag) != config_fingerprint(other)


def test_utilization_against_max_rpm_is_derived_on_read() -> None:
    t = tracker_with(config(max_rpm=10))
    for i in range(5):
        t.observe(record("127.0.0.0:1", 200, at=1000.0 + i), now_mono=1)
    fields = t.state_fields("a", 1010, 1)
    assert fields["current_rpm"] == 5 and "utilization_percentage" not in fields
    observed = ObservedState.model_validate(fields)
    state = read_state(observed, OperatorStatus.ACTIVE, None, max_rpm=10)
    assert state.utilization_percentage == 50.0 and state.connection_status == "unknown"
    assert read_state(observed, OperatorStatus.ACTIVE, None, max_rpm=0).utilization_percentage == 0.0


def test_tokens_per_minute_weighs_the_last_minute_by_what_is_left_of_it() -> None:
    assert tokens_per_minute({}, 600.0) == 0
    assert tokens_per_minute({600: 100, 540: 60}, 600.0) == 160  # the whole previous minute still counts
    assert tokens_per_minute({600: 100, 540: 60}, 630.0) == 130  # half of it
    assert tokens_per_minute({600: 100, 540: 60}, 659.0) == 101
    assert tokens_per_minute({540: 60}, 720.0) == 0  # two minutes ago: gone


# -- probe paths: one mapping for probes and traffic (issue: openai_compatible without a path) -------------

PROBE_CASES = [
    # provider, api_base, the probe's path
    ("openai_compatible", "http://h:1", "/v1/models"),
    ("openai_compatible", "http://h:1/", "/v1/models"),
    ("openai_compatible", "http://h:1/v1", "/v1/models"),
    ("openai_compatible", "http://h:1/api/v2", "/api/v2/models"),
    ("vllm", "http://h:1", "/v1/models"),
    ("vllm", "http://h:1/v1", "/v1/models"),
    ("vllm", None, "/v1/models"),
    ("openai", None, "/v1/models"),
    ("openai", "https://proxy.example/openai/v1", "/openai/v1/models"),
    ("perplexity", None, "/models"),
    ("zai", None, "/api/paas/v4/models"),
    ("ollama", "http://h:1", "/api/tags"),
    ("ollama", "http://h:1/ollama", "/ollama/api/tags"),
    ("anthropic", None, "/v1/models"),
    ("anthropic", "http://h:1/claude", "/claude/v1/models"),
    ("azure", "https://r.openai.azure.com", "/openai/models?api-version=2024-10-21"),
]


@pytest.mark.parametrize(("provider", "base", "path"), PROBE_CASES)
def test_probe_and_traffic_paths_agree(provider: str, base: str | None, path: str) -> None:
    """The probe asks the model list where traffic goes: the same prefix as the chat endpoint's path."""
    c = InstanceConfig(name="x", provider_type=provider, api_base=base)
    request = probe_request(c, None)
    assert request is not None
    parts = urlsplit(request.url)
    assert parts.path + (f"?{parts.query}" if parts.query else "") == path
    origin = providers.base_url(c)
    assert origin is not None
    assert request.url.startswith(f"{urlsplit(origin).scheme}://")
    if provider == "azure":
        return  # deployments: /openai/deployments/<d>/... against /openai/models, both under api_base
    family = {"ollama": "ollama", "anthropic": "anthropic"}.get(provider, "openai")
    listing = {"ollama": "/api/tags", "anthropic": "/v1/models", "openai": "/models"}[family]
    endpoints = [e for e in providers.endpoints_for(c) if e.family == family]
    assert endpoints
    for endpoint in endpoints:
        suffix = endpoint.path.removeprefix("/v1") if family == "openai" else endpoint.path
        traffic_prefix = providers.upstream_path(c, endpoint).removesuffix(suffix)
        assert traffic_prefix == path.removesuffix(listing), endpoint.path


def test_probe_path_setting_and_unsupported_answers() -> None:
    c = InstanceConfig(
        name="x", provider_type="openai_compatible", api_base="http://h:1", health={"probe_path": "/healthz"}
    )
    request = probe_request(c, None)
    assert request is not None and request.url == "http://h:1/healthz"
    assert evaluate(request, 204, b"", 1.0).outcome is Outcome.OK
    plain = InstanceConfig(name="y", provider_type="openai_compatible", api_base="http://h:1")
    default = probe_request(plain, None)
    assert default is not None
    for status in (404, 405, 501):
        result = evaluate(default, status, b"", 1.0)
        assert result.outcome is Outcome.UNSUPPORTED and "probe_path" in result.detail
        assert result.http_status == status
    assert evaluate(default, 500, b"", 1.0).outcome is Outcome.FAIL
    with pytest.raises(ValueError, match="probe_path"):
        InstanceConfig(name="z", provider_type="vllm", health={"probe_path": "healthz\n"})


def test_unsupported_probes_never_change_health() -> None:
    t = tracker_with(config())
    unsupported = ProbeResult(Outcome.UNSUPPORTED, "HTTP 404", 1.0, http_status=404)
    for _ in range(POLICY.fall * 3):
        t.probe("a", unsupported, 0, 0)
    assert t.instances["a"].health is HealthStatus.UNKNOWN and not t.membership_changed


def test_http_probe_failures_never_outvote_successful_traffic() -> None:
    t = tracker_with(config())
    t.observe(record("127.0.0.0:1", 200), now_mono=100)
    http_fail = ProbeResult(Outcome.FAIL, "HTTP 500", 1.0, http_status=500)
    for i in range(POLICY.fall * 2):
        t.probe("a", http_fail, 0, 100 + i)
    assert t.instances["a"].health is HealthStatus.UNKNOWN
    assert "real traffic succeeds" in str(t.history("a")[-1]["detail"])
    # A probe that gets no HTTP answer at all still counts, and so does an HTTP failure once traffic is old.
    refused = ProbeResult(Outcome.FAIL, "refused", 1.0)
    for _ in range(POLICY.fall):
        t.probe("a", refused, 0, 101)
    # mypy keeps the narrowing from the assert above across the call in between
    assert t.instances["a"].health is HealthStatus.UNHEALTHY  # type: ignore[comparison-overlap]
    t2 = tracker_with(config())
    t2.observe(record("127.0.0.0:1", 200), now_mono=100)
    for _ in range(POLICY.fall):
        t2.probe("a", http_fail, 0, 100 + POLICY.breaker_window_s + 1)
    assert t2.instances["a"].health is HealthStatus.UNHEALTHY


def test_a_retry_after_longer_than_the_cap_is_cut_to_it() -> None:
    """ISHGW_MAX_RETRY_AFTER_S: whatever a provider (or anything in the log stream) asks, an instance is
    back after the cap; the probe's Retry-After too."""
    t = tracker_with(config())
    t.max_retry_after_s = 300
    t.observe(record("127.0.0.0:1", 429, ra="600"), now_mono=1)
    assert t.instances["a"].rate_limited_until == 1000 + 300
    t.instances["a"].rate_limited_until = 0
    t.probe("a", ProbeResult(Outcome.RATE_LIMITED, "HTTP 429", 1.0, retry_after_s=86400), now_wall=2000)
    assert t.instances["a"].rate_limited_until == 2000 + 300


def test_the_operator_lifts_a_rate_limit_and_an_open_breaker() -> None:
    t = tracker_with(config(), config("b"))
    t.observe(record("127.0.0.0:1", 429, ra="60"), now_mono=1)
    for _ in range(POLICY.breaker_consecutive_failures):
        t.observe(record("127.0.0.1:1", 502), now_mono=1)
    assert t.instances["b"].breaker.state is BreakerState.OPEN
    t.membership_changed = False
    assert t.clear("a") == ["rate limit until 1970-01-01T00:17:40+00:00"]
    assert t.membership_changed and t.state_fields("a", 1001, 1)["rate_limited_until"] is None
    assert t.clear("b", breaker=False) == [] and t.instances["b"].breaker.state is BreakerState.OPEN
    (lifted,) = t.clear("b")
    assert lifted.startswith("open breaker (3 consecutive failures")
    # mypy keeps the narrowing from the assert above across the call in between
    assert t.instances["b"].breaker.state is BreakerState.HALF_OPEN  # type: ignore[comparison-overlap]
    assert t.clear("a") == [] and t.clear("ghost") == []


def test_a_probe_that_changes_nothing_leaves_the_instance_to_the_batch() -> None:
    """Only the last-probe fields moved: `probed`, not `unsaved` (no write at the next flush); a verdict
    that changes, or a new error, is unsaved at once; the same error again is not."""
    t = tracker_with(config("a", health=HealthPolicy(rise=1, fall=2)))
    t.unsaved.clear()
    t.probe("a", ProbeResult(Outcome.OK, "ok", 3.0), 1000.0)
    assert t.unsaved == {"a"} and t.membership_changed  # unknown -> healthy
    t.unsaved.clear()
    t.probed.clear()
    t.probe("a", ProbeResult(Outcome.OK, "ok", 4.0), 1010.0)
    assert t.unsaved == set() and t.probed == {"a"}
    assert t.state_fields("a", 1010, 0)["last_probe_at"] == datetime.fromtimestamp(1010, UTC)
    t.probe("a", ProbeResult(Outcome.FAIL, "HTTP 500", 1.0), 1020.0)
    assert t.unsaved == {"a"}  # a new error
    t.unsaved.clear()
    t.probe("a", ProbeResult(Outcome.FAIL, "HTTP 500", 1.0), 1030.0)
    assert t.unsaved == {"a"}  # the second failure: fall reached, unhealthy
    t.unsaved.clear()
    t.probe("a", ProbeResult(Outcome.FAIL, "HTTP 500", 1.0), 1040.0)
    assert t.unsaved == set() and t.state_fields("a", 1040, 0)["last_error_time"] == datetime.fromtimestamp(
        1040, UTC
    )


def test_tick_watches_only_instances_with_a_timer() -> None:
    """tick() costs the pending timers, not the fleet: an instance enters `timed` with a rate limit or
    an open breaker and leaves it when the timer has run out; the expiry still changes membership."""
    t = tracker_with(config("a"), config("b"))
    assert t.timed == set()
    t.observe(record("127.0.0.0:1", 429, ra="20"), now_mono=1)
    assert t.timed == {"a"}
    t.membership_changed = False
    t.tick(now_mono=2, now_wall=1019)
    assert t.timed == {"a"} and not t.membership_changed
    t.tick(now_mono=3, now_wall=1020)
    assert t.timed == set() and t.membership_changed
    for i in range(3):
        t.observe(record("127.0.0.1:1", 502, at=1030 + i), now_mono=10 + i)
    assert t.instances["b"].breaker.state is BreakerState.OPEN and t.timed == {"b"}
    t.membership_changed = False
    t.tick(now_mono=10 + 2 + t.instances["b"].policy.breaker_cooldown_s, now_wall=1040)
    assert t.instances["b"].breaker.state is BreakerState.HALF_OPEN and t.membership_changed
    assert t.timed == set()


def test_a_restored_open_breaker_is_watched() -> None:
    t = HealthTracker()
    state = InstanceState(
        breaker_state=BreakerState.OPEN, breaker_open_until=datetime.fromtimestamp(1005, UTC)
    )
    t.sync([(config("a"), state)], {}, now_mono=0, now_wall=1000)
    assert t.timed == {"a"}
    t.tick(now_mono=5, now_wall=1005)
    assert t.instances["a"].breaker.state is BreakerState.HALF_OPEN and t.timed == set()
