"""The reconcile loop: any change marks the world dirty; one debounced loop renders, tests, swaps, reloads.

desired = build_spec(world) -> render -> compare checksum with what runs -> nginx -t -> swap -> HUP.
A candidate that fails never replaces the running tree; the error is kept for /admin/status.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import aiohttp

from control_plane import certs
from control_plane.errors import ReloadFailed
from control_plane.metrics import GatewayMetrics
from control_plane.nginx_process import NginxProcess, worker_count
from control_plane.registry.store import Store
from control_plane.render.edge import limits_in_force
from control_plane.render.nginx import RenderedTree, render
from control_plane.render.quoting import UnsafeValue
from control_plane.render.spec import GatewaySpec, ServerSettings, World, build_spec
from control_plane.routing import explain
from control_plane.routing.weights import Choice
from control_plane.secret_refs import SecretPolicy
from control_plane.world import gather_world

log = logging.getLogger(__name__)
LIVE_STREAK = 3


@dataclass(frozen=True)
class ReconcileResult:
    ok: bool
    changed: bool
    checksum: str | None
    generation: int
    error: str | None
    duration_ms: float
    at: str

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


class Reconciler:
    def __init__(
        self,
        store: Store,
        nginx: NginxProcess,
        server: ServerSettings,
        metrics: GatewayMetrics,
        timing: ReconcileTiming | None = None,
        secret_policy: SecretPolicy | None = None,
    ) -> None:
        self.store = store
        self.secret_policy = secret_policy or SecretPolicy()
        self.nginx = nginx
        self.server = server
        self.metrics = metrics
        self.timing = timing or ReconcileTiming()
        self._dirty = asyncio.Event()
        self._first_dirty: float | None = None
        self._lock = asyncio.Lock()
        self._last_reload_at = 0.0
        self._spec: GatewaySpec | None = None
        self._desired: str | None = None  # the checksum of the tree self._spec renders to
        self._applied: ReconcileResult | None = None
        self._last: ReconcileResult | None = None
        self._reloads = 0
        self._failures = 0
        self._reasons: list[str] = []
        # API calls waiting for the pass that includes their write (read your writes).
        self._waiters: list[asyncio.Future[ReconcileResult]] = []
        # Called with (world, spec) after every pass: the health service follows the registry this way.
        self.observers: list[Callable[[World, GatewaySpec], None]] = []
        # The weights learned strategies apply now (control_plane/routing/service.py): model -> choices.
        self.learned: Callable[[], Mapping[str, tuple[Choice, ...]]] | None = None

    # --- triggers -------------------------------------------------------------------------------
    def request(self, reason: str) -> None:
        if self._first_dirty is None:
            self._first_dirty = time.monotonic()
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
                generation = await asyncio.to_thread(self.store.generation)
            except Exception:  # the database may be briefly away; the next poll tries again
                log.warning("could not read the configuration generation", exc_info=True)
                continue
            if self._spec is not None and generation != self._spec.generation:
                self.request("registry changed")

    async def _debounce(self) -> None:
        start = self._first_dirty or time.monotonic()
        while True:
            self._dirty.clear()
            remaining = min(self.timing.debounce_s, start + self.timing.max_wait_s - time.monotonic())
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout=remaining)
            except TimeoutError:
                return

    # --- one pass -------------------------------------------------------------------------------
    async def reconcile_now(self, *, force: bool = False) -> ReconcileResult:
        async with self._lock:
            started = time.perf_counter()
            world = await gather_world(
                self.store, self.server.tls_cert, self.server.edge.jwt_files, self.secret_policy
            )
            server = await asyncio.to_thread(certs.with_tls_facts, self.server)  # OCSP stapling when possible
            if self.learned is not None:
                world = dataclasses.replace(world, learned=self.learned())
            try:
                spec = build_spec(world, server)
                tree = render(spec)
            except UnsafeValue as exc:
                return self._finish(False, False, None, world.generation, f"render refused: {exc}", started)
            self._spec, self._desired = spec, tree.checksum
            self._publish_spec_metrics(spec)
            for observer in self.observers:
                observer(world, spec)
            if self.nginx.running_checksum() == tree.checksum and not force:
                return self._finish(True, False, tree.checksum, world.generation, None, started)
            error = await self._apply(tree)
            return self._finish(error is None, True, tree.checksum, world.generation, error, started)

    async def _apply(self, tree: RenderedTree) -> str | None:
        wait = self._last_reload_at + self.timing.min_reload_interval_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        previous = self.nginx.running_checksum()
        candidate = self.nginx.write_candidate(tree)
        tested = await self.nginx.test(candidate)
        if not tested.ok:
            return f"nginx -t rejected the candidate: {tested.output}"
        self.nginx.swap(tree.checksum)
        self._last_reload_at = time.monotonic()
        try:
            await self.nginx.signal_reload()
        except ReloadFailed as exc:
            self._roll_back(previous)
            return str(exc)
        if not await self._wait_live(tree.checksum):
            self._roll_back(previous)
            return "nginx did not adopt the new configuration: " + self.nginx.error_log_tail()
        self.nginx.prune(keep_also=tree.checksum)
        return None

    def _roll_back(self, previous: str | None) -> None:
        if previous is not None:
            self.nginx.swap(previous)

    async def _wait_live(self, checksum: str) -> bool:
        """True once nginx answers /health with the new checksum on several fresh connections in a row
        and every old worker has begun to shut down."""
        host = (
            "127.0.0.1"
            if self.server.listen_address in ("0.0.0.0", "*", "::")
            else self.server.listen_address
        )
        url = f"http://{host}:{self.server.http_port}/health"
        # Live means also that no old worker still takes requests: after a HUP the master forks the new
        # workers, then tells the old ones to stop, and until an old worker has handled that it still
        # answers on its keep-alive connections with the old configuration (read your writes would break).
        workers = worker_count(self.server.worker_processes)
        deadline = time.monotonic() + self.timing.live_timeout_s
        timeout = aiohttp.ClientTimeout(total=1)
        streak = 0
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < deadline:
                seen = None
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    async with session.get(url, headers={"Connection": "close"}) as response:
                        seen = (await response.json(content_type=None)).get("checksum")
                streak = streak + 1 if seen == checksum else 0
                if streak >= LIVE_STREAK and self.nginx.accepting_workers() in (None, workers):
                    return True
                await asyncio.sleep(0.01 if streak else 0.02)
        return False

    def _finish(
        self,
        ok: bool,
        changed: bool,
        checksum: str | None,
        generation: int,
        error: str | None,
        started: float,
    ) -> ReconcileResult:
        result = ReconcileResult(
            ok=ok,
            changed=changed,
            checksum=checksum,
            generation=generation,
            error=error,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            at=datetime.now(UTC).isoformat(),
        )
        self._last = result
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
        else:
            log.error("reconcile failed: %s", error)
        return result

    def _publish_spec_metrics(self, spec: GatewaySpec) -> None:
        self.metrics.pools.set(len(spec.pools))
        self.metrics.excluded.set(len(spec.excluded))
        self.metrics.pool_members.clear()
        for pool in spec.pools:
            self.metrics.pool_members.labels(pool.name, pool.model).set(len(pool.members))
        self.metrics.instance_available.clear()
        excluded = dict(spec.excluded)
        for name in {m.instance for p in spec.pools for m in p.members} | set(excluded):
            self.metrics.instance_available.labels(name).set(0 if name in excluded else 1)

    # --- views ----------------------------------------------------------------------------------
    @property
    def spec(self) -> GatewaySpec | None:
        """The desired spec of the last pass (what nginx runs once status()["checksum"] equals it)."""
        return self._spec

    def status(self) -> dict[str, object]:
        spec = self._spec
        learned = self.learned() if self.learned else {}
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
                for p in (spec.pools if spec else ())
            ],
            "excluded": dict(spec.excluded) if spec else {},
            "tls": certs.tls_status(self.server.tls_cert),
            "http": certs.http_mode(self.server),
            "limits": limits_in_force(self.server.edge),
        }
