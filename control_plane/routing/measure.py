"""Per (model, instance) measurement windows fed by the access-log stream: what learned strategies read.
In memory, no I/O; bounded in samples per key and in age."""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from control_plane.health.logstream import LogRecord
from control_plane.health.statuses import Verdict, classify

MAX_SAMPLES = 2000  # per (model, instance)
MIN_LATENCY_SAMPLES = 3  # successful answers before a median is shown
# Answers an instance keeps past the window's horizon when the window holds fewer: an instance its weight
# starves (1-2 % of traffic) sees a handful per window, and forgetting its latency or its failures made it
# "unmeasured" again, worth the median weight, and the weights swung back and forth (a reload each time).
MIN_KEPT = 20


@dataclass(frozen=True)
class Stats:
    requests: int
    successes: int
    p50_ms: float | None
    # Where the answers reported their output tokens (at least MIN_LATENCY_SAMPLES of them): the median
    # of each answer's time per output token, and output tokens per second over those answers together.
    ms_per_token: float | None = None
    tokens_per_s: float | None = None


def per_token(answers: list[tuple[float, int]]) -> tuple[float | None, float | None]:
    """(latency ms, output tokens) of successful answers -> (median ms per token, tokens/s); answers of
    no output token (embeddings) are left out; None while fewer than MIN_LATENCY_SAMPLES remain."""
    counted = [(ms, tokens) for ms, tokens in answers if tokens > 0]
    if len(counted) < MIN_LATENCY_SAMPLES:
        return None, None
    median = statistics.median(ms / tokens for ms, tokens in counted)
    seconds = sum(ms for ms, _ in counted) / 1000
    return median, (sum(tokens for _, tokens in counted) / seconds if seconds > 0 else None)


class Windows:
    def __init__(self, max_samples: int = MAX_SAMPLES) -> None:
        self.max_samples = max_samples
        # (at, ok, latency ms, output tokens: 0 when not known)
        self._samples: dict[tuple[str, str], deque[tuple[float, bool, float, int]]] = {}
        # The pairs a measured strategy reads (forget() sets them; None: every pair). Others get no window:
        # a deque is 760 bytes before its first sample, and at 10,000 instances of default strategies each
        # one traffic reached held one until the next pass dropped it.
        self._keep: set[tuple[str, str]] | None = None

    def add(self, model: str, instance: str, at: float, ok: bool, latency_ms: float, tokens: int = 0) -> None:
        key = (model, instance)
        window = self._samples.get(key)
        if window is None:
            if self._keep is not None and key not in self._keep:
                return
            window = self._samples[key] = deque(maxlen=self.max_samples)
        window.append((at, ok, latency_ms, tokens))

    def observe(self, record: LogRecord, names: Mapping[str, str]) -> None:
        """Every attempt of one request: an answer (2xx-4xx but 429 and credential refusals) is a success
        with its upstream time, a 5xx or no answer a failure; 429s and refused credentials say nothing
        about speed and are left to the health tracker. The answer's output tokens, where its usage reported
        them, belong to the last attempt (the one that answered)."""
        self.observe_all((record,), names)

    def observe_all(self, records: Iterable[LogRecord], names: Mapping[str, str]) -> None:
        """observe() for each of the log stream's records (one drain's)."""
        if self._keep is not None and not self._keep:
            return  # no measured strategy: no window to add to (forget() dropped every other one)
        add = self.add
        good, failure = Verdict.OK, Verdict.FAILURE  # an enum's member read through its class costs ~60 ns
        for record in records:
            if not record.model:
                continue
            last = len(record.attempts) - 1
            for index, attempt in enumerate(record.attempts):
                name = names.get(attempt.address)
                status = attempt.status
                if name is None or (status is None and record.status == 499 and index == last):
                    continue
                verdict = classify(status)
                if verdict is good or verdict is failure:
                    ok = verdict is good
                    tokens = (record.completion_tokens or 0) if index == last and ok else 0
                    add(record.model, name, record.at, ok, attempt.response_ms or 0.0, tokens)

    def stats(self, model: str, instance: str, now: float, window_s: float) -> Stats:
        window = self._samples.get((model, instance))
        if not window:
            return Stats(0, 0, None)
        horizon = now - window_s
        while len(window) > MIN_KEPT and window[0][0] < horizon:
            window.popleft()
        ok = [(ms, tokens) for _, good, ms, tokens in window if good]
        p50 = statistics.median(ms for ms, _ in ok) if len(ok) >= MIN_LATENCY_SAMPLES else None
        ms_per_token, tokens_per_s = per_token(ok)
        return Stats(len(window), len(ok), p50, ms_per_token, tokens_per_s)

    def forget(self, keep: set[tuple[str, str]]) -> None:
        """Drop the windows of (model, instance) pairs no pool has any more, and measure only ``keep``."""
        self._keep = keep
        for key in [k for k in self._samples if k not in keep]:
            del self._samples[key]
