"""The controller's side of the usage counters: drain nginx's pending batch into the registry, then ack it.

nginx (gw.tally) hands out the same pending batch until it is acknowledged; the registry stores each batch
id once, in the transaction of its rows. So a controller that dies after reading, or after writing but
before the ack, reads the batch again after its restart and stores it at most once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import aiohttp

from control_plane.background import running
from control_plane.metrics import GatewayMetrics
from control_plane.registry.usage import UsageStore
from control_plane.usage.model import Bucket, parse_batch

log = logging.getLogger(__name__)

DRAIN_URL = "http://ishgw-usage/_ishgw/usage"
PRUNE_INTERVAL_S = 600.0


class UsageDrain:
    def __init__(
        self,
        socket_path: str,
        usage: UsageStore,
        metrics: GatewayMetrics,
        interval_s: float,
        minute_retention_h: float,
        day_retention_d: int,
    ) -> None:
        self.socket_path = socket_path
        self.usage = usage
        self.metrics = metrics
        self.interval_s = interval_s
        self.minute_retention_h = minute_retention_h
        self.day_retention_d = day_retention_d
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()
        self._pruned_at = 0.0
        # Called with the minute buckets of every batch stored (the health service: instances' max_tpm).
        self.observers: list[Callable[[list[Bucket]], None]] = []

    def _count(self, stored: list[Bucket]) -> None:
        for b in stored:
            self.metrics.count_usage(
                b.instance, b.model, b.key, b.prompt_tokens, b.completion_tokens, b.cost_usd
            )

    async def _fetch(self, session: aiohttp.ClientSession) -> object:
        async with session.get(DRAIN_URL) as answer:
            if answer.status != 200:
                raise RuntimeError(f"usage drain answered {answer.status}: {(await answer.text())[:200]}")
            return await answer.json(content_type=None)

    async def drain_once(self) -> str:
        """One drain: "stored", "repeated" (already stored: acknowledged again), "empty" or "failed"."""
        async with self._lock:
            result = await self._drain(self._session_now())
        self.metrics.usage_drains.labels(result).inc()
        return result

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.UnixConnector(path=self.socket_path)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=10)
            )
        return self._session

    async def _drain(self, session: aiohttp.ClientSession) -> str:
        try:
            batch = parse_batch(await self._fetch(session))
        except (aiohttp.ClientError, OSError) as exc:
            log.debug("usage drain: %s", exc)  # nginx not (yet) running
            return "failed"
        except (RuntimeError, ValueError) as exc:  # BadBatch is a ValueError
            log.warning("usage drain: %s", exc)  # nginx said no (busy, its zone full) or made no sense
            return "failed"
        if batch.id is None:
            return "empty"
        stored = await asyncio.to_thread(self.usage.record, batch, datetime.now(UTC))
        if stored is not None:
            self._count(stored)
            for observer in self.observers:
                observer(stored)
        try:
            async with session.delete(f"{DRAIN_URL}/{batch.id}") as answer:
                if answer.status not in (204, 404):
                    log.warning("usage drain: ack of %s answered %s", batch.id, answer.status)
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("usage drain: ack of %s failed (read again, stored once): %s", batch.id, exc)
        return "stored" if stored is not None else "repeated"

    async def _prune(self) -> None:
        now = time.monotonic()
        if now - self._pruned_at < PRUNE_INTERVAL_S:
            return
        self._pruned_at = now
        await asyncio.to_thread(
            self.usage.prune, datetime.now(UTC), self.minute_retention_h, self.day_retention_d
        )

    async def run(self) -> None:
        while True:
            try:
                await self.drain_once()
                await self._prune()
            except Exception:
                log.exception("usage drain failed")
            await asyncio.sleep(self.interval_s)

    async def context(self) -> AsyncIterator[None]:
        """cleanup_ctx: drain every interval; once more on shutdown."""
        async with running({"usage-drain": self.run()}):
            yield
        with contextlib.suppress(Exception):
            await self.drain_once()
        if self._session is not None:
            await self._session.close()
