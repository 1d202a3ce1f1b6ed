"""The log receiver on real sockets (unix datagram, the default, and loopback UDP): every datagram of a burst
arrives, batches drain."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import stat
from pathlib import Path

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


async def receive_burst(count: int, address: str) -> list[LogRecord]:
    records: list[LogRecord] = []
    receiver = await logstream.listen(address, records.append)
    family = socket.AF_UNIX if address.startswith("unix:") else socket.AF_INET

    def send_all() -> None:  # in a thread: a unix socket's sender blocks while the queue is full
        with socket.socket(family, socket.SOCK_DGRAM) as sender:
            sender.connect(receiver.sock.getsockname())
            sender.send(b"not a log line")
            for n in range(count):
                sender.send(datagram(n))

    try:
        await asyncio.to_thread(send_all)
        for _ in range(500):  # bounded wait for the condition, 10 s at most
            if len(records) >= count:
                break
            await asyncio.sleep(0.02)
    finally:
        receiver.close()
    return records


def test_a_burst_arrives_whole_and_in_order_over_udp() -> None:
    records = asyncio.run(receive_burst(5000, "127.0.0.1:0"))
    assert [r.request_id for r in records] == [f"r{n}" for n in range(5000)]
    assert records[0].attempts[0].response_ms == 10.0


def test_a_burst_arrives_whole_over_the_unix_socket(tmp_path: Path) -> None:
    """A blocking sender (as fast as the receiver drains) loses nothing."""
    records = asyncio.run(receive_burst(5000, f"unix:{tmp_path / 'log.sock'}"))
    assert [r.request_id for r in records] == [f"r{n}" for n in range(5000)]


def test_the_unix_socket_queues_more_than_the_kernel_default(tmp_path: Path) -> None:
    """Unread, the socket takes what one sender's buffer holds (~160 lines), not 10."""
    path = tmp_path / "log.sock"
    sock = logstream.bind(f"unix:{path}")
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # no group given: the owner alone
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(str(path))
            sender.setblocking(False)
            sent = 0
            with contextlib.suppress(BlockingIOError):
                for n in range(1000):
                    sender.send(datagram(n))
                    sent += 1
        assert sent > 100, sent
        assert int(logstream.QLEN_SYSCTL.read_text()) < logstream.UNIX_QUEUE_LEN  # put back at once
    finally:
        sock.close()


def test_a_handler_error_does_not_stop_the_stream() -> None:
    async def scenario() -> int:
        seen: list[str] = []

        def sink(record: LogRecord) -> None:
            seen.append(record.request_id)
            if record.request_id == "r1":
                raise RuntimeError("boom")

        receiver = await logstream.listen("127.0.0.1:0", sink)
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
