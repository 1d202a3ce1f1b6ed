"""The suite's port allocator: blocks below the ephemeral range, one per process."""

from __future__ import annotations

import socket

from tests.ports import BLOCK, LOWEST, PortBlock, _bindable, _ephemeral_low


def test_two_allocators_get_disjoint_blocks_below_the_ephemeral_range() -> None:
    first, second = PortBlock(), PortBlock()  # two processes' allocators: the flock keeps them apart
    a = [first.take() for _ in range(5)]
    b = [second.take() for _ in range(5)]
    assert len(set(a)) == len(set(b)) == 5
    blocks = {(p - LOWEST) // BLOCK for p in a}, {(p - LOWEST) // BLOCK for p in b}
    assert len(blocks[0]) == len(blocks[1]) == 1 and blocks[0] != blocks[1]
    assert all(p < _ephemeral_low() for p in a + b)


def test_a_port_in_use_is_skipped() -> None:
    block = PortBlock()
    port = block.take()
    # The port take() would hand out next (ports of the block may be in use by a process outside the suite).
    following = next(p for p in range(port + 1, port + BLOCK) if _bindable(p))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", following))
        busy.listen()
        taken = block.take()
    assert taken != following and taken != port
