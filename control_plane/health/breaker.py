"""Circuit breaker per instance: pure transitions over an immutable value.

closed --(N consecutive failures | error rate over window | latency far above baseline)--> open
open --(cool-down elapsed)--> half_open  (served at a low weight)
half_open --(M successes)--> closed;  half_open --(failure)--> open, with a doubled cool-down (bounded)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from control_plane.registry.models import BreakerState, HealthPolicy

MAX_COOLDOWN_FACTOR = 16
BASELINE_ALPHA = 0.05  # EWMA weight of one successful latency sample


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic seconds
    ok: bool
    latency_ms: float


@dataclass(frozen=True)
class Breaker:
    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    half_open_successes: int = 0
    open_until: float = 0.0
    cooldown_factor: int = 1
    baseline_ms: float | None = None
    reason: str | None = None


def _trip(b: Breaker, now: float, policy: HealthPolicy, reason: str, factor: int) -> Breaker:
    return replace(
        b,
        state=BreakerState.OPEN,
        open_until=now + policy.breaker_cooldown_s * factor,
        cooldown_factor=factor,
        half_open_successes=0,
        reason=reason,
    )


def _learn(baseline: float | None, latency_ms: float, policy: HealthPolicy) -> float:
    """EWMA of normal latency. Degraded samples do not teach it, or it would chase the degradation."""
    if baseline is None:
        return latency_ms
    if latency_ms > baseline * policy.latency_factor:
        return baseline
    return baseline * (1 - BASELINE_ALPHA) + latency_ms * BASELINE_ALPHA


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def window_verdict(window: Iterable[Sample], baseline_ms: float | None, policy: HealthPolicy) -> str | None:
    """Why the recent window should open the breaker, or None."""
    samples = list(window)
    if len(samples) < policy.breaker_min_requests:
        return None
    failures = sum(1 for s in samples if not s.ok)
    if failures / len(samples) >= policy.breaker_error_rate:
        return f"error rate {failures}/{len(samples)} over {policy.breaker_window_s:g}s"
    latencies = [s.latency_ms for s in samples if s.ok]
    if baseline_ms and latencies:
        p50 = _median(latencies)
        if p50 > policy.latency_floor_ms and p50 > baseline_ms * policy.latency_factor:
            factor = policy.latency_factor
            return f"latency p50 {p50:.0f} ms is over {factor:g}x its baseline {baseline_ms:.0f} ms"
    return None


def observe(b: Breaker, sample: Sample, window: Iterable[Sample], policy: HealthPolicy) -> Breaker:
    """Fold one request outcome into the breaker. ``window`` includes ``sample``."""
    if b.state is BreakerState.OPEN:
        return b  # traffic that was already in flight says nothing new
    if sample.ok:
        b = replace(b, consecutive_failures=0, baseline_ms=_learn(b.baseline_ms, sample.latency_ms, policy))
        if b.state is BreakerState.HALF_OPEN:
            b = replace(b, half_open_successes=b.half_open_successes + 1)
            if b.half_open_successes >= policy.breaker_half_open_successes:
                # Recovered: whatever latency it serves at now is its new normal.
                return replace(
                    b,
                    state=BreakerState.CLOSED,
                    half_open_successes=0,
                    cooldown_factor=1,
                    reason=None,
                    baseline_ms=None,
                )
            return b
    else:
        b = replace(b, consecutive_failures=b.consecutive_failures + 1)
        if b.state is BreakerState.HALF_OPEN:
            return _trip(
                b,
                sample.at,
                policy,
                "failed while half-open",
                min(b.cooldown_factor * 2, MAX_COOLDOWN_FACTOR),
            )
        if b.consecutive_failures >= policy.breaker_consecutive_failures:
            return _trip(b, sample.at, policy, f"{b.consecutive_failures} consecutive failures", 1)
    if b.state is BreakerState.CLOSED:
        reason = window_verdict(window, b.baseline_ms, policy)
        if reason is not None:
            return _trip(b, sample.at, policy, reason, 1)
    return b


def tick(b: Breaker, now: float) -> Breaker:
    """Time passes: an open breaker whose cool-down is over lets a little traffic through."""
    if b.state is BreakerState.OPEN and now >= b.open_until:
        return replace(b, state=BreakerState.HALF_OPEN, half_open_successes=0, consecutive_failures=0)
    return b


def recover(b: Breaker) -> Breaker:
    """Active probes say the instance is back: an open breaker stops waiting out its cool-down."""
    if b.state is BreakerState.OPEN:
        return replace(
            b, state=BreakerState.HALF_OPEN, half_open_successes=0, consecutive_failures=0, cooldown_factor=1
        )
    return b
