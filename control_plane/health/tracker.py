"""Health verdicts per instance from probes and the request log: windows, breaker, rate limits, quarantine.

The tracker is synchronous and clock-injected (easy to test); the effects around it (prober, log receiver,
flusher) feed it and persist what it decides: `unsaved` names the instances whose state changed since the
last flush, `membership_changed` says a pool's membership may differ.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from control_plane.health import breaker as br
from control_plane.health.logstream import LogRecord, retry_after_seconds
from control_plane.health.probes import Outcome, ProbeResult
from control_plane.health.statuses import Verdict, classify
from control_plane.registry.models import (
    BreakerState,
    HealthPolicy,
    HealthStatus,
    InstanceConfig,
    InstanceState,
    ObservedState,
    config_fingerprint,
)

PROBE_HISTORY = 50
# What a probe that changes no verdict moves in the instance's state (written in batches).
PROBE_FIELDS = frozenset({"last_probe_at", "probe_latency_ms", "last_error", "last_error_time"})
WINDOW_MAX = 2000
DEQUE_FROM = 64
# A 429 whose Retry-After the log line does not carry (none sent, or past a pool's last _429_<n> level).
DEFAULT_429_COOLDOWN_S = 20.0
# The longest rate limit a Retry-After may set (ISHGW_MAX_RETRY_AFTER_S): an instance comes back after this
# at the latest, whatever a provider (or anything that reached the log stream) said.
MAX_RETRY_AFTER_S = 300.0


class ProbeHistory:
    """An instance's last PROBE_HISTORY probes, compact: times and latencies in arrays of doubles, and
    (outcome, detail) pairs shared along a run of identical ones. The dicts history() answers are built
    when asked: 50 dicts with an ISO time per instance held about 21 KB of each of 10,000 instances."""

    __slots__ = ("at", "kinds", "latency")

    def __init__(self) -> None:
        self.at = array("d")  # unix seconds
        self.latency = array("d")  # ms
        self.kinds: list[tuple[Outcome, str]] = []

    def add(self, at: float, outcome: Outcome, detail: str, latency_ms: float) -> None:
        kind = (outcome, detail)
        if self.kinds and self.kinds[-1] == kind:
            kind = self.kinds[-1]
        self.at.append(at)
        self.latency.append(latency_ms)
        self.kinds.append(kind)
        if len(self.kinds) > PROBE_HISTORY:
            del self.at[0], self.latency[0], self.kinds[0]

    def __len__(self) -> int:
        return len(self.kinds)

    def __iter__(self) -> Iterator[tuple[float, Outcome, str, float]]:
        for at, (outcome, detail), latency in zip(self.at, self.kinds, self.latency, strict=True):
            yield at, outcome, detail, latency


@dataclass(slots=True)  # one per instance: slots, no per-instance __dict__ of 30 entries (~1 KB)
class InstanceHealth:
    policy: HealthPolicy
    fingerprint: str
    max_rpm: int = 0
    # Lists, not deques: an empty deque takes 760 bytes (a block of 64 slots), 20,000 of them 15 MB at
    # 10,000 instances; the oldest leave in one slice per sample (_fold, _count_second). A window that
    # slides with DEQUE_FROM samples or more becomes a deque: at WINDOW_MAX each new sample drops the oldest,
    # and a list's slice moved the other 1,999 (0.45 us a record).
    window: list[br.Sample] | deque[br.Sample] = field(default_factory=list)
    window_failures: int = 0
    window_ok_latency_ms: float = 0.0  # sum over the successful samples in the window
    recent_ms: float | None = None
    baseline_ms: float | None = None
    breaker: br.Breaker = br.CLOSED  # immutable: one shared value until the first transition
    probes: ProbeHistory = field(default_factory=ProbeHistory)
    probe_ok_streak: int = 0
    probe_fail_streak: int = 0
    health: HealthStatus = HealthStatus.UNKNOWN
    unhealthy_since: datetime | None = None
    rate_limited_until: float = 0.0  # unix seconds
    quarantined: str | None = None
    total: int = 0
    successful: int = 0
    errors: int = 0
    last_error: str | None = None
    last_error_time: datetime | None = None
    last_used_at: float = 0.0  # unix seconds
    last_traffic_ok_at: float | None = None  # monotonic: the last request this instance answered well
    discovered: tuple[str, ...] = ()
    probe_latency_ms: float | None = None
    last_probe_at: float | None = None  # unix seconds
    per_second: list[list[int]] = field(default_factory=list)  # [unix second, requests], last 60 s
    per_second_total: int = 0  # the requests in per_second: under max_rpm, no rpm_free_at to compute
    max_tpm: int = 0
    tokens: dict[int, int] = field(default_factory=dict)  # minute start -> tokens (drained usage), last two
    tokens_total: int = 0  # the tokens in ``tokens``: under max_tpm, no tpm_wait to compute
    budget_until: float = 0.0  # unix seconds: out of its pools until then, its max_rpm/max_tpm reached
    config: InstanceConfig | None = None  # the configuration last synced (the store hands out one object
    # per unchanged configuration: the same object again means nothing changed)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _count_second(buckets: list[list[int]], second: int) -> int:
    """Count a request in its second and drop the seconds 60 s older; the change of the buckets' total."""
    if buckets and buckets[-1][0] == second:
        buckets[-1][1] += 1
        if buckets[0][0] > second - 60:
            return 1  # nothing to drop (the common case: one check)
    else:
        buckets.append([second, 1])
    old, dropped = 0, 0
    while old < len(buckets) and buckets[old][0] <= second - 60:
        dropped += buckets[old][1]
        old += 1
    if old:
        del buckets[:old]
    return 1 - dropped


