"""Tasks that run for as long as the app does: the body of every service's aiohttp cleanup_ctx.

async def context(self) -> AsyncIterator[None]:
    async with running({"usage-drain": self.run()}):
        yield
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

Job = Coroutine[Any, Any, object]


@contextlib.asynccontextmanager
async def running(
    jobs: Mapping[str, Job], spawned: Callable[[], Iterable[asyncio.Task[Any]]] | None = None
) -> AsyncIterator[tuple[asyncio.Task[Any], ...]]:
    """Run each job as a task named by its key while the block runs. On leaving the block (however it is
    left) cancel them, and the tasks ``spawned()`` returns then (what they started meanwhile: deliveries,
    scaling actions), and return once all have ended."""
    tasks = tuple(asyncio.create_task(job, name=name) for name, job in jobs.items())
    try:
        yield tasks
    finally:
        await stop([*tasks, *(spawned() if spawned is not None else ())])


async def stop(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended. One that had already failed is logged: its error
    must not keep the others (and what the caller closes after them) from being stopped."""
    pending = list(tasks)
    if not pending:
        return
    for task in pending:
        task.cancel()
    await asyncio.wait(pending)
    for task in pending:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s had failed", task.get_name(), exc_info=task.exception())
