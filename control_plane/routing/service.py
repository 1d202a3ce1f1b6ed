"""Effects around the weights: log records into measurement windows, a timer that recomputes the weights of
measured strategies, and hysteresis before they reach nginx (by the reconciler: a reload, nothing per
request)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from urllib.parse import urlsplit

import aiohttp

from control_plane import providers
from control_plane.background import running
from control_plane.health.logstream import LogRecord
from control_plane.metrics import GatewayMetrics
from control_plane.reconciler import Reconciler
from control_plane.registry.models import InstanceConfig, ProviderType, RoutingConfig
from control_plane.render.spec import GatewaySpec, World, observation_of
from control_plane.routing import load as backend_load
from control_plane.routing import weights as lw
from control_plane.routing.measure import Windows

log = logging.getLogger(__name__)

# Where a backend reports its load (read every weights_interval_s for instances of measured pools).
LOAD_PATHS = {ProviderType.VLLM: "/metrics", ProviderType.OLLAMA: "/api/ps"}
LOAD_TIMEOUT = aiohttp.ClientTimeout(total=2.0)


def measured_pools(world: World, spec: GatewaySpec) -> dict[str, list[str]]:
    """model -> the instances that serve it in the first tier of a measured strategy's pools."""
    models: dict[str, list[str]] = {}
    for pool in spec.pools:
        if pool.strategy in lw.MEASURED:
            names = models.setdefault(pool.model, [])
            names.extend(m.instance for m in pool.members if not m.backup and m.instance not in names)
    return models


def observations(
    world: World,
    spec: GatewaySpec,
    windows: Windows,
    now: float,
    loads: Mapping[tuple[str, str], tuple[float, str]] | None = None,
) -> dict[str, list[lw.Observation]]:
    """model -> what was measured of each of its instances over the routing window (and the load its
    backend reported, by (model, instance))."""
    loads = loads or {}
    pairs = {c.name: (c, st) for c, st in world.instances}
    window_s = world.routing.weights_window_s
    found: dict[str, list[lw.Observation]] = {}
    for model, names in measured_pools(world, spec).items():
        items = []
        for name in sorted(names):
            config, state = pairs[name]
            stats = windows.stats(model, name, now, window_s)
            base = observation_of(config, state)
            load, note = loads.get((model, name), (0.0, ""))
            items.append(
                lw.Observation(
                    name=name,
                    requests=stats.requests,
                    successes=stats.successes,
                    p50_ms=stats.p50_ms,
                    breaker=base.breaker,
                    price=base.price,
                    quality=base.quality,
                    load=load,
                    load_note=note,
                    ms_per_token=stats.ms_per_token,
                    tokens_per_s=stats.tokens_per_s,
                )
            )
        found[model] = items
    return found


def decisions(
    routing: RoutingConfig, measured: Mapping[str, list[lw.Observation]], seed: str
) -> dict[str, tuple[lw.Choice, ...]]:
    """model -> the weights its strategy gives what was measured."""
    out: dict[str, tuple[lw.Choice, ...]] = {}
    reward = lw.Reward(routing.reward.success, routing.reward.latency, routing.reward.cost)
    for model, items in measured.items():
        strategy = routing.strategies.get(model, routing.default_strategy)
        out[model] = lw.decide(strategy, items, routing.explore_share, reward, f"{seed}|{model}")
    return out


def refreshed(applied: tuple[lw.Choice, ...], latest: tuple[lw.Choice, ...]) -> tuple[lw.Choice, ...]:
    """The applied weights and tiers with the latest scores and reasons (nothing nginx reads changes)."""
    now = {c.name: c for c in latest}
    return tuple(
        dataclasses.replace(now[c.name], weight=c.weight, tier=c.tier) if c.name in now else c
        for c in applied
    )


