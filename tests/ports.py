"""Loopback ports for the suite's servers, free of two races that bind(("127.0.0.1", 0)) has.

A port the kernel hands out for bind(0) comes from the ephemeral range, the same range every outgoing
connection takes its local port from: between choosing a port and the server (nginx, a stand-in, pebble)
binding it, one of the thousands of client connections a load test opens can take it. And the suite runs
as two pytest processes at once (scripts/test.sh), each choosing ports.

So ports come from below the ephemeral range, in blocks: each process claims a block with an exclusive
flock on a file (released by the kernel when the process ends, however it ends) and hands out its ports
in turn, skipping any that cannot be bound right now. Standard library only: the stand-ins import it.
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
from pathlib import Path
from typing import IO

BLOCK = 400  # ports per process; a test session uses a few hundred at most at any one time
LOWEST = 10_000  # below: well-known and registered services


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class PortBlock:
    """This process's block of ports, claimed on first use."""

    def __init__(self) -> None:
        self._lock: IO[bytes] | None = None
        self._owner = -1  # the pid that claimed it: a forked child claims its own
        self._first = 0
        self._next = 0

    def _claim(self) -> None:
        blocks = list(range(LOWEST, _ephemeral_low() - BLOCK + 1, BLOCK))
        random.shuffle(blocks)
        lock_dir = Path(tempfile.gettempdir()) / "ishgw-test-ports"
        lock_dir.mkdir(exist_ok=True)
        for first in blocks:
            handle = (lock_dir / f"{first}.lock").open("ab")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            self._lock, self._first, self._next = handle, first, 0
            return
        raise RuntimeError(f"no free block of {BLOCK} test ports under {_ephemeral_low()}")

    def take(self) -> int:
        if self._owner != os.getpid():
            self._claim()
            self._owner = os.getpid()
        for _ in range(BLOCK):
            port = self._first + self._next
            self._next = (self._next + 1) % BLOCK
            if _bindable(port):
                return port
        raise RuntimeError(f"all {BLOCK} ports from {self._first} are in use")

    def take_range(self, count: int) -> range:
        for _ in range(BLOCK):
            first = self.take()
            if first + count <= self._first + BLOCK and all(map(_bindable, range(first + 1, first + count))):
                self._next = (first - self._first + count) % BLOCK
                return range(first, first + count)
        raise RuntimeError(f"no {count} consecutive free ports from {self._first}")


_BLOCK = PortBlock()


def free_port() -> int:
    """A loopback port nothing else in the suite or on the machine is about to take."""
    return _BLOCK.take()


def free_ports(count: int) -> list[int]:
    """Distinct free ports."""
    return [_BLOCK.take() for _ in range(count)]


def port_range(count: int) -> range:
    """Consecutive ports for a server that picks its own among them (a scaling group's port_min..port_max):
    taken out of this process's block, so no later free_port() hands one of them to another server."""
    return _BLOCK.take_range(count)
