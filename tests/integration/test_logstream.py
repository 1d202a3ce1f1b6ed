"""The log receiver on a real loopback UDP socket: every datagram of a burst arrives, batches drain."""

from __future__ import annotations

import asyncio
import socket

from control_plane.health import logstream
from control_plane.health.logstream import LogRecord


def datagram(n: int) -> bytes:
    return logstream.format_line(
        msec="1700000000.5",
        request_id=f"r{n}",
        pool="p_x",
        model="m",
        status="200",
        request_time="0.012",
        upstream_addr="127.0.0.1:1",
        upstream_status="200",
        upstream_response_time="0.010",
    )


async def receive_burst(count: int) -> list[LogRecord]:
    records: list[LogRecord] = []
    receiver = await logstream.listen("127.0.0.1", 0, records.append)
    port = receiver.sock.getsockname()[1]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"not a log line", ("127.0.0.1", port))
            for n in range(count):
                sender.sendto(datagram(n), ("127.0.0.1", port))
        for _ in range(500):  # bounded wait for the condition, 10 s at most
            if len(records) >= count:
                break
            await asyncio.sleep(0.02)
    finally:
        receiver.close()
    return records


def test_a_burst_arrives_whole_and_in_order() -> None:
    records = asyncio.run(receive_burst(5000))
    assert [r.request_id for r in records] == [f"r{n}" for n in range(5000)]
    assert records[0].attempts[0].response_ms == 10.0


def test_a_handler_error_does_not_stop_the_stream() -> None:
    async def scenario() -> int:
        seen: list[str] = []

        def sink(record: LogRecord) -> None:
            seen.append(record.request_id)
            if record.request_id == "r1":
                raise RuntimeError("boom")

        receiver = await logstream.listen("127.0.0.1", 0, sink)
        port = receiver.sock.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for n in range(3):
                sender.sendto(datagram(n), ("127.0.0.1", port))
        for _ in range(500):
            if len(seen) >= 3:
                break
            await asyncio.sleep(0.02)
        receiver.close()
        return len(seen)

    assert asyncio.run(scenario()) == 3