class WeightsService:
    def __init__(self, reconciler: Reconciler, metrics: GatewayMetrics) -> None:
        self.reconciler = reconciler
        self.metrics = metrics
        self.windows = Windows()
        self.applied: dict[str, tuple[lw.Choice, ...]] = {}
        self.applications = 0  # weight sets applied (each one reconcile, so at most one reload)
        self.steps = 0  # recomputations
        self.loads: dict[tuple[str, str], tuple[float, str]] = {}  # (model, instance) -> load, why
        self._session: aiohttp.ClientSession | None = None
        self._world: World | None = None
        self._spec: GatewaySpec | None = None
        self._names: dict[str, str] = {}
        reconciler.observers.append(self.on_world)
        reconciler.learned = self.learned

    def learned(self) -> dict[str, tuple[lw.Choice, ...]]:
        return dict(self.applied)

    def status(self) -> dict[str, object]:
        return {"steps": self.steps, "applied": self.applications, "models": sorted(self.applied)}

    def on_world(self, world: World, spec: GatewaySpec) -> None:
        self._world, self._spec = world, spec
        self._names = spec.address_names()
        keep = {(model, name) for model, names in measured_pools(world, spec).items() for name in names}
        self.windows.forget(keep)

    def on_log(self, record: LogRecord) -> None:
        self.windows.observe(record, self._names)

    def on_logs(self, records: Sequence[LogRecord]) -> None:
        self.windows.observe_all(records, self._names)

    @property
    def interval_s(self) -> float:
        return self._world.routing.weights_interval_s if self._world else RoutingConfig().weights_interval_s

    def step(self, now: float) -> bool:
        """Recompute; apply (ask for a reconcile) only what moved more than weights_min_change."""
        world, spec = self._world, self._spec
        if world is None or spec is None:
            return False
        self.steps += 1
        measured = observations(world, spec, self.windows, now, self.loads)
        computed = decisions(world.routing, measured, str(int(now)))
        changed = False
        for model in [m for m in self.applied if m not in computed]:
            del self.applied[model]
            changed = True
        for model, choices in computed.items():
            if lw.moved(self.applied.get(model), choices, world.routing.weights_min_change):
                self.applied[model] = choices
                changed = True
            else:  # the weights in force stay; their explanation follows the measurements
                self.applied[model] = refreshed(self.applied[model], choices)
        if changed:
            self.applications += 1
            self.metrics.weight_updates.inc()
            self.reconciler.request("weights")
        return changed

    async def _get(self, url: str, headers: dict[str, str]) -> bytes | None:
        assert self._session is not None
        try:
            async with self._session.get(url, headers=headers, timeout=LOAD_TIMEOUT) as response:
                return await response.content.read(1 << 20) if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def _load_of(self, config: InstanceConfig, models: list[str]) -> dict[str, tuple[float, str]]:
        """model -> load, from the instance's own report: vLLM's /metrics, Ollama's /api/ps."""
        base = providers.base_url(config)
        if base is None or config.provider_type not in LOAD_PATHS:
            return {}
        assert self._world is not None
        parts = urlsplit(base)
        headers = providers.auth_headers(config, self._world.secrets.get(config.name))
        body = await self._get(f"{parts.scheme}://{parts.netloc}{LOAD_PATHS[config.provider_type]}", headers)
        if body is None:
            return {}
        if config.provider_type is ProviderType.VLLM:
            found = backend_load.vllm_load(body.decode("utf-8", "replace"))
            return dict.fromkeys(models, found) if found else {}
        loaded = backend_load.ollama_loaded(body)
        return {m: backend_load.ollama_load(m, loaded) for m in models} if loaded is not None else {}

    async def read_loads(self) -> None:
        """Ask every instance of a measured pool that reports load; what does not answer counts as idle."""
        world, spec = self._world, self._spec
        if world is None or spec is None or self._session is None:
            return
        configs = {c.name: c for c, _ in world.instances}
        by_instance: dict[str, list[str]] = {}
        for model, names in measured_pools(world, spec).items():
            for name in names:
                by_instance.setdefault(name, []).append(model)
        names = [n for n in by_instance if configs[n].provider_type in LOAD_PATHS]
        answers = await asyncio.gather(*(self._load_of(configs[n], by_instance[n]) for n in names))
        self.loads = {
            (model, n): found
            for n, loads in zip(names, answers, strict=True)
            for model, found in loads.items()
        }

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.read_loads()
                self.step(time.time())
            except Exception:  # the next interval tries again
                log.exception("weights step failed")

    async def context(self) -> AsyncIterator[None]:
        self._session = aiohttp.ClientSession()
        try:
            async with running({"weights": self.run()}):
                yield
        finally:
            await self._session.close()
