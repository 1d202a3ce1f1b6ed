"""The log stream's batch path (one list of records per drain of the socket) and the running counts that
spare the tracker its per-record scans: each gives what the per-record computation gave."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control_plane.health import logstream
from control_plane.health import tracker as tr
from control_plane.health import traffic as tf
from control_plane.health.logstream import Attempt, LogRecord, parse_attempts, parse_datagram
from control_plane.health.service import HealthService
from control_plane.health.traffic import TrafficSeries
from control_plane.registry.models import HealthPolicy, InstanceConfig, InstanceState
from control_plane.registry.store import Store
from control_plane.render.spec import build_spec
from scripts.bench import logreplay
from tests import virtual_time
from tests.unit.test_pass_observers import SERVER, config, world
from tests.unit.test_reconciler import make_loop


def line(n: int, status: str = "200", pool: str = "p", address: str = "127.0.0.1:1") -> bytes:
    return logstream.format_line(
        msec=f"{1_700_000_000 + n}.5",
        request_id=f"r{n}",
        pool=pool,
        model="m",
        status=status,
        request_time="0.004",
        upstream_addr=address,
        upstream_status=status,
        upstream_response_time="0.003",
    )


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


def test_a_drain_hands_the_queued_datagrams_over_as_one_list(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    batches: list[list[str]] = []
    receiver = logstream.LogReceiver(ours, lambda records: batches.append([r.request_id for r in records]))
    for n in range(3):
        theirs.send(line(n))
    theirs.send(b"not a log line")
    receiver.drain()
    assert batches == [["r0", "r1", "r2"]]
    receiver.drain()  # nothing queued: no empty batch
    assert batches == [["r0", "r1", "r2"]]


def test_a_failing_batch_sink_is_logged_and_the_receiver_goes_on(
    pair: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    ours, theirs = pair
    seen: list[int] = []

    def sink(records: Sequence[LogRecord]) -> None:
        seen.append(len(records))
        raise RuntimeError("boom")

    receiver = logstream.LogReceiver(ours, sink)
    theirs.send(line(0))
    with caplog.at_level(logging.ERROR):
        receiver.drain()
    theirs.send(line(1))
    receiver.drain()
    assert seen == [1, 1]
    assert "log record handling failed" in caplog.text


def test_parse_takes_a_value_nginx_could_not_have_written_without_an_exception() -> None:
    odd = parse_datagram(line(0, status="\u00b2"))  # a digit int() refuses: no status, no exception
    assert odd is not None and odd.status == 0 and odd.attempts[0].status is None
    number = line(0).replace(b',"200",', b",200,", 1)  # the status: escape=json writes strings only
    assert parse_datagram(number) is None


def record(at: float, status: int = 200, address: str = "127.0.0.0:1") -> LogRecord:
    return LogRecord(at, "r", "p", "m", status, 1.0, parse_attempts(address, str(status), "0.001"), "", "")


def tracker(**kw: object) -> tr.HealthTracker:
    t = tr.HealthTracker()
    cfg = InstanceConfig(name="a", provider_type="ollama", api_base="http://127.0.0.1:1", **kw)
    t.sync([(cfg, InstanceState())], {"127.0.0.0:1": "a"}, 0, 0)
    return t


@given(
    seconds=st.lists(st.integers(min_value=0, max_value=200), min_size=1, max_size=120),
    max_rpm=st.integers(min_value=1, max_value=30),
)
def test_the_rpm_budget_from_running_counts_is_the_per_record_scans(seconds: list[int], max_rpm: int) -> None:
    """Out-of-order seconds included: the running total is the buckets' sum, and the budget is what a
    rpm_free_at on every record decided."""
    t = tracker(max_rpm=max_rpm)
    entry = t.instances["a"]
    expected = 0.0
    for second in seconds:
        at = 1_000_000.0 + second + 0.25
        t.observe(record(at), now_mono=1.0)
        assert entry.per_second_total == sum(n for _, n in entry.per_second)
        free_at = tr.rpm_free_at(entry.per_second, at, max_rpm)
        if free_at is not None and free_at > expected + 0.5:
            expected = free_at
        assert entry.budget_until == expected


def test_a_busy_window_slides_as_the_list_did() -> None:
    """Past DEQUE_FROM samples the window is a deque; it holds the same samples and counts: those within
    breaker_window_s, at most WINDOW_MAX."""
    policy = HealthPolicy(breaker_window_s=10, breaker_min_requests=100_000)
    t = tracker(health=policy)
    entry = t.instances["a"]
    kept: list[tuple[float, bool]] = []
    for i in range(6000):
        now = i / 150 if i < 4000 else 4000 / 150 + (i - 4000) / 50  # 150/s (WINDOW_MAX binds), then 50/s
        status = 502 if i % 7 == 0 else 200
        t.observe(record(1000.0 + now, status), now_mono=now)
        kept.append((now, status == 200))
        kept = [s for s in kept if s[0] >= now - 10][-tr.WINDOW_MAX :]
        if i % 500 == 499:
            assert [(s.at, s.ok) for s in entry.window] == kept
            assert entry.window_failures == sum(1 for _, ok in kept if not ok)
            assert entry.window_ok_latency_ms == pytest.approx(sum(1.0 for _, ok in kept if ok))
    assert isinstance(entry.window, deque)


def test_a_failing_observer_leaves_the_others_their_records(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        service = HealthService(
            Store("sqlite://"), make_loop().reconciler, "127.0.0.1:1", probes_enabled=False
        )
        w = world((config("a", 1), InstanceState()))
        service.on_world(w, build_spec(w, SERVER))
        seen: list[int] = []

        def failing(records: Sequence[LogRecord]) -> None:
            raise RuntimeError("boom")

        service.log_observers += [failing, lambda records: seen.append(len(records))]
        records = [parse_datagram(line(n)) for n in range(5)]
        with caplog.at_level(logging.ERROR):
            service.on_logs([r for r in records if r is not None])
        assert service.records == 5 and seen == [5]
        assert service.tracker.instances["a"].total == 5
        assert "failing" in caplog.text

    asyncio.run(body())


def test_the_log_replay_bench_runs_through_the_batch_path(capsys: pytest.CaptureFixture[str]) -> None:
    """scripts.bench.logreplay (its figures are the bench's, not a test's): every record reaches the
    health service (it asserts the count), and it prints its figures."""
    assert logreplay.main(["--records", "600", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "600 records x 1 runs, batches of 150:" in out and "parse alone:" in out


ADDRESSES = ("127.0.0.1:1", "127.0.0.1:2", "10.9.9.9:80")  # the last one: no instance's
attempts_strategy = st.lists(
    st.builds(
        Attempt,
        st.sampled_from(ADDRESSES),
        st.sampled_from([200, 404, 429, 502, None]),
        st.sampled_from([None, 0.5, 3.0, 120.0, 200_000.0]),
    ),
    max_size=3,
).map(tuple)
records_strategy = st.lists(
    st.builds(
        LogRecord,
        at=st.sampled_from([1_700_000_000.5, 1_700_000_061.0, 1_700_000_400.25]),
        request_id=st.just("r"),
        pool=st.sampled_from(["p", "q", "", "-", "made-up"]),
        model=st.sampled_from(["m", "n", "", "made-up"]),
        status=st.sampled_from([200, 401, 403, 404, 429, 499, 502]),
        request_ms=st.sampled_from([0.0, 4.0, 75.0, 3000.0]),
        attempts=attempts_strategy,
        retry_after=st.just(""),
        retry_after_ms=st.just(""),
        header_ms=st.sampled_from([None, 2.0, 900.0]),
        content_type=st.sampled_from(["application/json", "text/event-stream; charset=utf-8", ""]),
    ),
    max_size=40,
)
NAMES = {"127.0.0.1:1": "a", "127.0.0.1:2": "b"}


def traffic_state(traffic: TrafficSeries) -> object:
    tables = (traffic.requests, traffic.request_duration, traffic.upstream_duration, traffic.first_byte)
    return [list(t.items()) for t in tables], traffic.retries, traffic.client_errors


def observe_each(traffic: TrafficSeries, record: LogRecord, names: dict[str, str]) -> None:
    """The request series' per-record computation (before batches were labelled per kind): the reference."""
    model = tf.bounded(record.model, traffic.models)
    attempts = record.attempts
    last = names.get(attempts[-1].address, tf.OTHER) if attempts else tf.NO_INSTANCE
    key = (tf.bounded(record.pool, traffic.pools), model, last, tf.code_class(record.status))
    traffic.requests[key] = traffic.requests.get(key, 0) + 1
    tf._histogram(traffic.request_duration, (model, last)).observe(record.request_ms / 1000)
    for attempt in attempts:
        if attempt.response_ms is not None:
            instance = names.get(attempt.address, tf.OTHER)
            tf._histogram(traffic.upstream_duration, (model, instance)).observe(attempt.response_ms / 1000)
    if len(attempts) > 1:
        traffic.retries += len(attempts) - 1
    if record.header_ms is not None and attempts and tf.is_stream(record.content_type):
        tf._histogram(traffic.first_byte, (model, last)).observe(record.header_ms / 1000)
    reason = tf.client_error_reason(record)
    if reason is not None:
        traffic.client_errors[reason] += 1