def rpm_free_at(per_second: Sequence[list[int]], now: float, max_rpm: int) -> float | None:
    """When fewer than max_rpm requests are left in the last 60 s (each second's requests leave the window
    60 s after it), given no new ones; None when there already are."""
    window = [(second, n) for second, n in per_second if second > now - 60]
    count = sum(n for _, n in window)
    if count < max_rpm:
        return None
    for second, n in window:
        count -= n
        if count < max_rpm:
            return second + 60.0
    return now + 60.0  # not reached: max_rpm >= 1 and the count ends at 0


def tpm_wait(prev: int, cur: int, elapsed: float, limit: int) -> float:
    """Seconds until the two-bucket sliding minute (this minute's tokens plus the previous minute's in
    proportion to its part still in the last 60 s: gw.limits' measure) holds fewer than ``limit`` tokens,
    given no new ones; 0 when it already does."""
    if cur + prev * (60 - elapsed) / 60 < limit:
        return 0.0
    if cur < limit:
        return max(0.0, 60 - elapsed - 60 * (limit - cur) / prev) + 0.001
    return (60 - elapsed) + 60 * (1 - limit / cur) + 0.001


def tokens_per_minute(tokens: dict[int, int], now: float) -> int:
    """Tokens over the last 60 s from minute buckets: this minute's, and the share of the last minute's
    still inside the window (the two-bucket approximation the limits use)."""
    minute = int(now) // 60 * 60
    previous_share = max(0.0, 1 - (now - minute) / 60)
    return round(tokens.get(minute, 0) + tokens.get(minute - 60, 0) * previous_share)


def _has_timer(entry: InstanceHealth) -> bool:
    """Whether tick() may change the entry: an open breaker, a rate limit or a rate budget runs out."""
    return bool(entry.rate_limited_until or entry.budget_until or entry.breaker.state is BreakerState.OPEN)


def _forget(entry: InstanceHealth, sample: br.Sample) -> None:
    if sample.ok:
        entry.window_ok_latency_ms -= sample.latency_ms
    else:
        entry.window_failures -= 1


def _slide(
    entry: InstanceHealth, window: list[br.Sample], horizon: float
) -> list[br.Sample] | deque[br.Sample]:
    """Drop the list window's samples older than ``horizon`` and those past WINDOW_MAX less one; the window
    (a deque from DEQUE_FROM samples: O(1) drops from the front)."""
    if len(window) >= DEQUE_FROM:
        slid = entry.window = deque(window)
        while slid and (slid[0].at < horizon or len(slid) >= WINDOW_MAX):
            _forget(entry, slid.popleft())
        return slid
    old, left = 0, len(window)
    while old < len(window) and (window[old].at < horizon or left >= WINDOW_MAX):
        _forget(entry, window[old])
        old, left = old + 1, left - 1
    del window[:old]
    return window


