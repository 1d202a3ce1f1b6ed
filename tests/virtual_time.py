"""An asyncio event loop on a virtual clock, for fast tests of timing rules (debounce, intervals, timers).

Whenever nothing is ready, no socket has data and no worker thread (asyncio.to_thread) is running, the
clock jumps to the next timer instead of waiting for it: a 30 s timer passes at once, and what happens in
which order depends only on the code under test, never on how loaded the machine is. Work in a thread
takes no virtual time: the loop waits for it for real.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")


class _FastForward:
    """The loop's selector, but an idle wait moves the virtual clock instead of sleeping."""

    def __init__(self, inner: selectors.BaseSelector, loop: VirtualTimeLoop) -> None:
        self._inner = inner
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return self._inner.select(0)
        if self._loop.threads_running:
            return self._inner.select(None)  # the thread's end wakes the loop (call_soon_threadsafe)
        ready = self._inner.select(0)
        if ready or timeout is None:
            return ready or self._inner.select(None)
        self._loop.advance(timeout)
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        self.threads_running = 0
        self._selector: Any = _FastForward(self._selector, self)

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def run_in_executor(  # type: ignore[override]
        self, executor: Executor | None, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self.threads_running += 1
        future.add_done_callback(self._thread_done)
        return future

    def _thread_done(self, _future: asyncio.Future[Any]) -> None:
        self.threads_running -= 1


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on a VirtualTimeLoop (the clock starts at 0)."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)
