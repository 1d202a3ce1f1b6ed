"""The last 15 minutes of traffic per pool and per instance, minute by minute, from the access-log stream.

Pure: the caller passes each record and the address -> instance map. The status page draws its p50/p95
sparklines and requests/s from it. Per record the cost is a few dict lookups and one bisect (the log stream
runs at thousands of records a second); percentiles are read from a per-minute histogram, never from
stored samples, so memory is fixed per series.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from control_plane.health.logstream import LogRecord
from control_plane.health.statuses import Verdict, classify

MINUTES = 15
# Histogram bucket upper bounds in ms: 1 ms to 120 s, each 25 % above the last (a percentile is read as
# its bucket's upper bound: at most 25 % high). A last bucket holds everything slower.
BOUNDS: tuple[float, ...] = tuple(round(1.25**i, 3) for i in range(53))
MAX_SERIES = 4096  # pools + instances followed; the least recently fed is dropped past this


class Point(NamedTuple):
    minute: int  # unix minute (seconds // 60)
    requests: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None


_NO_COUNTS = array("I", [0]) * (len(BOUNDS) + 1)
# A minute keeps its requests' bucket numbers (a byte each) while it has at most this many, then counts per
# bucket: most series see a few requests a minute (4,096 series x 15 minutes: 61,440 minutes at most).
SPARSE_MAX = 64


class _Minute:
    """One series' minute. ``buckets``: while sparse (typecode "B"), the bucket of each request; then the
    count per bucket in 32-bit integers (216 bytes, where a list of 54 counts took 488)."""

    __slots__ = ("buckets", "errors", "minute", "requests")

    def __init__(self, minute: int) -> None:
        self.minute = minute
        self.requests = 0
        self.errors = 0
        self.buckets = array("B")

    def add(self, bucket: int) -> None:
        buckets = self.buckets
        if buckets.typecode == "B":
            if len(buckets) < SPARSE_MAX:
                buckets.append(bucket)
                return
            buckets = self.buckets = _counted(buckets)
        buckets[bucket] += 1

    def counts(self) -> array[int]:
        """The count per bucket (BOUNDS and the overflow bucket)."""
        return _counted(self.buckets) if self.buckets.typecode == "B" else self.buckets


def _counted(sparse: array[int]) -> array[int]:
    counts = array("I", _NO_COUNTS)
    for bucket in sparse:
        counts[bucket] += 1
    return counts


def percentile(buckets: Sequence[int], total: int, q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile (the last bound for the overflow bucket)."""
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(buckets):
        seen += count
        if seen >= rank and count:
            return BOUNDS[min(index, len(BOUNDS) - 1)]
    return BOUNDS[-1]


class Series:
    """One ring of MINUTES per-minute slots."""

    __slots__ = ("last_minute", "slots")

    def __init__(self) -> None:
        self.slots: list[_Minute | None] = [None] * MINUTES
        self.last_minute = 0

    def add(self, minute: int, latency_ms: float, error: bool) -> None:
        index = minute % MINUTES
        slot = self.slots[index]
        if slot is None or slot.minute != minute:
            if slot is not None and slot.minute > minute:
                return  # older than the ring (a late datagram): its minute is gone
            slot = self.slots[index] = _Minute(minute)
        slot.requests += 1
        if error:
            slot.errors += 1
        slot.add(bisect_left(BOUNDS, latency_ms))
        if minute > self.last_minute:
            self.last_minute = minute

    def points(self, now_minute: int) -> list[Point]:
        """MINUTES points, oldest first, ending with ``now_minute``; minutes without traffic have no
        latency."""
        out = []
        for minute in range(now_minute - MINUTES + 1, now_minute + 1):
            slot = self.slots[minute % MINUTES]
            if slot is None or slot.minute != minute:
                out.append(Point(minute, 0, 0, None, None))
                continue
            counts = slot.counts()
            p50 = percentile(counts, slot.requests, 0.50)
            p95 = percentile(counts, slot.requests, 0.95)
            out.append(Point(minute, slot.requests, slot.errors, p50, p95))
        return out

    def summary(self, now_minute: int) -> tuple[int, float | None, float | None]:
        """Requests, p50 and p95 over the whole ring (the last MINUTES minutes)."""
        merged = [0] * (len(BOUNDS) + 1)
        total = 0
        for slot in self.slots:
            if slot is not None and now_minute - MINUTES < slot.minute <= now_minute:
                total += slot.requests
                merged = [a + b for a, b in zip(merged, slot.counts(), strict=True)]
        return total, percentile(merged, total, 0.50), percentile(merged, total, 0.95)

    def rate(self, now: float) -> float:
        """Requests per second over the last 60 s: this minute so far plus the part of the last minute
        still inside the window (its requests assumed spread evenly)."""
        minute = int(now // 60)
        into = now - minute * 60
        total = 0.0
        for offset, share in ((0, 1.0), (1, 1.0 - into / 60)):
            slot = self.slots[(minute - offset) % MINUTES]
            if slot is not None and slot.minute == minute - offset:
                total += slot.requests * share
        return total / 60


class RecentTraffic:
    """Series per pool (the whole request, as the client saw it) and per instance within a pool (each
    upstream attempt)."""

    def __init__(self, max_series: int = MAX_SERIES) -> None:
        self.pools: dict[str, Series] = {}
        self.instances: dict[tuple[str, str], Series] = {}
        self.max_series = max_series

    def _series(self, table: dict[Any, Series], name: Any) -> Series:
        series = table.get(name)
        if series is None:
            if len(self.pools) + len(self.instances) >= self.max_series:
                self._drop_oldest()
            series = table[name] = Series()
        return series

    def _drop_oldest(self) -> None:
        tables: tuple[dict[Any, Series], ...] = (self.pools, self.instances)
        table, name = min(((t, n) for t in tables for n in t), key=lambda item: item[0][item[1]].last_minute)
        del table[name]

    def observe(self, record: LogRecord, addresses: Mapping[str, str]) -> None:
        self.observe_all((record,), addresses)

    def observe_all(self, records: Iterable[LogRecord], addresses: Mapping[str, str]) -> None:
        """The log stream's records (one drain's): each proxied request in its pool's series, each attempt
        in its instance's within the pool."""
        pools, instances = self.pools, self.instances
        failure = Verdict.FAILURE  # a local: an enum member read through its class costs ~70 ns
        for record in records:
            pool = record.pool
            if not pool or pool == "-":
                continue  # not proxied (the gateway answered itself)
            minute = int(record.at // 60)
            series = pools.get(pool) or self._series(pools, pool)
            series.add(minute, record.request_ms, classify(record.status) is failure)
            for attempt in record.attempts:
                name = addresses.get(attempt.address)
                if name is None:
                    continue
                key = (pool, name)
                series = instances.get(key) or self._series(instances, key)
                series.add(minute, attempt.response_ms or 0.0, classify(attempt.status) is failure)

    def pool(self, name: str) -> Series | None:
        return self.pools.get(name)

    def instance(self, pool: str, name: str) -> Series | None:
        return self.instances.get((pool, name))