def _adopt(entry: InstanceHealth, state: InstanceState, now_mono: float, now_wall: float) -> InstanceHealth:
    """Start from what the store says, so a controller restart keeps every verdict."""
    entry.health, entry.unhealthy_since = state.health_status, state.unhealthy_since
    entry.total, entry.successful, entry.errors = (
        state.total_requests,
        state.successful_requests,
        state.error_count,
    )
    entry.last_error, entry.last_error_time = state.last_error, state.last_error_time
    entry.last_used_at = state.last_used.timestamp() if state.last_used else 0.0
    entry.discovered = tuple(state.discovered_models)
    if state.rate_limited_until is not None:
        entry.rate_limited_until = state.rate_limited_until.timestamp()
    if state.rate_budget_until is not None:
        entry.budget_until = state.rate_budget_until.timestamp()
    if state.quarantined_reason and state.quarantine_config == entry.fingerprint:
        entry.quarantined = state.quarantined_reason
    if state.breaker_state is BreakerState.OPEN and state.breaker_open_until is not None:
        left = state.breaker_open_until.timestamp() - now_wall
        entry.breaker = br.Breaker(state=BreakerState.OPEN, open_until=now_mono + left, reason="restored")
    elif state.breaker_state is BreakerState.HALF_OPEN:
        entry.breaker = br.Breaker(state=BreakerState.HALF_OPEN)
    if entry.health is HealthStatus.HEALTHY:
        entry.probe_ok_streak = entry.policy.rise
    elif entry.health is HealthStatus.UNHEALTHY:
        entry.probe_fail_streak = entry.policy.fall
    return entry


def _attempt_retry_after(record: LogRecord, index: int) -> float | None:
    """Seconds an attempt's 429 asked for, where the log line kept its headers: the last attempt's, and
    those nginx handed to a pool's _429_<n> location; None for a 429 retried in place."""
    if index == len(record.attempts) - 1:
        return retry_after_seconds(record.retry_after, record.retry_after_ms, record.at)
    for limited in record.limited:
        if limited.attempt == index:
            return retry_after_seconds(limited.retry_after, limited.retry_after_ms, record.at)
    return None


