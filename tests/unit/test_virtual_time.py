"""tests/virtual_time.py: the clock jumps to the next timer when idle; work in a thread takes no time."""

from __future__ import annotations

import asyncio
import time

from tests import virtual_time


def test_an_hour_of_timers_passes_at_once_in_order() -> None:
    async def main() -> tuple[float, list[str]]:
        order: list[str] = []
        loop = asyncio.get_running_loop()
        loop.call_later(3600, order.append, "hour")
        loop.call_later(1.5, order.append, "second and a half")
        await asyncio.sleep(3600)
        return loop.time(), order

    now, order = virtual_time.run(main())
    assert now == 3600 and order == ["second and a half", "hour"]


def test_work_in_a_thread_takes_no_virtual_time() -> None:
    def work() -> str:
        time.sleep(0.05)
        return "done"

    async def main() -> tuple[str, float]:
        loop = asyncio.get_running_loop()
        # 50 ms of real work against a 10 ms virtual timeout: the clock stands still while the thread runs.
        answer = await asyncio.wait_for(asyncio.to_thread(work), timeout=0.01)
        return answer, loop.time()

    answer, now = virtual_time.run(main())
    assert answer == "done" and now == 0