@given(records=records_strategy, size=st.integers(min_value=1, max_value=40))
def test_the_request_series_of_a_batch_are_those_of_its_records_one_by_one(
    records: list[LogRecord], size: int
) -> None:
    """Labelled once per kind of record and counted once per label set, the series hold what observing
    each record alone gave, in the same order."""
    one, batched = TrafficSeries(), TrafficSeries()
    for traffic in (one, batched):
        traffic.follow(frozenset({"p", "q"}), frozenset({"m", "n"}))
    for record in records:
        observe_each(one, record, NAMES)
    for first in range(0, len(records), size):
        batched.observe_all(records[first : first + size], NAMES)
    assert traffic_state(batched) == traffic_state(one)


def test_the_receiver_rests_its_whole_interval_unless_lines_come_fast() -> None:
    full = logstream.BATCH_INTERVAL_S
    assert logstream.rest_after(0, 0.0) == full  # no rate to go by
    assert logstream.rest_after(1, 0.0) == full
    assert logstream.rest_after(30, full) == full  # 3,000 lines/s
    assert logstream.rest_after(80, full) == full  # 8,000 lines/s: 80 in a whole rest, half a worker's room
    # 20,000 lines/s from one worker: 200 would arrive in a whole rest (a worker holds ~160)
    assert logstream.rest_after(200, full) == pytest.approx(logstream.BUSY_LINES / 20_000)
    # the same rate from four workers: each sends 5,000/s, a whole rest holds 50 of each
    assert logstream.rest_after(200, full, workers=4) == full
    assert logstream.rest_after(1, full, previous=0.0) == logstream.MIN_REST_S  # after a pause
    assert logstream.rest_after(1, full, previous=logstream.MIN_REST_S) == 2 * logstream.MIN_REST_S