class HealthTracker:
    def __init__(self, max_retry_after_s: float = MAX_RETRY_AFTER_S) -> None:
        self.max_retry_after_s = max_retry_after_s
        self.instances: dict[str, InstanceHealth] = {}
        self.addresses: dict[str, str] = {}
        # Two flags the effects around the tracker read and reset: a verdict that may change a pool's
        # membership (reconcile), and the instances whose observed state the store has not got yet (flush).
        self.membership_changed = False
        self.unsaved: set[str] = set()
        # Probed with nothing else changed: only the last-probe fields differ from the store's, written in
        # a batch now and then (a probe that changes no verdict writes nothing at once).
        self.probed: set[str] = set()
        # The instances with a timer tick() must watch (open breaker, rate limit, rate budget): tick costs
        # what is pending, not the fleet.
        self.timed: set[str] = set()

    # --- registry view ----------------------------------------------------------------------------
    def sync(
        self,
        instances: list[tuple[InstanceConfig, InstanceState]],
        addresses: dict[str, str],
        now_mono: float,
        now_wall: float,
    ) -> None:
        """Follow the registry: a new entry adopts the stored verdicts (a restart changes nothing);
        a changed configuration lifts a quarantine."""
        self.addresses = dict(addresses)
        current = {c.name: (c, s) for c, s in instances}
        for name in list(self.instances):
            if name not in current:
                del self.instances[name]
        for name, (config, state) in current.items():
            entry = self.instances.get(name)
            if entry is not None and entry.config is config:
                continue  # the store's cached object: unchanged, no fingerprint to hash (10,000 a pass)
            fingerprint = config_fingerprint(config)
            if entry is None:
                entry = _adopt(InstanceHealth(config.health, fingerprint), state, now_mono, now_wall)
                self.instances[name] = entry
                self._watch(name, entry)
            elif entry.fingerprint != fingerprint:
                entry.policy, entry.fingerprint = config.health, fingerprint
                if entry.quarantined:
                    entry.quarantined = None
                    self._mark(name, membership=True)
            entry.max_rpm, entry.max_tpm = config.max_rpm, config.max_tpm
            entry.config = config

    def _mark(self, name: str, membership: bool = False) -> None:
        self.unsaved.add(name)
        self.membership_changed = self.membership_changed or membership

    def _watch(self, name: str, entry: InstanceHealth) -> None:
        """Let tick() see the entry while it has a timer running."""
        if _has_timer(entry):
            self.timed.add(name)

    # --- passive: the request log ------------------------------------------------------------------
    def observe(self, record: LogRecord, now_mono: float) -> None:
        self.observe_all((record,), now_mono)

    def observe_all(self, records: Iterable[LogRecord], now_mono: float) -> None:
        """The log stream's records (one drain's), each attempt against the instance its address names.
        The common attempt (an answer, under its instance's rate limits) calls only classify and _fold."""
        addresses, instances, unsaved = self.addresses, self.instances, self.unsaved
        fold, sample = self._fold, br.Sample
        # Locals: an enum member read through its class costs ~70 ns, a local ~5.
        ok, failure, limited = Verdict.OK, Verdict.FAILURE, Verdict.RATE_LIMITED
        for record in records:
            attempts = record.attempts
            last = len(attempts) - 1
            at = record.at
            second = int(at)
            for index, attempt in enumerate(attempts):
                name = addresses.get(attempt.address)
                entry = instances.get(name) if name else None
                if entry is None or name is None:
                    continue
                status = attempt.status
                if status is None and record.status == 499 and index == last:
                    continue  # the client gave up first: that says nothing about the instance
                verdict = classify(status)
                entry.total += 1
                entry.per_second_total += _count_second(entry.per_second, second)
                max_rpm, max_tpm = entry.max_rpm, entry.max_tpm
                if max_rpm and (
                    entry.per_second_total >= max_rpm or (max_tpm and entry.tokens_total >= max_tpm)
                ):  # below both, _rate_budget finds nothing: each limit counts at most these totals
                    self._rate_budget(name, entry, at)
                entry.last_used_at = at
                unsaved.add(name)
                if verdict is ok:
                    entry.successful += 1
                    entry.last_traffic_ok_at = now_mono
                    fold(name, entry, sample(now_mono, True, attempt.response_ms or 0.0))
                elif verdict is failure:
                    entry.errors += 1
                    entry.last_error = f"HTTP {status}" if status else "no response"
                    entry.last_error_time = _utc(at)
                    fold(name, entry, sample(now_mono, False, attempt.response_ms or 0.0))
                elif verdict is limited:
                    self._rate_limit(name, entry, at, _attempt_retry_after(record, index))
                else:  # Verdict.CREDENTIAL
                    entry.quarantined = f"credential rejected (HTTP {status})"
                    entry.last_error, entry.last_error_time = entry.quarantined, _utc(at)
                    self._mark(name, membership=True)

    def _fold(self, name: str, entry: InstanceHealth, sample: br.Sample) -> None:
        """Slide the window (O(1) amortised: running counts, no copies) and step the breaker."""
        window = entry.window
        policy = entry.policy
        horizon = sample.at - policy.breaker_window_s
        if window and (window[0].at < horizon or len(window) >= WINDOW_MAX):
            if isinstance(window, deque):  # a busy instance's: a sample leaves as each one comes
                while window and (window[0].at < horizon or len(window) >= WINDOW_MAX):
                    _forget(entry, window.popleft())
            else:
                window = _slide(entry, window, horizon)
        window.append(sample)
        if sample.ok:
            latency = sample.latency_ms
            entry.window_ok_latency_ms += latency
            entry.recent_ms = br.ewma(entry.recent_ms, latency, br.RECENT_ALPHA)
            entry.baseline_ms = br.learn_baseline(entry.baseline_ms, latency, policy)
        else:
            entry.window_failures += 1
        before = entry.breaker
        entry.breaker = br.observe_counts(
            before, sample, len(window), entry.window_failures, entry.recent_ms, entry.baseline_ms, policy
        )
        if entry.breaker.state is not before.state:
            if entry.breaker.state is BreakerState.CLOSED:
                # Recovered: the latency it serves at now is its new normal.
                window.clear()
                entry.window_failures, entry.window_ok_latency_ms = 0, 0.0
                entry.baseline_ms = entry.recent_ms
            self._mark(name, membership=True)
            self._watch(name, entry)

    # --- the instance's own max_rpm / max_tpm ---------------------------------------------------------
    def add_tokens(self, name: str, minute: int, tokens: int, now_wall: float) -> None:
        """Drained usage (a minute bucket of the instance's tokens) toward its max_tpm."""
        entry = self.instances.get(name)
        if entry is None or tokens <= 0:
            return
        entry.tokens[minute] = entry.tokens.get(minute, 0) + tokens
        for old in [m for m in entry.tokens if m < now_wall - 120]:
            del entry.tokens[old]
        entry.tokens_total = sum(entry.tokens.values())
        if entry.max_tpm:
            self._rate_budget(name, entry, now_wall)

    def _rate_budget(self, name: str, entry: InstanceHealth, now: float) -> None:
        """Out of its pools (reason rate_limit_budget) until its measured rate is below its limits."""
        free_at = rpm_free_at(entry.per_second, now, entry.max_rpm) if entry.max_rpm else None
        if entry.max_tpm:
            minute = int(now) // 60 * 60
            cur, prev = entry.tokens.get(minute, 0), entry.tokens.get(minute - 60, 0)
            wait = tpm_wait(prev, cur, now - minute, entry.max_tpm)
            if wait > 0:
                free_at = max(free_at or 0.0, now + wait)
        if free_at is not None and free_at > entry.budget_until + 0.5:
            if not entry.budget_until:
                self._mark(name, membership=True)
            entry.budget_until = free_at
            self.unsaved.add(name)
            self.timed.add(name)

    def _rate_limit(self, name: str, entry: InstanceHealth, at: float, wait: float | None) -> None:
        until = at + min(wait if wait is not None else DEFAULT_429_COOLDOWN_S, self.max_retry_after_s)
        if until > entry.rate_limited_until + 0.5:
            self._limit_until(name, entry, at, until)

    def _limit_until(self, name: str, entry: InstanceHealth, at: float, until: float) -> None:
        entry.rate_limited_until = until
        self.timed.add(name)
        entry.last_error, entry.last_error_time = "HTTP 429", _utc(at)
        self._mark(name, membership=True)

    # --- the operator -----------------------------------------------------------------------------
    def clear(self, name: str, breaker: bool = True) -> list[str]:
        """The operator says the instance may serve (state active, or an explicit check): lift its rate
        limit and, with ``breaker``, let an open breaker through (half-open: a trickle of traffic that
        closes it again). Returns what was lifted, for the log."""
        entry = self.instances.get(name)
        if entry is None:
            return []
        lifted = []
        if entry.rate_limited_until:
            lifted.append(f"rate limit until {_utc(entry.rate_limited_until).isoformat()}")
            entry.rate_limited_until = 0.0
        if breaker and entry.breaker.state is BreakerState.OPEN:
            lifted.append(f"open breaker ({entry.breaker.reason or 'no reason'})")
            entry.breaker = br.recover(entry.breaker)
        if lifted:
            self._mark(name, membership=True)
        return lifted

    # --- active: probes ---------------------------------------------------------------------------
    def probe(self, name: str, result: ProbeResult, now_wall: float, now_mono: float | None = None) -> None:
        entry = self.instances.get(name)
        if entry is None:
            return
        if result.outcome is Outcome.FAIL and self._traffic_vouches(entry, result, now_mono):
            result = dataclasses.replace(
                result, outcome=Outcome.UNSUPPORTED, detail=f"{result.detail}; ignored: real traffic succeeds"
            )
        entry.probes.add(now_wall, result.outcome, result.detail, round(result.latency_ms, 2))
        entry.probe_latency_ms, entry.last_probe_at = result.latency_ms, now_wall
        self.probed.add(name)
        if result.outcome is Outcome.UNSUPPORTED:
            return  # neither healthy nor unhealthy: the log stream's verdict decides
        if result.outcome is Outcome.RATE_LIMITED:
            self._rate_limit(name, entry, now_wall, result.retry_after_s)
            return
        if result.outcome is Outcome.CREDENTIAL:
            if entry.quarantined is None:
                entry.quarantined = result.detail
                self._mark(name, membership=True)
            return
        ok = result.outcome is Outcome.OK
        if ok:
            if result.listed and result.models != entry.discovered:
                # A model that appeared or went away changes the pools of a discovering instance.
                entry.discovered = result.models
                self._mark(name, membership=True)
            entry.probe_ok_streak += 1
            entry.probe_fail_streak = 0
            if entry.quarantined:
                entry.quarantined = None
                self._mark(name, membership=True)
        else:
            entry.probe_fail_streak += 1
            entry.probe_ok_streak = 0
            error = f"probe: {result.detail}"
            if error != entry.last_error:
                self.unsaved.add(name)  # a new error is news; the same one again waits for the batch
            entry.last_error, entry.last_error_time = error, _utc(now_wall)
        self._probe_verdict(name, entry, now_wall)

    @staticmethod
    def _traffic_vouches(entry: InstanceHealth, result: ProbeResult, now_mono: float | None) -> bool:
        """An HTTP-level probe failure never outvotes real traffic that succeeded in the same window
        (a probe that cannot reach the instance at all still counts)."""
        if result.http_status is None or now_mono is None or entry.last_traffic_ok_at is None:
            return False
        return now_mono - entry.last_traffic_ok_at <= entry.policy.breaker_window_s

    def _probe_verdict(self, name: str, entry: InstanceHealth, now_wall: float) -> None:
        if entry.health is not HealthStatus.HEALTHY and entry.probe_ok_streak >= entry.policy.rise:
            entry.health, entry.unhealthy_since = HealthStatus.HEALTHY, None
            entry.breaker = br.recover(entry.breaker)
            self._mark(name, membership=True)
        elif entry.health is not HealthStatus.UNHEALTHY and entry.probe_fail_streak >= entry.policy.fall:
            entry.health, entry.unhealthy_since = HealthStatus.UNHEALTHY, _utc(now_wall)
            self._mark(name, membership=True)

    # --- time -------------------------------------------------------------------------------------
    def tick(self, now_mono: float, now_wall: float) -> None:
        for name in list(self.timed):
            entry = self.instances.get(name)
            if entry is None:
                self.timed.discard(name)
                continue
            before = entry.breaker.state
            entry.breaker = br.tick(entry.breaker, now_mono)
            if entry.breaker.state is not before:
                self._mark(name, membership=True)
            if entry.rate_limited_until and now_wall >= entry.rate_limited_until:
                entry.rate_limited_until = 0.0
                self._mark(name, membership=True)
            if entry.budget_until and now_wall >= entry.budget_until:
                entry.budget_until = 0.0
                self._mark(name, membership=True)
            if not _has_timer(entry):
                self.timed.discard(name)

    # --- views ------------------------------------------------------------------------------------
    def state_fields(self, name: str, now_wall: float, now_mono: float) -> dict[str, object]:
        """The observed state (ObservedState's fields) as this tracker knows it."""
        entry = self.instances[name]
        minute = int(now_wall) - 60
        rpm = sum(count for second, count in entry.per_second if second > minute)
        ok_samples = len(entry.window) - entry.window_failures
        open_left = entry.breaker.open_until - now_mono
        return {
            "health_status": entry.health,
            "unhealthy_since": entry.unhealthy_since,
            "error_count": entry.errors,
            "last_error": entry.last_error,
            "last_error_time": entry.last_error_time,
            "rate_limited_until": _utc(entry.rate_limited_until) if entry.rate_limited_until else None,
            "rate_budget_until": _utc(entry.budget_until) if entry.budget_until else None,
            "current_rpm": rpm,
            "current_tpm": tokens_per_minute(entry.tokens, now_wall),
            "total_requests": entry.total,
            "successful_requests": entry.successful,
            "last_used": _utc(entry.last_used_at) if entry.last_used_at else None,
            "avg_latency_ms": round(entry.window_ok_latency_ms / ok_samples, 2) if ok_samples else 0.0,
            "discovered_models": list(entry.discovered),
            "breaker_state": entry.breaker.state,
            "breaker_open_until": _utc(now_wall + open_left)
            if entry.breaker.state is BreakerState.OPEN
            else None,
            "quarantined_reason": entry.quarantined,
            "quarantine_config": entry.fingerprint if entry.quarantined else None,
            "last_probe_at": _utc(entry.last_probe_at) if entry.last_probe_at is not None else None,
            "probe_latency_ms": entry.probe_latency_ms,
        }

    def probe_fields(self, name: str) -> dict[str, object]:
        """The fields a probe that changed nothing else moved, JSON-ready (Store.patch_probe_fields)."""
        entry = self.instances[name]
        fields = ObservedState(
            last_probe_at=_utc(entry.last_probe_at) if entry.last_probe_at is not None else None,
            probe_latency_ms=entry.probe_latency_ms,
            last_error=entry.last_error,
            last_error_time=entry.last_error_time,
        )
        return fields.model_dump(mode="json", include=set(PROBE_FIELDS))

    def history(self, name: str) -> list[dict[str, object]]:
        entry = self.instances.get(name)
        if entry is None:
            return []
        return [
            {"at": _utc(at).isoformat(), "outcome": str(outcome), "detail": detail, "latency_ms": latency}
            for at, outcome, detail, latency in entry.probes
        ]

    def breaker_reason(self, name: str) -> str | None:
        entry = self.instances.get(name)
        return entry.breaker.reason if entry else None
