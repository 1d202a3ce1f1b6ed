"""When each instance is probed next: a heap of due times (the prober's tick costs what is due, not the
fleet), with first probes spread so that a large registry does not fire at once.

A few new instances (an operator adds one) are probed within FIRST_ROUND_MIN_S; many at once (start-up,
a bulk import) are spread over up to one probe interval, at no more than FIRST_ROUND_RATE a second or the
rate their interval implies anyway, whichever is larger: the first round costs what any round costs.
Each later probe is one interval (+-10 %) after the previous one started, so the spread persists. Pure:
the clock and the random source are passed in."""

from __future__ import annotations

import heapq
import random
from collections.abc import Mapping

FIRST_ROUND_MIN_S = 1.0
FIRST_ROUND_RATE = 100.0  # new instances' first probes per second, at least
JITTER = 0.1


def first_round_window(new: int, interval_s: float) -> float:
    """The seconds over which `new` instances' first probes are spread."""
    return min(interval_s, max(FIRST_ROUND_MIN_S, new / FIRST_ROUND_RATE))


class ProbeSchedule:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._due)

    def due_at(self, name: str) -> float | None:
        return self._due.get(name)

    def sync(self, intervals: Mapping[str, float], now: float) -> None:
        """Follow the registry: forget instances gone, schedule the new ones' first probes."""
        for name in [n for n in self._due if n not in intervals]:
            del self._due[name]  # its heap entries are skipped when they surface
        new = [name for name in intervals if name not in self._due]
        for name in new:
            window = first_round_window(len(new), intervals[name])
            self._push(name, now + self._rng.uniform(0, window))
        if len(self._heap) > 2 * len(self._due) + 64:  # stale entries of removed instances
            self._heap = [(due, name) for name, due in self._due.items()]
            heapq.heapify(self._heap)

    def pop_due(self, now: float) -> list[str]:
        """The instances due at `now`, each once; the caller reschedules each (`started` or `later`)."""
        out: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, name = heapq.heappop(heap)
            if self._due.get(name) == due:
                out.append(name)
        return out

    def started(self, name: str, now: float, interval_s: float) -> None:
        """A probe of `name` started (or was skipped) at `now`: the next one is an interval later."""
        if name in self._due:
            self._push(name, now + interval_s * self._rng.uniform(1 - JITTER, 1 + JITTER))

    def later(self, name: str, at: float) -> None:
        """`name` was due but could not start (its previous probe still runs): look again at `at`."""
        if name in self._due:
            self._push(name, at)

    def _push(self, name: str, due: float) -> None:
        self._due[name] = due
        heapq.heappush(self._heap, (due, name))