@given(
    drained=st.integers(min_value=1, max_value=20_000),
    seconds=st.floats(min_value=1e-6, max_value=1.0),
    workers=st.integers(min_value=1, max_value=64),
    previous=st.floats(min_value=0.0, max_value=logstream.BATCH_INTERVAL_S),
)
def test_a_rest_lets_in_at_most_half_a_workers_room_and_at_most_doubles(
    drained: int, seconds: float, workers: int, previous: float
) -> None:
    rest = logstream.rest_after(drained, seconds, workers, previous)
    assert (
        logstream.MIN_REST_S
        <= rest
        <= min(logstream.BATCH_INTERVAL_S, max(logstream.MIN_REST_S, 2 * previous))
    )
    if rest > logstream.MIN_REST_S:  # at the last drain's rate
        assert drained / seconds * rest / workers <= logstream.CALM_LINES * (1 + 1e-9)


def test_rests_start_short_after_a_pause_and_grow_while_lines_come_slowly() -> None:
    rests = logstream.Rests()
    short = logstream.MIN_REST_S
    assert rests.after(waited=1.0, drained=1, handled=0.0) == short  # the start: a pause
    assert rests.after(waited=0.0, drained=1, handled=0.0) == 2 * short
    assert rests.after(waited=0.0, drained=1, handled=0.0) == 4 * short
    # 20,000 lines/s from one worker: only as long as lets BUSY_LINES in
    assert rests.after(waited=0.0, drained=40, handled=0.0) == pytest.approx(logstream.BUSY_LINES / 20_000)
    assert rests.after(waited=0.5, drained=1, handled=0.0) == short  # a pause: short again


