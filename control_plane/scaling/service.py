"""The autoscaler: evaluates each scaling group on its interval, starts and stops members through the
driver, and records every decision it acts on as a scaling event.

Members are instances named ``<group>-<index>`` with the tag ``scaling_group=<group>``. A new member is
registered (and so joins its pools) only after a probe found it healthy; a member chosen to go is first
set draining, and stopped once every nginx worker that could still have a request on it has exited
(nginx's graceful reload keeps old workers until their requests finish), or after ``drain_timeout_s``.
One action per group at a time; a failed launch is an event with its error and is retried after a
backoff (5 s doubling, at most 5 minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge

from control_plane.background import running
from control_plane.health.logstream import LogRecord
from control_plane.health.probes import Outcome, ProbeResult
from control_plane.health.statuses import Verdict, classify
from control_plane.nginx_process import NginxProcess, children
from control_plane.reconciler import Reconciler
from control_plane.registry.models import (
    BreakerState,
    HealthStatus,
    InstanceConfig,
    InstanceState,
    OperatorStatus,
)
from control_plane.registry.scaling import ScalingStore
from control_plane.registry.store import Store
from control_plane.render.spec import GatewaySpec, World, same_configs
from control_plane.scaling.command import LaunchError, Member, exited
from control_plane.scaling.decide import Decision, Memory, Sample, Signals, decide, measure, queue_depth
from control_plane.scaling.docker import DockerError
from control_plane.scaling.drivers import Drivers
from control_plane.scaling.model import ScalingGroup

log = logging.getLogger(__name__)

TICK_S = 0.25
# Without a docker group, an engine that could not be read is read again this much later, not every pass:
# on a machine without Docker each attempt (a client, a connection refused, in a thread) took ~5 % of the
# controller's CPU under load at four passes a second.
DOCKER_RETRY_S = 30.0
SAMPLES_KEPT = 100_000
BACKOFF_FIRST_S = 5.0
BACKOFF_MAX_S = 300.0
READY_POLL_S = 0.2
GROUP_TAG = "scaling_group="
METRICS_TIMEOUT = aiohttp.ClientTimeout(total=2.0)
METRICS_MAX_BYTES = 1 << 20

Prober = Callable[[InstanceConfig], Awaitable[ProbeResult]]


@dataclass
class GroupRuntime:
    memory: Memory = field(default_factory=Memory)
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=SAMPLES_KEPT))
    next_eval: float = 0.0
    busy: bool = False
    backoff_until: float = 0.0
    failures: int = 0
    last: Decision | None = None
    queue_depth: float | None = None  # the queue_depth trigger's value, read before each evaluation


def group_of(config: InstanceConfig) -> str | None:
    for tag in config.tags:
        if tag.startswith(GROUP_TAG):
            return tag[len(GROUP_TAG) :]
    return None


def _index(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


class ScalingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.desired = Gauge(
            "ishgw_scaling_desired_instances", "Members a scaling group wants", ["group"], registry=registry
        )
        self.current = Gauge(
            "ishgw_scaling_current_instances",
            "Members of a scaling group serving",
            ["group"],
            registry=registry,
        )
        self.events = Counter(
            "ishgw_scaling_events_total",
            "Scaling events by direction and outcome",
            ["group", "direction", "outcome"],
            registry=registry,
        )


class ScalingService:
    def __init__(
        self,
        scaling: ScalingStore,
        store: Store,
        reconciler: Reconciler,
        nginx: NginxProcess,
        driver: Drivers,
        prober: Prober,
        addresses: Callable[[], dict[str, str]],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.scaling = scaling
        self.store = store
        self.reconciler = reconciler
        self.nginx = nginx
        self.driver = driver
        self.prober = prober
        self.addresses = addresses  # upstream address -> instance name (the health tracker's)
        self.metrics = ScalingMetrics(registry) if registry is not None else None
        self.runtime: dict[str, GroupRuntime] = {}
        self.instances: dict[str, tuple[InstanceConfig, InstanceState]] = {}  # members of any group
        self.member_group: dict[str, str] = {}  # member name -> its group, from its tag
        self._world: World | None = None  # the last pass's (on_world)
        self.groups: dict[str, ScalingGroup] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None  # reads members' /metrics (queue_depth)
        self._docker_warned = False
        self._docker_failed_at: float | None = None  # monotonic: the last refresh that failed
        reconciler.observers.append(self.on_world)

    # --- inputs -------------------------------------------------------------------------------------
    def on_world(self, world: World, _spec: GatewaySpec) -> None:
        if not same_configs(self._world, world):  # (only states changed: the groups' members did not)
            self.member_group = {c.name: g for c, _ in world.instances if (g := group_of(c)) is not None}
        self._world = world
        groups = self.member_group
        self.instances = {c.name: (c, s) for c, s in world.instances if c.name in groups} if groups else {}

    def on_log(self, record: LogRecord) -> None:
        self.on_logs((record,))

    def on_logs(self, records: Sequence[LogRecord]) -> None:
        """The log stream's records (one drain's): each attempt of a group's member, a sample of its group."""
        if not self.instances:
            return
        names = self.addresses()
        # Stamped on arrival, not with the record's own time: a log stream running behind under load must
        # not push its records out of a short window.
        now = time.time()
        for record in records:
            for attempt in record.attempts:
                name = names.get(attempt.address)
                group = self.member_group.get(name) if name is not None else None
                runtime = self.runtime.get(group) if group is not None else None
                if runtime is not None:
                    ok = classify(attempt.status) in (Verdict.OK, Verdict.RATE_LIMITED)
                    runtime.samples.append(Sample(now, attempt.response_ms or 0.0, ok))

    # --- views --------------------------------------------------------------------------------------
    def registered(self, group: str) -> dict[str, tuple[InstanceConfig, InstanceState]]:
        return {n: e for n, e in self.instances.items() if self.member_group[n] == group}

    def serving(self, group: str) -> dict[str, tuple[InstanceConfig, InstanceState]]:
        return {n: e for n, e in self.registered(group).items() if e[1].status is not OperatorStatus.DRAINING}

    def preview(self, group: ScalingGroup) -> Decision:
        """What an evaluation would decide now (its memory unchanged)."""
        runtime = self.runtime.get(group.name) or GroupRuntime()
        decision, _ = decide(group, self._signals(group, runtime), runtime.memory, time.time())
        return decision

    def status(self, group: ScalingGroup) -> dict[str, Any]:
        runtime = self.runtime.get(group.name) or GroupRuntime()
        members = []
        running = {m.name: m for m in self.driver.members(group.name)}
        for name, (config, state) in sorted(self.registered(group.name).items()):
            member = running.pop(name, None)
            members.append(self._member_view(name, config, state, member))
        members += [self._member_view(name, None, None, m) for name, m in sorted(running.items())]
        return {
            "members": members,
            "evaluation": self.preview(group).to_dict(),
            "last_decision": runtime.last.to_dict() if runtime.last else None,
            "busy": runtime.busy,
            "backoff_left_s": max(0.0, runtime.backoff_until - time.monotonic()),
            "next_evaluation_in_s": max(0.0, runtime.next_eval - time.monotonic()),
        }

    @staticmethod
    def _member_view(
        name: str, config: InstanceConfig | None, state: InstanceState | None, member: Member | None
    ) -> dict[str, Any]:
        return {
            "name": name,
            "registered": config is not None,
            "status": str(state.status) if state else "starting",
            "health": str(state.health_status) if state else "unknown",
            "port": member.port if member else None,
            "pid": member.pid if member and member.pid else None,
            "driver": member.driver if member else None,
            "log": member.log if member else None,
        }

    def overview(self, events_per_group: int) -> list[dict[str, Any]]:
        """Each group as the status page shows it: members serving against desired, bounds, the last
        evaluation's reason and the newest events. Blocking (reads the registry): run in a thread."""
        views = []
        for name, group in self.scaling.groups().items():
            runtime = self.runtime.get(name) or GroupRuntime()
            current = len(self.serving(name))
            last = runtime.last
            views.append(
                {
                    "name": name,
                    "models": list(group.models),
                    "current": current,
                    "desired": last.target if last is not None else current,
                    "min": group.min_instances,
                    "max": group.max_instances,
                    "starting": max(0, len(self.driver.members(name)) - len(self.registered(name))),
                    "busy": runtime.busy,
                    "evaluation": last.reason if last is not None else "not evaluated yet",
                    "events": self.scaling.events(name, events_per_group),
                }
            )
        return views

    # --- the loop -----------------------------------------------------------------------------------
    def _signals(self, group: ScalingGroup, runtime: GroupRuntime) -> Signals:
        serving = self.serving(group.name)
        unhealthy = sum(
            1
            for _, state in serving.values()
            if state.health_status is HealthStatus.UNHEALTHY or state.breaker_state is BreakerState.OPEN
        )
        return measure(
            group, runtime.samples, time.time(), group.window_s, len(serving), unhealthy, runtime.queue_depth
        )

    async def _read_queue(self, group: ScalingGroup) -> float | None:
        """Requests waiting per serving member, from each one's /metrics (vLLM); None when none reports."""
        urls = []
        for config, _ in self.serving(group.name).values():
            parts = urlsplit(config.api_base or "")
            urls.append(f"{parts.scheme}://{parts.netloc}/metrics")
        return queue_depth(await asyncio.gather(*(self._get_text(url) for url in urls)))

    async def _get_text(self, url: str) -> str | None:
        if self._session is None:
            return None
        try:
            async with self._session.get(url, timeout=METRICS_TIMEOUT) as response:
                if response.status != 200:
                    return None
                return (await response.content.read(METRICS_MAX_BYTES)).decode("utf-8", "replace")
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # one bad pass must not stop scaling
                log.exception("scaling pass failed")
            await asyncio.sleep(TICK_S)

    async def _refresh_docker(self) -> bool:
        """The docker driver's view of the engine, read on each pass that needs it (a docker group, or the
        first pass: members of a group deleted while the controller was down); False: not readable now."""
        docker = self.driver.docker
        if docker is None:
            return False
        wanted = any(g.driver == "docker" for g in self.groups.values())
        if docker.refreshed and not wanted:
            return True
        failed_at = self._docker_failed_at
        if not wanted and failed_at is not None and time.monotonic() - failed_at < DOCKER_RETRY_S:
            return False
        try:
            await docker.refresh()
        except DockerError as exc:
            self._docker_failed_at = time.monotonic()
            # Without a docker group, an engine that is not there is the usual case (no Docker on this
            # machine): nothing to adopt, nothing to warn about.
            if wanted and (docker.refreshed or not self._docker_warned):
                log.warning("scaling: %s", exc)
                self._docker_warned = True
            else:
                log.debug("scaling: %s", exc)
            docker.refreshed = False
            return False
        return True

    async def tick(self) -> None:
        self.groups = await asyncio.to_thread(self.scaling.groups)
        docker_ok = await self._refresh_docker()
        now = time.monotonic()
        for name, group in self.groups.items():
            runtime = self.runtime.setdefault(name, GroupRuntime())
            if runtime.busy or (group.driver == "docker" and not docker_ok):
                continue  # a docker group waits for the engine: nothing is known about its containers
            action = self._housekeeping(group)
            if action is None and now >= runtime.next_eval:
                runtime.next_eval = now + group.evaluation_interval_s
                if group.triggers.queue_depth is not None:
                    runtime.queue_depth = await self._read_queue(group)
                action = self._evaluate(group, runtime, now)
            if action is not None:
                self._start(runtime, action)
        for name in self.driver.groups():
            runtime = self.runtime.setdefault(name, GroupRuntime())
            if name not in self.groups and not runtime.busy and self.driver.members(name):
                self._start(runtime, self._remove_all(name))

    def _start(self, runtime: GroupRuntime, action: Awaitable[None]) -> None:
        runtime.busy = True

        async def run() -> None:
            try:
                await action
            except Exception:
                log.exception("scaling action failed")
            finally:
                runtime.busy = False

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _housekeeping(self, group: ScalingGroup) -> Awaitable[None] | None:
        """Converge after a restart: register running members not yet registered (adopted), finish a
        scale-in that was draining, forget registered members whose process is gone."""
        running = {m.name: m for m in self.driver.members(group.name)}
        registered = self.registered(group.name)
        for name, member in running.items():
            if name not in registered:
                return self._adopt(group, member)
        for name, (_, state) in registered.items():
            if name not in running:
                return self._forget(group, name)
            if state.status is OperatorStatus.DRAINING:
                return self._finish_in(group, name, running[name], drained=False)
        return None

    def _evaluate(
        self, group: ScalingGroup, runtime: GroupRuntime, now_mono: float
    ) -> Awaitable[None] | None:
        decision, runtime.memory = decide(group, self._signals(group, runtime), runtime.memory, time.time())
        runtime.last = decision
        if self.metrics is not None:
            self.metrics.current.labels(group.name).set(decision.current)
            self.metrics.desired.labels(group.name).set(decision.target)
        if decision.direction == "hold" or now_mono < runtime.backoff_until:
            return None
        return (
            self._scale_out(group, runtime, decision)
            if decision.direction == "out"
            else self._scale_in(group, runtime, decision)
        )

    # --- actions ------------------------------------------------------------------------------------
    def _event(self, group: ScalingGroup | str, direction: str, decision: Decision | None) -> dict[str, Any]:
        name = group if isinstance(group, str) else group.name
        event: dict[str, Any] = {"group": name, "at": _iso(time.time()), "direction": direction}
        if decision is not None:
            event.update(
                {
                    "from": decision.current,
                    "to": decision.target,
                    "trigger": decision.trigger,
                    "predictive": decision.predictive,
                    "reason": decision.reason,
                    "measured": [
                        {
                            "trigger": t.name,
                            "value": t.value,
                            "scale_out_above": t.scale_out_above,
                            "scale_in_below": t.scale_in_below,
                            "over_for_s": round(t.over_for_s, 3),
                        }
                        for t in decision.triggers
                    ],
                }
            )
        return event

    async def _record(self, event: dict[str, Any], outcome: str, **extra: Any) -> None:
        event.update({"outcome": outcome, **extra})
        await asyncio.to_thread(self.scaling.add_event, event)
        if self.metrics is not None:
            self.metrics.events.labels(event["group"], event["direction"], outcome).inc()
        log.info("scaling %s %s: %s %s", event["group"], event["direction"], outcome, extra or "")

    def _fail(self, runtime: GroupRuntime) -> float:
        runtime.failures += 1
        wait = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** min(runtime.failures - 1, 16))
        runtime.backoff_until = time.monotonic() + wait
        return wait

    async def _scale_out(self, group: ScalingGroup, runtime: GroupRuntime, decision: Decision) -> None:
        started = time.monotonic()
        decided_at = time.time()
        event = self._event(group, "out", decision)
        running = self.driver.members(group.name)
        used = {m.index for m in running} | {_index(n) for n in self.registered(group.name)}
        index = next(i for i in range(1, len(used) + 2) if i not in used)
        member: Member | None = None
        try:
            port = self.driver.pick_port(group, {m.port for m in running})
            member = await self.driver.launch(group, index, port)
            config = group.member_config(index, port)
            await self._wait_ready(group, member, config)
            await asyncio.to_thread(self.store.create_instance, config)
            result = await self.reconciler.apply(f"scaling out {group.name}")
            if not result.ok:
                raise LaunchError(f"reload failed: {result.error}")
        except LaunchError as exc:
            if member is not None:
                await self.driver.stop(member)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.store.delete_instance, member.name)
            wait = self._fail(runtime)
            await self._record(event, "failed", error=str(exc), retry_in_s=wait)
            return
        runtime.failures = 0
        runtime.memory = dataclasses.replace(runtime.memory, last_out_at=decided_at)
        served_s = round(time.monotonic() - started, 3)
        await self._record(event, "ok", instance=member.name, port=member.port, duration_s=served_s)

    async def _wait_ready(self, group: ScalingGroup, member: Member, config: InstanceConfig) -> None:
        deadline = time.monotonic() + group.ready_timeout_s
        detail = "no probe yet"
        while time.monotonic() < deadline:
            gone = await self.driver.gone(member)
            if gone is not None:
                raise LaunchError(f"{gone}, before its first healthy probe")
            result = await self.prober(config)
            if result.outcome is Outcome.OK:
                return
            detail = result.detail
            await asyncio.sleep(READY_POLL_S)
        raise LaunchError(f"not healthy within ready_timeout_s {group.ready_timeout_s:g} s: {detail}")

    async def _scale_in(self, group: ScalingGroup, runtime: GroupRuntime, decision: Decision) -> None:
        serving = self.serving(group.name)
        name = max(serving, key=_index)
        running = {m.name: m for m in self.driver.members(group.name)}
        event = self._event(group, "in", decision)
        started = time.monotonic()
        await asyncio.to_thread(self.store.patch_states, {name: {"status": OperatorStatus.DRAINING}})
        workers = self._workers()
        await self.reconciler.apply(f"scaling in {group.name}: draining {name}")
        drained = await self._wait_workers_gone(workers, group.drain_timeout_s)
        runtime.memory = dataclasses.replace(runtime.memory, last_in_at=time.time())
        await self._remove(name, running.get(name))
        await self._record(
            event, "ok", instance=name, drained=drained, duration_s=round(time.monotonic() - started, 3)
        )

    def _workers(self) -> set[int]:
        master = self.nginx.master_pid()
        return set(children(master)) if master else set()

    async def _wait_workers_gone(self, workers: set[int], timeout: float) -> bool:
        """True once none of ``workers`` (the nginx workers before the draining reload) runs any more."""
        deadline = time.monotonic() + timeout
        while not all(exited(pid) for pid in workers):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def _remove(self, name: str, member: Member | None) -> None:
        if member is not None:
            await self.driver.stop(member)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.store.delete_instance, name)
        await self.reconciler.apply(f"scaling: {name} removed")

    async def _adopt(self, group: ScalingGroup, member: Member) -> None:
        event = self._event(group, "adopt", None)
        config = group.member_config(member.index, member.port)
        try:
            await self._wait_ready(group, member, config)
            await asyncio.to_thread(self.store.create_instance, config)
            await self.reconciler.apply(f"scaling: adopted {member.name}")
        except LaunchError as exc:
            await self.driver.stop(member)
            await self._record(event, "failed", instance=member.name, error=str(exc))
            return
        await self._record(event, "ok", instance=member.name, port=member.port)

    async def _forget(self, group: ScalingGroup, name: str) -> None:
        event = self._event(group, "lost", None)
        await self._remove(name, None)
        await self._record(event, "ok", instance=name, reason="its process is not running")

    async def _finish_in(self, group: ScalingGroup, name: str, member: Member, drained: bool) -> None:
        event = self._event(group, "in", None)
        await self._remove(name, member)
        await self._record(
            event, "ok", instance=name, drained=drained, reason="finished a scale-in in progress"
        )

    async def _remove_all(self, group: str) -> None:
        """A deleted group's members: drained and stopped."""
        for member in self.driver.members(group):
            event = self._event(group, "in", None)
            if member.name in self.instances:
                await asyncio.to_thread(
                    self.store.patch_states, {member.name: {"status": OperatorStatus.DRAINING}}
                )
                workers = self._workers()
                await self.reconciler.apply(f"scaling: draining {member.name} (group deleted)")
                await self._wait_workers_gone(workers, 60.0)
            await self._remove(member.name, member)
            await self._record(event, "ok", instance=member.name, reason="its group was deleted")

    async def context(self) -> AsyncIterator[None]:
        # Stopped with it: the actions it started and that still run (a scale-out, a drain).
        self._session = aiohttp.ClientSession()
        try:
            async with running({"autoscaler": self.run()}, spawned=lambda: list(self._tasks)):
                yield
        finally:
            await self._session.close()
            await self.driver.close()
