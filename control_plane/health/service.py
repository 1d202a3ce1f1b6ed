"""Effects around the HealthTracker: the prober loop, the log stream sink, and the state flusher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from control_plane.background import running
from control_plane.health import logstream
from control_plane.health.http_probe import ProbeClient, ProtocolError
from control_plane.health.logstream import LogRecord, pool_keyed
from control_plane.health.probes import Outcome, ProbeResult, evaluate, probe_request
from control_plane.health.recent import RecentTraffic
from control_plane.health.schedule import ProbeSchedule
from control_plane.health.statuses import classify
from control_plane.health.tracker import MAX_RETRY_AFTER_S, HealthTracker
from control_plane.health.traffic import TrafficSeries
from control_plane.metrics import GatewayMetrics
from control_plane.reconciler import Reconciler
from control_plane.registry.models import InstanceConfig
from control_plane.registry.store import Store
from control_plane.render.spec import GatewaySpec, World, same_configs
from control_plane.usage.model import Bucket

log = logging.getLogger(__name__)

MAX_PROBES_IN_FLIGHT = 64
PROBE_BODY_LIMIT = 1 << 20  # a model list longer than this is read this far
SCHEDULER_TICK_S = 0.25
FLUSH_INTERVAL_S = 0.5
FLUSH_GAP_S = 0.1  # the least time between two flushes, however often verdicts change
# Probes that changed nothing but their last-probe fields (last_probe_at, probe_latency_ms, the time of a
# repeated error) reach the store in small batches, at most this many rows a second: a probe that changes
# no verdict writes nothing at once, and the batch never holds the registry's write lock for long (at
# 10,000 instances each one's last-probe fields are at most about 40 s old; at a few hundred, 1 s).
PROBED_ROWS_PER_S = 250.0
OUTCOME_LABELS = {outcome: str(outcome) for outcome in Outcome}  # one label string each, shared by the series


def _failed(consumer: str) -> None:
    """One consumer of a drain's records failed (logged with its traceback); the stream and the others go
    on."""
    log.exception("log records: %s failed", consumer)


class HealthService:
    def __init__(
        self,
        store: Store,
        reconciler: Reconciler,
        log_address: str,
        probes_enabled: bool = True,
        metrics: GatewayMetrics | None = None,
        log_group: int | None = None,
        max_retry_after_s: float = MAX_RETRY_AFTER_S,
        nginx_workers: int = 1,
    ) -> None:
        self.metrics = metrics
        self.nginx_workers = nginx_workers  # how many send log lines: the receiver's rests follow
        self.store = store
        self.reconciler = reconciler
        self.log_address = log_address
        self.log_group = log_group  # the nginx workers' group: the only one that may write to a unix socket
        self.probes_enabled = probes_enabled
        self.tracker = HealthTracker(max_retry_after_s)
        self.configs: dict[str, InstanceConfig] = {}
        self.secrets: dict[str, str] = {}
        self._world: World | None = None  # the last pass's (on_world)
        # Addresses whose pools name different instances (spec.pool_keyed_addresses): logstream.pool_keyed.
        self.shared: frozenset[str] = frozenset()
        self.schedule = ProbeSchedule()
        self._in_flight: set[str] = set()
        self._probe_tasks: set[asyncio.Task[None]] = set()  # the workers: cancelled on exit
        self._queue: asyncio.Queue[str] = asyncio.Queue()  # names due, for the workers (one entry each)
        self._limit = asyncio.Semaphore(MAX_PROBES_IN_FLIGHT)
        self._client: ProbeClient | None = None
        # Set when a verdict may change membership: the flusher acts at once instead of at its next tick,
        # so a rate-limited or failing instance leaves its pools sooner.
        self._verdict = asyncio.Event()
        self.records = 0
        self.recent = RecentTraffic()  # the status page's last 15 minutes
        self._probed_saved_at = time.monotonic()
        self._flushing = asyncio.Lock()  # the flusher and an operator's check write one after the other
        # Others that read the log stream, called with each drain's records (the routing weights'
        # measurements, the autoscaler's members' traffic).
        self.log_observers: list[Callable[[Sequence[LogRecord]], None]] = []
        self.traffic = TrafficSeries()
        if metrics is not None:
            metrics.registry.register(self.traffic)
        reconciler.observers.append(self.on_world)

    # --- registry view, called by the reconciler after each pass ----------------------------------
    def on_world(self, world: World, spec: GatewaySpec) -> None:
        self.secrets = dict(world.secrets)
        if same_configs(self._world, world):
            # Only states changed (a health verdict): the configurations, the tracker's entries and the
            # probe schedule are as the last pass left them; the pools' addresses may have moved. (At
            # 10,000 instances the rest cost ~50 ms a pass, before nginx got the change.)
            self.tracker.addresses = spec.address_names()
        else:
            self.configs = {c.name: c for c, _ in world.instances}
            self.tracker.sync(list(world.instances), spec.address_names(), time.monotonic(), time.time())
            # First probes soon for a few new instances, spread over the interval for many (schedule.py).
            self.schedule.sync(
                {n: c.health.probe_interval_s for n, c in self.configs.items()}, time.monotonic()
            )
        self._world = world
        self.shared = spec.pool_keyed_addresses()
        self.traffic.follow(frozenset(p.name for p in spec.pools), frozenset(p.model for p in spec.pools))

    # --- passive ----------------------------------------------------------------------------------
    def on_log(self, record: LogRecord) -> None:
        self.on_logs((record,))

    def on_logs(self, records: Sequence[LogRecord]) -> None:
        """One drain of the log stream (the receiver's sink): each consumer takes the records at once, with
        its lookups made once; one that fails leaves the others their records."""
        self.records += len(records)
        tracker = self.tracker
        addresses = tracker.addresses
        if self.shared:
            records = pool_keyed(records, self.shared, addresses)
        # A try per consumer, written out: a helper taking *args cost more than a small batch's records.
        try:
            tracker.observe_all(records, time.monotonic())
        except Exception:
            _failed("the health tracker")
        try:
            self.recent.observe_all(records, addresses)
        except Exception:
            _failed("recent traffic")
        for observer in self.log_observers:
            try:
                observer(records)
            except Exception:
                _failed(getattr(observer, "__qualname__", repr(observer)))
        if tracker.membership_changed:
            self._verdict.set()
        if self.metrics is not None:
            self.metrics.log_records.inc(len(records))
            try:
                self._count_attempts(records, addresses)
                self.traffic.observe_all(records, addresses)
            except Exception:
                _failed("the request series")

    def _count_attempts(self, records: Sequence[LogRecord], addresses: Mapping[str, str]) -> None:
        """ishgw_upstream_attempts_total: counted here, added to the family once per label set."""
        assert self.metrics is not None
        counts: dict[tuple[str, str], int] = {}
        for record in records:
            for attempt in record.attempts:
                name = addresses.get(attempt.address)
                if name is not None:
                    labels: tuple[str, str] = (name, classify(attempt.status))
                    counts[labels] = counts.get(labels, 0) + 1
        inc = self.metrics.upstream_attempts.inc
        for labels, count in counts.items():
            inc(labels, count)

    def on_usage(self, stored: list[Bucket]) -> None:
        """Drained usage (minute buckets) toward the instances' max_tpm."""
        now = time.time()
        for b in stored:
            self.tracker.add_tokens(b.instance, b.start, b.prompt_tokens + b.completion_tokens, now)
        if self.tracker.membership_changed:
            self._verdict.set()

    # --- active -----------------------------------------------------------------------------------
    async def probe_now(self, name: str) -> ProbeResult:
        """An operator's explicit check. Unless the instance answers 429 again, it lifts a rate limit (and,
        when the probe succeeds, an open breaker): the operator asked, the instance answered."""
        config = self.configs.get(name)
        if config is None:
            fresh = await asyncio.to_thread(self.store.get_instance, name)  # raises NotFound
            config = fresh[0]
        result = await self._probe(config, queue=False)
        if result.outcome is not Outcome.RATE_LIMITED:
            self.clear(name, f"explicit check ({result.detail})", breaker=result.outcome is Outcome.OK)
        self._record_probe(name, result)
        return result

    def clear(self, name: str, why: str, breaker: bool = True) -> None:
        """Lift the instance's rate limit (and open breaker) on an operator's word, and say so in the log."""
        lifted = self.tracker.clear(name, breaker)
        if lifted:
            log.info("instance %s: %s lifted by the operator: %s", name, " and ".join(lifted), why)
            self._verdict.set()

    def _record_probe(self, name: str, result: ProbeResult) -> None:
        self.tracker.probe(name, result, time.time(), time.monotonic())
        if self.tracker.membership_changed:
            self._verdict.set()
        if self.metrics is not None:
            self.metrics.probes.inc((name, OUTCOME_LABELS[result.outcome]))

    async def probe_config(self, config: InstanceConfig) -> ProbeResult:
        """One probe of ``config`` (registered or not: the autoscaler's readiness check), not recorded."""
        return await self._probe(config)

    async def _probe(self, config: InstanceConfig, queue: bool = True) -> ProbeResult:
        """One probe. ``queue``: wait for a place among MAX_PROBES_IN_FLIGHT (the autoscaler's readiness
        checks); the prober's workers (as many as that) and an operator's check do not."""
        request = probe_request(config, self.secrets.get(config.name))
        if request is None:
            return ProbeResult(Outcome.FAIL, "no api_base configured", 0.0)
        assert self._client is not None
        timeout = config.health.probe_timeout_s
        started = time.perf_counter()
        async with self._limit if queue else contextlib.nullcontext():
            try:
                response = await self._client.get(request.url, request.headers, timeout, PROBE_BODY_LIMIT)
            except TimeoutError:
                latency = (time.perf_counter() - started) * 1000
                return ProbeResult(Outcome.FAIL, f"TimeoutError: no answer within {timeout:g} s", latency)
            except (ProtocolError, OSError, ValueError) as exc:
                latency = (time.perf_counter() - started) * 1000
                return ProbeResult(Outcome.FAIL, f"{type(exc).__name__}: {exc}"[:200], latency)
        latency = (time.perf_counter() - started) * 1000
        headers = response.headers
        retry = logstream.retry_after_seconds(
            headers.get("retry-after", ""), headers.get("retry-after-ms", ""), time.time()
        )
        return evaluate(request, response.status, response.body, latency, retry)

    async def _probe_worker(self) -> None:
        """One of MAX_PROBES_IN_FLIGHT: probes the queued instances one after the other. A fixed set of
        workers over a queue of names, not a task per probe: when probes fall behind, what waits is a
        name in a deque, not a task, a coroutine and a semaphore waiter per instance."""
        queue = self._queue
        while True:
            name = await queue.get()
            try:
                config = self.configs.get(name)
                if config is not None:
                    self._record_probe(name, await self._probe(config, queue=False))
            finally:
                self._in_flight.discard(name)

    async def run_prober(self) -> None:
        schedule = self.schedule
        workers = [asyncio.create_task(self._probe_worker()) for _ in range(MAX_PROBES_IN_FLIGHT)]
        self._probe_tasks.update(workers)
        while True:
            now = time.monotonic()
            for name in schedule.pop_due(now):
                config = self.configs.get(name)
                if config is None:
                    continue
                schedule.started(name, now, config.health.probe_interval_s)
                if name in self._in_flight or not config.enabled:
                    # Still probing (or queued for a worker) an interval later: this round is skipped,
                    # at one heap entry per interval, however far the prober is behind.
                    continue
                self._in_flight.add(name)
                self._queue.put_nowait(name)
            await asyncio.sleep(SCHEDULER_TICK_S)

    # --- persistence ------------------------------------------------------------------------------
    async def flush(self) -> None:
        async with self._flushing:
            tracker = self.tracker
            now_mono = time.monotonic()
            tracker.tick(now_mono, time.time())
            names, probed = self._to_save(now_mono)
            if names:
                now_wall, now_mono = time.time(), time.monotonic()
                patches = {
                    n: tracker.state_fields(n, now_wall, now_mono) for n in names if n in tracker.instances
                }
                await asyncio.to_thread(self.store.patch_states, patches)
            if probed:
                fields = {n: tracker.probe_fields(n) for n in probed if n in tracker.instances}
                await asyncio.to_thread(self.store.patch_probe_fields, fields)
            if tracker.membership_changed:
                tracker.membership_changed = False
                self.reconciler.request("health verdict")

    def _to_save(self, now_mono: float) -> tuple[set[str], set[str]]:
        """The changed instances (every observed field), and as many of those only probed since (their
        last-probe fields) as PROBED_ROWS_PER_S allows."""
        tracker = self.tracker
        names, tracker.unsaved = tracker.unsaved, set()
        tracker.probed -= names  # written now with everything else
        probed: set[str] = set()
        allowed = int((now_mono - self._probed_saved_at) * PROBED_ROWS_PER_S)
        if allowed > 0 and tracker.probed:
            self._probed_saved_at = now_mono
            for _ in range(min(allowed, len(tracker.probed))):
                probed.add(tracker.probed.pop())
        elif not tracker.probed:
            self._probed_saved_at = now_mono  # no credit builds up while nothing waits
        return names, probed

    async def run_flusher(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._verdict.wait(), FLUSH_INTERVAL_S)
            self._verdict.clear()
            try:
                await self.flush()
            except Exception:  # keep flushing whatever one pass did
                log.exception("health flush failed")
            await asyncio.sleep(FLUSH_GAP_S)

    async def context(self) -> AsyncIterator[None]:
        """Start everything; stop it on exit (an aiohttp cleanup_ctx body)."""
        self._client = ProbeClient()
        transport = await logstream.listen_batches(
            self.log_address, self.on_logs, self.log_group, self.nginx_workers
        )
        jobs = {"health-flusher": self.run_flusher()}
        if self.probes_enabled:
            jobs["prober"] = self.run_prober()
        try:
            async with running(jobs):
                yield
        finally:
            transport.close()
            for task in list(self._probe_tasks):
                task.cancel()
            await asyncio.gather(*self._probe_tasks, return_exceptions=True)
            await self._client.close()