def test_a_busy_workers_lines_all_reach_the_receiver(tmp_path: Path) -> None:
    """A sender at 40,000 lines/s (a busy nginx worker) from a pause, on a virtual clock (no scheduling in
    the way): with a fixed 10 ms rest 400 lines would wait in its send buffer, which holds ~160 such lines,
    and most would be lost; the receiver's rests keep it to a few dozen."""
    # a line of the bench's shape (~330 bytes): what one chat completion logs
    (datagram,) = logreplay.datagrams(1, "p_0123456789abcdef", 1_700_000_000.0)
    if os.geteuid() != 0 and int(logstream.QLEN_SYSCTL.read_text()) < 1000:
        pytest.skip("the receiver's queue (net.unix.max_dgram_qlen, 10 here) is raised only by root")
    path = tmp_path / "log.sock"
    receiver_sock = logstream.bind_unix(path, None)
    received: list[int] = []
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setblocking(False)

    async def run() -> tuple[int, int]:
        receiver = logstream.LogReceiver(receiver_sock, lambda records: received.append(len(records)))
        receiver.start()
        await asyncio.sleep(0.1)  # the receiver waits on an idle socket: then the burst
        sent = lost = 0
        try:
            for _ in range(500):  # 0.5 s: 40 lines every millisecond
                for _ in range(40):
                    try:
                        sender.sendto(datagram, str(path))
                        sent += 1
                    except BlockingIOError:  # nginx's "send() to syslog failed"
                        lost += 1
                await asyncio.sleep(0.001)
            await asyncio.sleep(logstream.BATCH_INTERVAL_S * 2)
        finally:
            receiver.close()
            sender.close()
        return sent, lost

    sent, lost = virtual_time.run(run())
    assert (sent, lost) == (20_000, 0)
    assert sum(received) == sent
    assert max(received) <= logstream.CALM_LINES  # a millisecond's 40 at most, not a pile-up


def test_one_server_registered_once_per_model_gets_each_answer_under_its_own_instance() -> None:
    """Two instances at one address, one model each: the attempts go to the instance of the pool that
    answered (logstream.pool_keyed), the tracker, the recent series and every observer alike."""

    async def body() -> None:
        service = HealthService(
            Store("sqlite://"), make_loop().reconciler, "127.0.0.1:1", probes_enabled=False
        )
        x = config("x", 7).model_copy(update={"supported_models": ["m1"]})
        y = config("y", 7).model_copy(update={"supported_models": ["m2"]})
        w = world((x, InstanceState()), (y, InstanceState()))
        spec = build_spec(w, SERVER)
        service.on_world(w, spec)
        assert service.shared == {"127.0.0.1:7"}
        pools = {p.model: p.name for p in spec.pools if p.family == "openai"}
        seen: list[Sequence[LogRecord]] = []
        service.log_observers.append(seen.append)

        def answered(pool: str, n: int) -> LogRecord:
            record = parse_datagram(line(n, pool=pool, address="127.0.0.1:7"))
            assert record is not None
            return record

        service.on_logs([answered(pools["m1"], 1), answered(pools["m2"], 2), answered(pools["m2"], 3)])
        assert (service.tracker.instances["x"].total, service.tracker.instances["y"].total) == (1, 2)
        assert [a.address for r in seen[0] for a in r.attempts] == [
            f"{pools['m1']}|127.0.0.1:7",
            f"{pools['m2']}|127.0.0.1:7",
            f"{pools['m2']}|127.0.0.1:7",
        ]
        assert service.recent.instance(pools["m2"], "y") is not None
        # An address one instance has is left as it is, and so is a batch without shared addresses.
        alone = [answered("p", 4)]
        assert logstream.pool_keyed(alone, frozenset({"10.0.0.1:1"}), {}) is alone

    asyncio.run(body())
