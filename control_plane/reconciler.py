"""The reconcile loop: any change marks the world dirty; one debounced loop renders, tests, swaps, reloads.

desired = build_spec(world) -> render -> compare checksum with what runs -> nginx -t -> swap -> HUP.
A candidate that fails never replaces the running tree; the error is kept for /admin/status.

The loop's effects come in as two values: a WorldSource (the registry: control_plane/world.py's
RegistryWorld) and an NginxControl (control_plane/nginx_process.py's NginxProcess). Its rules (debounce,
coalescing, rollback, no reload for an unchanged tree, the resync timer) are tested fast with fakes of
both (tests/unit/test_reconciler.py); the real ones against real nginx (tests/integration).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from prometheus_client import Gauge

from control_plane import certs
from control_plane.errors import ReloadFailed
from control_plane.metrics import GatewayMetrics
from control_plane.nginx_process import TestResult
from control_plane.render.client_access import limits_in_force
from control_plane.render.nginx import BlockMemo, RenderedTree, finish_tree, render_files
from control_plane.render.quoting import UnsafeValue
from control_plane.render.spec import GatewaySpec, Pool, ServerSettings, SpecBuild, World, build_indexed
from control_plane.render.update import update_spec
from control_plane.routing import explain
from control_plane.routing.weights import Choice

log = logging.getLogger(__name__)
RELOAD_HISTORY = 20  # reloads and failed passes the status page lists


@dataclass(frozen=True)
class ReconcileResult:
    ok: bool
    changed: bool
    checksum: str | None
    generation: int
    error: str | None
    duration_ms: float
    at: str
    # Where the pass's time went, in order: gather, build_spec, render, checksum, then (when the tree
    # changed) write, nginx_t, reload, live. What scripts/bench reports as the reconcile split.
    phases_ms: dict[str, float] = field(default_factory=dict)
    # True when the pass read only the instances' states and updated the previous spec for the changed
    # ones (the configuration unchanged: a health verdict); False when it read and built everything.
    incremental: bool = False

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ReconcileTiming:
    debounce_s: float = 0.15
    max_wait_s: float = 1.0
    min_reload_interval_s: float = 0.5
    resync_interval_s: float = 30.0
    live_timeout_s: float = 5.0
    generation_poll_s: float = 2.0


class WorldSource(Protocol):
    """The registry side of a pass."""

    async def gather(self) -> World:
        """Everything build_spec needs, read now; ``generation`` read first, so a change committed during
        the read has a newer generation and watch_generation asks for another pass."""
        ...

    async def refresh(self, previous: World, environment: bool) -> World | None:
        """``previous`` with the instances' states read now (and the clock), when the configuration
        generation is still ``previous.generation``; None when it is not. With ``environment``, also
        what the world takes from outside the registry (secret files, DNS, certificate, JWT keys)."""
        ...

    async def generation(self) -> int:
        """The configuration generation now (several nodes share one registry: another node's change)."""
        ...

    async def seed_budgets(self, spec: GatewaySpec) -> None:
        """Write the keys' spend this period for the load of ``spec`` (control_plane/usage/limits.py)."""
        ...


class NginxControl(Protocol):
    """What a pass does to nginx: write a candidate, test it, swap it in, reload, confirm, roll back."""

    def running_checksum(self) -> str | None:
        """The checksum of the tree nginx runs; None when nginx does not run."""
        ...

    def write_candidate(self, tree: RenderedTree) -> Path:
        """Write ``tree`` where nginx -t and the swap find it (blocking: called in a thread)."""
        ...

    async def test(self, directory: Path) -> TestResult:
        """nginx -t on the candidate."""
        ...

    def swap(self, checksum: str) -> None:
        """Make the tree of ``checksum`` the one the next (re)load reads, atomically."""
        ...

    async def signal_reload(self) -> None:
        """Reload (or start) nginx; raises ReloadFailed."""
        ...

    async def confirm(self, checksum: str, timeout_s: float) -> bool:
        """True once nginx serves ``checksum`` and no old worker takes requests, within ``timeout_s``."""
        ...

    def prune(self, keep_also: str | None = None) -> None:
        """Remove old candidates (blocking: called in a thread)."""
        ...

    def error_log_tail(self, lines: int = 5) -> str:
        """nginx's last words, for the error of a reload nginx did not adopt."""
        ...


class Phases:
    """Milliseconds per named step of one pass, each from the end of the one before."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = round((now - self._last) * 1000, 2)
        self._last = now


def publish_changes(
    gauge: Gauge, published: dict[tuple[str, ...], float], wanted: dict[tuple[str, ...], float]
) -> dict[tuple[str, ...], float]:
    """Make a labelled gauge hold exactly ``wanted``, given that it holds ``published``: children no
    longer wanted are removed, changed ones set, equal ones left alone. Returns the new published map."""
    for labels in published.keys() - wanted.keys():
        gauge.remove(*labels)
    for labels, value in wanted.items():
        if published.get(labels) != value:
            gauge.labels(*labels).set(value)
    return wanted


class Reconciler:
    def __init__(
        self,
        source: WorldSource,
        nginx: NginxControl,
        server: ServerSettings,
        metrics: GatewayMetrics,
        timing: ReconcileTiming | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.nginx = nginx
        self.clock = clock  # the event loop's clock (asyncio's timeouts run on it)
        self.server = server
        self.metrics = metrics
        self.timing = timing or ReconcileTiming()
        self._dirty = asyncio.Event()
        self._first_dirty: float | None = None
        self._lock = asyncio.Lock()
        self._last_reload_at = float("-inf")  # no reload yet
        self._spec: GatewaySpec | None = None
        self._build: SpecBuild | None = None  # the last pass's build (self._spec), what the next one updates
        self._environment_at = float("-inf")  # when a pass last read secrets, DNS and files (began)
        self._desired: str | None = None  # the checksum of the tree self._spec renders to
        self._blocks = BlockMemo()  # the upstream blocks of the last render, by pool
        self._applied: ReconcileResult | None = None
        self._last: ReconcileResult | None = None
        self._reloads = 0
        self._failures = 0
        self.history: deque[ReconcileResult] = deque(maxlen=RELOAD_HISTORY)  # reloads and failures
        self._reasons: list[str] = []
        # What _publish_spec_metrics last set, per label values: the next pass touches only differences.
        self._published_members: dict[tuple[str, ...], float] = {}
        # API calls waiting for the pass that includes their write (read your writes).
        self._waiters: list[asyncio.Future[ReconcileResult]] = []
        # Called with (world, spec) after every pass: the health service follows the registry this way.
        self.observers: list[Callable[[World, GatewaySpec], None]] = []
        # The weights learned strategies apply now (control_plane/routing/service.py): model -> choices.
        self.learned: Callable[[], Mapping[str, tuple[Choice, ...]]] | None = None

    # --- triggers -------------------------------------------------------------------------------
    def request(self, reason: str) -> None:
        if self._first_dirty is None:
            self._first_dirty = self.clock()
        if len(self._reasons) < 20:
            self._reasons.append(reason)
        self._dirty.set()

    async def apply(self, reason: str) -> ReconcileResult:
        """Mark the world dirty and wait for the pass that includes this change: when it returns ok,
        nginx serves the change on fresh connections. The write must be committed before the call."""
        waiter: asyncio.Future[ReconcileResult] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.request(reason)
        return await asyncio.shield(waiter)

    async def run(self) -> None:
        """The loop. Coalesces a burst of requests into one reconcile; never dies on an error."""
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout=self.timing.resync_interval_s)
            except TimeoutError:
                self.request("resync")
            if self._waiters:
                self._dirty.clear()  # someone waits: apply now; writes arriving meanwhile join the next pass
            else:
                await self._debounce()
            reasons, self._reasons, self._first_dirty = self._reasons, [], None
            waiters, self._waiters = self._waiters, []
            log.debug("reconcile for %s", ", ".join(reasons))
            try:
                result = await self.reconcile_now()
            except Exception as exc:  # the loop must survive anything; the error is in the result
                log.exception("reconcile failed")
                error = f"reconcile failed: {type(exc).__name__}"
                result = self._finish(False, False, None, -1, error, time.perf_counter())
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(result)

    async def watch_generation(self) -> None:
        """Several gateway nodes share one PostgreSQL registry: a change made through another node's API
        shows up here as a new configuration generation."""
        while True:
            await asyncio.sleep(self.timing.generation_poll_s)
            try:
                generation = await self.source.generation()
            except Exception:  # the database may be briefly away; the next poll tries again
                log.warning("could not read the configuration generation", exc_info=True)
                continue
            if self._spec is not None and generation != self._spec.generation:
                self.request("registry changed")

    async def _debounce(self) -> None:
        start = self._first_dirty or self.clock()
        while True:
            self._dirty.clear()
            if self._waiters:
                return  # an API call waits for this pass (a check after its own health verdict): now
            remaining = min(self.timing.debounce_s, start + self.timing.max_wait_s - self.clock())
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout=remaining)
            except TimeoutError:
                return

    # --- one pass -------------------------------------------------------------------------------
    async def _gather(self, force: bool) -> tuple[World, ServerSettings, SpecBuild | None]:
        """The world now, with the server settings for it and the build to update (None: build in full).
        While the configuration generation is unchanged a pass reads the states only, and what comes from
        outside the registry (secret files, DNS, certificate and key files, OCSP facts) at most once a
        resync interval; a forced pass (POST /admin/reload) and the first one read everything."""
        previous = self._build
        began = self.clock()
        due = began - self._environment_at >= self.timing.resync_interval_s
        if not force and previous is not None:
            world = await self.source.refresh(previous.world, environment=due)
            if world is not None:
                if not due:
                    return world, previous.server, previous
                self._environment_at = began
                return world, await self._server(), previous
        world = await self.source.gather()
        self._environment_at = began
        return world, await self._server(), None

    async def _server(self) -> ServerSettings:
        return await asyncio.to_thread(certs.with_tls_facts, self.server)  # OCSP stapling when possible

    async def reconcile_now(self, *, force: bool = False) -> ReconcileResult:
        async with self._lock:
            started = time.perf_counter()
            phases = Phases()
            world, server, previous = await self._gather(force)
            phases.mark("gather")
            if self.learned is not None:
                world = dataclasses.replace(world, learned=self.learned())
            try:
                build = update_spec(previous, world, server) if previous is not None else None
                incremental = build is not None
                build = build or build_indexed(world, server)
                spec = build.spec
                phases.mark("build_spec")
                files = render_files(spec, self._blocks)
                phases.mark("render")
            except UnsafeValue as exc:
                return self._finish(False, False, None, world.generation, f"render refused: {exc}", started)
            tree = finish_tree(files)
            phases.mark("checksum")
            self._build, self._spec, self._desired = build, spec, tree.checksum
            self._publish_spec_metrics(spec)
            for observer in self.observers:
                observer(world, spec)
            if self.nginx.running_checksum() == tree.checksum and not force:
                return self._finish(
                    True, False, tree.checksum, world.generation, None, started, phases, incremental
                )
            error = await self._apply(tree, phases)
            return self._finish(
                error is None, True, tree.checksum, world.generation, error, started, phases, incremental
            )

    async def _apply(self, tree: RenderedTree, phases: Phases) -> str | None:
        wait = self._last_reload_at + self.timing.min_reload_interval_s - self.clock()
        if wait > 0:
            await asyncio.sleep(wait)
            phases.mark("rate_limit")
        previous = self.nginx.running_checksum()
        await self._write_budget_seed()
        candidate = await asyncio.to_thread(self.nginx.write_candidate, tree)
        phases.mark("write")
        tested = await self.nginx.test(candidate)
        phases.mark("nginx_t")
        if not tested.ok:
            return f"nginx -t rejected the candidate: {tested.output}"
        self.nginx.swap(tree.checksum)
        self._last_reload_at = self.clock()
        try:
            await self.nginx.signal_reload()
        except ReloadFailed as exc:
            self._roll_back(previous)
            return str(exc)
        phases.mark("reload")
        live = await self.nginx.confirm(tree.checksum, self.timing.live_timeout_s)
        phases.mark("live")
        if not live:
            self._roll_back(previous)
            return "nginx did not adopt the new configuration: " + self.nginx.error_log_tail()
        await asyncio.to_thread(self.nginx.prune, tree.checksum)
        return None

    async def _write_budget_seed(self) -> None:
        """The keys' spend this period as the registry holds it, for the load that follows
        (control_plane/usage/limits.py). Without it a restarted nginx would start every budget at 0."""
        spec = self._spec
        if spec is None or not spec.access.token_limits:
            return
        try:
            await self.source.seed_budgets(spec)
        except Exception:  # the load goes on: the counters nginx holds stay; only a fresh one starts low
            log.warning("could not write the budget seed", exc_info=True)

    def _roll_back(self, previous: str | None) -> None:
        if previous is not None:
            self.nginx.swap(previous)

    def _finish(
        self,
        ok: bool,
        changed: bool,
        checksum: str | None,
        generation: int,
        error: str | None,
        started: float,
        phases: Phases | None = None,
        incremental: bool = False,
    ) -> ReconcileResult:
        result = ReconcileResult(
            ok=ok,
            changed=changed,
            checksum=checksum,
            generation=generation,
            error=error,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            at=datetime.now(UTC).isoformat(),
            phases_ms=phases.ms if phases else {},
            incremental=incremental,
        )
        self._last = result
        if changed or not ok:
            self.history.append(result)
        self.metrics.reconcile_seconds.observe(result.duration_ms / 1000)
        if changed:
            self._reloads += ok
            self._failures += not ok
            self.metrics.reloads.labels("success" if ok else "failure").inc()
            self.metrics.last_reload_ok.set(1 if ok else 0)
        if not ok and not changed:
            self._failures += 1
            self.metrics.last_reload_ok.set(0)
        if ok:
            self._applied = result
            self.metrics.generation.set(generation)
            # What runs is what the registry asks for (a restart that adopts the running tree included):
            # a past failure is over (the ReloadFailed alert clears).
            self.metrics.last_reload_ok.set(1)
        else:
            log.error("reconcile failed: %s", error)
        return result

    def _publish_spec_metrics(self, spec: GatewaySpec) -> None:
        """Only what changed since the last pass: relabelling 10,000 instances each pass cost more than
        the rest of the metrics together."""
        self.metrics.pools.set(len(spec.pools))
        self.metrics.excluded.set(len(spec.excluded))
        members: dict[tuple[str, ...], float] = {(p.name, p.model): float(len(p.members)) for p in spec.pools}
        self._published_members = publish_changes(self.metrics.pool_members, self._published_members, members)
        # One map per pass, handed to the family whole (labelled.py): no per-instance object to update.
        available: dict[tuple[str, ...], float] = {(m.instance,): 1 for p in spec.pools for m in p.members}
        available.update(((name,), 0) for name, _ in spec.excluded)
        self.metrics.instance_available.replace(available)

    # --- views ----------------------------------------------------------------------------------
    @property
    def spec(self) -> GatewaySpec | None:
        """The desired spec of the last pass (what nginx runs once status()["checksum"] equals it; alerts
        and POST /admin/select read its pools)."""
        return self._spec

    def status(self, pools: Sequence[Pool] | None = None) -> dict[str, object]:
        """What /admin/status and the status page show; ``pools``: the ones to describe (default: all of
        the spec; describing one costs its candidates' explanation)."""
        spec = self._spec
        learned = self.learned() if self.learned else {}
        if pools is None:
            pools = spec.pools if spec else ()
        return {
            "checksum": self.nginx.running_checksum(),
            # What the pools below render to: equal to "checksum" once they are what nginx runs. A health
            # verdict changes the pools (and this) without a new generation, so only this tells that a
            # reload is still to come.
            "desired_checksum": self._desired,
            "applied": self._applied.to_dict() if self._applied else None,
            "last_reload": self._last.to_dict() if self._last else None,
            "reloads": self._reloads,
            "reload_failures": self._failures,
            "pools": [
                {
                    "name": p.name,
                    "family": str(p.family),
                    "kind": str(p.kind),
                    "model": p.model,
                    "strategy": str(p.strategy),
                    "instances": [m.instance for m in p.members if not m.backup],
                    "backup": [m.instance for m in p.members if m.backup],
                    "excluded": dict(p.excluded),
                    # Why (POST /admin/select answers the same per pool): shares, weights, reasons.
                    "candidates": explain.candidates(p, learned.get(p.model)),
                }
                for p in pools
            ],
            "excluded": dict(spec.excluded) if spec else {},
            # An address several instances have (README, Usage accounting: one server, several instances).
            "shared_addresses": spec.shared_addresses() if spec else {},
            "tls": certs.tls_status(self.server.tls_cert),
            "http": certs.http_mode(self.server),
            "limits": limits_in_force(self.server.access),
        }

    @property
    def last_result(self) -> ReconcileResult | None:
        return self._last
