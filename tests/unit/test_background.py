"""control_plane.background.running: the services' background tasks, started and stopped."""

from __future__ import annotations

import asyncio
import logging

import pytest

from control_plane.background import running, stop


class Job:
    """A job that says when it runs and when it has cleaned up after its cancellation."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cleaned_up = False

    async def __call__(self) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits: the stop must wait for its end
            self.cleaned_up = True


async def test_jobs_run_as_named_tasks_while_the_block_runs() -> None:
    a, b = Job(), Job()
    async with running({"job-a": a(), "job-b": b()}) as tasks:
        await asyncio.wait_for(asyncio.gather(a.started.wait(), b.started.wait()), 5)
        assert [t.get_name() for t in tasks] == ["job-a", "job-b"]
        assert not any(t.done() for t in tasks)
    assert all(t.cancelled() for t in tasks)
    assert a.cleaned_up and b.cleaned_up


async def test_an_error_in_the_block_stops_the_tasks_and_propagates() -> None:
    job = Job()
    with pytest.raises(RuntimeError, match="in the block"):
        async with running({"job": job()}) as tasks:
            await asyncio.wait_for(job.started.wait(), 5)
            raise RuntimeError("in the block")
    assert tasks[0].cancelled() and job.cleaned_up


async def test_tasks_a_job_spawned_are_stopped_with_it() -> None:
    spawned: set[asyncio.Task[None]] = set()
    children = [Job(), Job()]
    ready = asyncio.Event()

    async def parent() -> None:
        for child in children:
            spawned.add(asyncio.create_task(child()))
        ready.set()
        await asyncio.Event().wait()

    async with running({"parent": parent()}, spawned=lambda: list(spawned)):
        await asyncio.wait_for(ready.wait(), 5)
        await asyncio.wait_for(asyncio.gather(*(c.started.wait() for c in children)), 5)
    assert all(t.cancelled() for t in spawned)
    assert all(c.cleaned_up for c in children)


async def test_a_task_that_had_failed_is_logged_and_the_others_still_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken() -> None:
        raise ValueError("broken job")

    survivor = Job()
    with caplog.at_level(logging.ERROR, logger="control_plane.background"):
        async with running({"broken": broken(), "survivor": survivor()}) as tasks:
            await asyncio.wait_for(asyncio.wait([tasks[0]]), 5)
            await asyncio.wait_for(survivor.started.wait(), 5)
    assert survivor.cleaned_up and tasks[1].cancelled()
    assert [r.getMessage() for r in caplog.records] == ["background task broken had failed"]
    assert "broken job" in caplog.text


async def test_nothing_to_run_and_nothing_to_stop() -> None:
    async with running({}) as tasks:
        assert tasks == ()
    await stop([])


async def test_a_task_that_ended_by_itself_is_stopped_quietly(caplog: pytest.LogCaptureFixture) -> None:
    async def done() -> None:
        return None

    with caplog.at_level(logging.ERROR, logger="control_plane.background"):
        async with running({"done": done()}) as tasks:
            await asyncio.wait_for(asyncio.wait([tasks[0]]), 5)
    assert tasks[0].done() and not tasks[0].cancelled()
    assert caplog.records == []
