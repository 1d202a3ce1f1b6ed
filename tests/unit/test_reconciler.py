"""The reconcile loop's rules, driven with fakes of its two effects (WorldSource, NginxControl) on a virtual
clock: debounce, coalescing, the minimum reload interval, rollback, no reload for an unchanged tree, the
resync timer and the generation watch. The real effects are tested against real nginx (tests/integration).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from control_plane.background import running
from control_plane.errors import ReloadFailed
from control_plane.metrics import GatewayMetrics
from control_plane.nginx_process import TestResult as NginxTestResult  # not a test class
from control_plane.reconciler import NginxControl, Reconciler, ReconcileTiming, WorldSource
from control_plane.registry.models import HealthStatus, InstanceConfig, InstanceState, RoutingConfig
from control_plane.render.nginx import RenderedTree
from control_plane.render.spec import GatewaySpec, ServerSettings, World
from tests import virtual_time

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SERVER = ServerSettings(prefix="/p", run_dir="/r")
TIMING = ReconcileTiming()  # the production defaults: debounce 0.15 s, max wait 1 s, reloads 0.5 s apart,
# resync 30 s, generation poll 2 s


class FakeWorld:
    """One instance whose weight each change bumps, with the generation; and whose health may change
    (a state write: the generation stays)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.weight = 1
        self.generation_now = 1
        self.state = InstanceState()
        self.passes: list[float] = []  # when each pass gathered (in full or the states only)
        self.full: list[float] = []  # when each pass gathered in full
        self.environment: list[float] = []  # when each pass read secrets, DNS and files (a full one too)
        self.failure: Exception | None = None
        self.seeded: list[GatewaySpec] = []

    def change(self) -> None:
        """A configuration write (committed)."""
        self.weight += 1
        self.generation_now += 1

    def health(self, healthy: bool) -> None:
        """A health verdict written (the state alone)."""
        self.state = InstanceState(health_status=HealthStatus.HEALTHY if healthy else HealthStatus.UNHEALTHY)

    async def gather(self) -> World:
        self.passes.append(self.clock())
        self.full.append(self.clock())
        self.environment.append(self.clock())
        if self.failure is not None:
            raise self.failure
        config = InstanceConfig(
            name="a",
            provider_type="ollama",
            api_base="http://127.0.0.1:11434",
            supported_models=["m"],
            weight=self.weight,
        )
        return World(
            instances=((config, self.state),),
            routing=RoutingConfig(),
            now=NOW,
            generation=self.generation_now,
            addresses={"127.0.0.1": ("127.0.0.1",)},
        )

    async def refresh(self, previous: World, environment: bool) -> World | None:
        if self.failure is not None:
            raise self.failure
        if previous.generation != self.generation_now:
            return None
        self.passes.append(self.clock())
        if environment:
            self.environment.append(self.clock())
        return replace(previous, instances=tuple((c, self.state) for c, _ in previous.instances))

    async def generation(self) -> int:
        return self.generation_now

    async def seed_budgets(self, spec: GatewaySpec) -> None:
        self.seeded.append(spec)


@dataclass
class FakeNginx:
    """nginx as the reconciler sees it: `live` names the tree the next (re)load reads."""

    clock: Callable[[], float]
    live: str | None = None
    running: bool = False
    test_ok: bool = True
    reload_error: str | None = None
    adopts: bool = True
    gate: asyncio.Event | None = None  # when set, nginx -t waits for it
    testing: asyncio.Event | None = None

    def __post_init__(self) -> None:
        self.steps: list[tuple[str, str | None]] = []
        self.reloads: list[float] = []  # when each reload was signalled

    def running_checksum(self) -> str | None:
        return self.live if self.running else None

    def write_candidate(self, tree: RenderedTree) -> Path:
        self.steps.append(("write", tree.checksum))
        return Path("/generations") / tree.checksum

    async def test(self, directory: Path) -> NginxTestResult:
        self.steps.append(("test", directory.name))
        if self.testing is not None:
            self.testing.set()
        if self.gate is not None:
            await self.gate.wait()
        return NginxTestResult(self.test_ok, "" if self.test_ok else "[emerg] unknown directive")

    def swap(self, checksum: str) -> None:
        self.steps.append(("swap", checksum))
        self.live = checksum

    async def signal_reload(self) -> None:
        self.steps.append(("reload", self.live))
        self.reloads.append(self.clock())
        if self.reload_error is not None:
            raise ReloadFailed(self.reload_error)
        self.running = True

    async def confirm(self, checksum: str, timeout_s: float) -> bool:
        self.steps.append(("confirm", checksum))
        return self.adopts

    def prune(self, keep_also: str | None = None) -> None:
        self.steps.append(("prune", keep_also))

    def error_log_tail(self, lines: int = 5) -> str:
        return "[emerg] bind() to 127.0.0.1:8080 failed"


@dataclass
class Loop:
    reconciler: Reconciler
    world: FakeWorld
    nginx: FakeNginx
    metrics: GatewayMetrics

    def clock(self) -> float:
        return self.reconciler.clock()

    def reloads(self, result: str) -> float | None:
        return self.metrics.registry.get_sample_value("ishgw_config_reloads_total", {"result": result})

    def last_reload_ok(self) -> float | None:
        return self.metrics.registry.get_sample_value("ishgw_config_last_reload_successful")

    async def until(self, condition: Callable[[], bool], within_s: float = 60.0) -> None:
        """Wait (virtual time) for ``condition``; fail after ``within_s`` virtual seconds."""
        deadline = self.clock() + within_s
        while not condition():
            assert self.clock() < deadline, "condition not met in time"
            await asyncio.sleep(0.01)


def make_loop(timing: ReconcileTiming = TIMING) -> Loop:
    clock = asyncio.get_running_loop().time
    world, nginx = FakeWorld(clock), FakeNginx(clock)
    metrics = GatewayMetrics(CollectorRegistry())
    source: WorldSource = world  # the fakes are what the protocols ask for (mypy checks this)
    control: NginxControl = nginx
    return Loop(Reconciler(source, control, SERVER, metrics, timing, clock=clock), world, nginx, metrics)


@asynccontextmanager
async def started(timing: ReconcileTiming = TIMING) -> AsyncIterator[Loop]:
    """As the app starts the loop: one pass (nginx starts), then the loop and the generation watch."""
    loop = make_loop(timing)
    first = await loop.reconciler.reconcile_now()
    assert first.ok and first.changed and loop.nginx.running
    rec = loop.reconciler
    async with running({"reconciler": rec.run(), "generation-watch": rec.watch_generation()}):
        yield loop


def run(test: Callable[[], object]) -> Callable[[], None]:
    """A test body (a coroutine function) run on the virtual clock."""

    def sync() -> None:
        virtual_time.run(test())  # type: ignore[arg-type]

    sync.__name__ = test.__name__
    return sync


# --- one pass ------------------------------------------------------------------------------------------


@run
async def test_an_unchanged_tree_is_not_reloaded() -> None:
    loop = make_loop()
    first = await loop.reconciler.reconcile_now()
    assert first.ok and first.changed and loop.nginx.live == first.checksum
    steps = list(loop.nginx.steps)
    assert [s for s, _ in steps] == ["write", "test", "swap", "reload", "confirm", "prune"]
    again = await loop.reconciler.reconcile_now()
    assert again.ok and not again.changed and again.checksum == first.checksum
    assert loop.nginx.steps == steps  # nothing written, tested or signalled
    assert loop.reloads("success") == 1
    # A restarted controller adopts the tree nginx runs: no reload either.
    restarted = Reconciler(loop.world, loop.nginx, SERVER, GatewayMetrics(CollectorRegistry()), TIMING)
    adopted = await restarted.reconcile_now()
    assert adopted.ok and not adopted.changed and loop.nginx.steps == steps
    # ... unless told to (force).
    forced = await loop.reconciler.reconcile_now(force=True)
    assert forced.ok and forced.changed and len(loop.nginx.reloads) == 2


@run
async def test_a_candidate_nginx_t_rejects_never_replaces_the_running_tree() -> None:
    loop = make_loop()
    good = await loop.reconciler.reconcile_now()
    loop.world.change()
    loop.nginx.test_ok = False
    rejected = await loop.reconciler.reconcile_now()
    assert not rejected.ok and rejected.changed
    assert rejected.error == "nginx -t rejected the candidate: [emerg] unknown directive"
    assert loop.nginx.live == good.checksum and loop.nginx.steps[-1] == ("test", rejected.checksum)
    assert len(loop.nginx.reloads) == 1
    assert loop.reloads("failure") == 1 and loop.last_reload_ok() == 0
    status = loop.reconciler.status()
    assert status["checksum"] == good.checksum and status["desired_checksum"] == rejected.checksum
    assert status["reload_failures"] == 1 and loop.reconciler.history[-1] == rejected
    loop.nginx.test_ok = True
    fixed = await loop.reconciler.reconcile_now()
    assert fixed.ok and fixed.checksum == rejected.checksum == loop.nginx.live
    assert loop.last_reload_ok() == 1


@run
async def test_a_failed_reload_rolls_the_tree_back() -> None:
    loop = make_loop()
    good = await loop.reconciler.reconcile_now()
    loop.world.change()
    loop.nginx.reload_error = "nginx did not start: [emerg] bind() failed"
    failed = await loop.reconciler.reconcile_now()
    assert not failed.ok and failed.error == "nginx did not start: [emerg] bind() failed"
    assert loop.nginx.steps[-3:] == [
        ("swap", failed.checksum),
        ("reload", failed.checksum),
        ("swap", good.checksum),
    ]
    assert loop.nginx.live == good.checksum and loop.last_reload_ok() == 0


@run
async def test_a_reload_nginx_does_not_adopt_rolls_the_tree_back() -> None:
    loop = make_loop()
    good = await loop.reconciler.reconcile_now()
    loop.world.change()
    loop.nginx.adopts = False
    failed = await loop.reconciler.reconcile_now()
    assert not failed.ok
    assert failed.error == (
        "nginx did not adopt the new configuration: [emerg] bind() to 127.0.0.1:8080 failed"
    )
    assert loop.nginx.steps[-2:] == [("confirm", failed.checksum), ("swap", good.checksum)]
    assert loop.nginx.live == good.checksum
    assert loop.reloads("failure") == 1 and loop.reloads("success") == 1


@run
async def test_no_budget_seed_without_token_limits() -> None:
    loop = make_loop()
    assert (await loop.reconciler.reconcile_now()).ok
    assert loop.world.seeded == []


# --- the loop ------------------------------------------------------------------------------------------


@run
async def test_a_burst_of_changes_is_one_pass_and_one_reload() -> None:
    async with started() as loop:
        for i in range(100):
            loop.world.change()
            loop.reconciler.request(f"change {i}")
        await loop.until(lambda: len(loop.world.passes) == 2)
        await asyncio.sleep(10)  # well past any debounce, short of the resync
        assert len(loop.world.passes) == 2 and len(loop.nginx.reloads) == 2
        last = loop.reconciler.last_result
        assert last is not None and last.ok and last.generation == loop.world.generation_now == 101


@run
async def test_the_debounce_waits_for_a_quiet_moment() -> None:
    async with started() as loop:
        start = loop.clock()
        for _ in range(3):  # a change every 0.1 s: each one restarts the 0.15 s debounce
            loop.reconciler.request("change")
            await asyncio.sleep(0.1)
        await loop.until(lambda: len(loop.world.passes) == 2)
        assert loop.world.passes[1] == pytest.approx(start + 0.2 + TIMING.debounce_s)
        await asyncio.sleep(10)
        assert len(loop.world.passes) == 2


@run
async def test_the_maximum_wait_bounds_the_debounce() -> None:
    async with started() as loop:
        start = loop.clock()
        for _ in range(30):  # a change every 0.1 s for 3 s: never quiet for 0.15 s
            loop.world.change()
            loop.reconciler.request("change")
            await asyncio.sleep(0.1)
        assert loop.world.passes[1] == pytest.approx(start + TIMING.max_wait_s)
        gaps = [b - a for a, b in zip(loop.world.passes[1:], loop.world.passes[2:], strict=False)]
        assert len(gaps) >= 1 and all(gap <= TIMING.max_wait_s + 0.1 + 1e-6 for gap in gaps)


@run
async def test_changes_during_a_pass_make_one_more_pass() -> None:
    async with started() as loop:
        loop.nginx.gate, loop.nginx.testing = asyncio.Event(), asyncio.Event()
        loop.world.change()
        loop.reconciler.request("first")
        await loop.until(loop.nginx.testing.is_set)  # the pass is in nginx -t
        for i in range(5):
            loop.world.change()
            loop.reconciler.request(f"during {i}")
        loop.nginx.gate.set()
        await loop.until(lambda: len(loop.world.passes) == 3)
        await asyncio.sleep(10)
        assert len(loop.world.passes) == 3 and len(loop.nginx.reloads) == 3
        last = loop.reconciler.last_result
        assert last is not None and last.ok and last.generation == loop.world.generation_now


@run
async def test_apply_skips_the_debounce_and_answers_with_its_pass() -> None:
    async with started() as loop:
        await asyncio.sleep(5)
        loop.world.change()
        asked = loop.clock()
        result = await loop.reconciler.apply("api write")
        assert result.ok and result.changed and result.generation == loop.world.generation_now
        assert loop.world.passes[-1] == pytest.approx(asked)
        assert loop.nginx.live == result.checksum


@run
async def test_reloads_keep_the_minimum_interval() -> None:
    async with started() as loop:
        loop.world.change()
        assert (await loop.reconciler.apply("one")).ok
        loop.world.change()
        assert (await loop.reconciler.apply("two")).ok
        first, second = loop.nginx.reloads[-2:]
        assert second - first == pytest.approx(TIMING.min_reload_interval_s)
        assert "rate_limit" in (loop.reconciler.last_result.phases_ms if loop.reconciler.last_result else {})


@run
async def test_the_resync_timer_makes_a_pass_without_a_request() -> None:
    async with started() as loop:
        start = loop.clock()
        await loop.until(lambda: len(loop.world.passes) == 2, within_s=TIMING.resync_interval_s + 5)
        assert loop.world.passes[1] == pytest.approx(start + TIMING.resync_interval_s + TIMING.debounce_s)
        assert len(loop.nginx.reloads) == 1  # nothing changed: nothing reloaded
        await loop.until(lambda: len(loop.world.passes) == 3, within_s=TIMING.resync_interval_s + 5)
        # The timer counts from the end of the last pass.
        assert loop.world.passes[2] - loop.world.passes[1] == pytest.approx(
            TIMING.resync_interval_s + TIMING.debounce_s
        )


@run
async def test_another_nodes_change_is_seen_at_the_next_generation_poll() -> None:
    async with started() as loop:
        start = loop.clock()
        loop.world.change()  # committed by another node: no request here
        await loop.until(lambda: len(loop.world.passes) == 2)
        assert loop.world.passes[1] == pytest.approx(start + TIMING.generation_poll_s + TIMING.debounce_s)
        assert len(loop.nginx.reloads) == 2
        await asyncio.sleep(TIMING.resync_interval_s - 1)  # polls that see the same generation: no pass
        assert len(loop.world.passes) == 2


@run
async def test_the_loop_survives_a_failing_pass() -> None:
    async with started() as loop:
        loop.world.failure = RuntimeError("database away")
        failed = await loop.reconciler.apply("write")
        assert not failed.ok and failed.error == "reconcile failed: RuntimeError" and failed.generation == -1
        loop.world.failure = None
        loop.world.change()
        fixed = await loop.reconciler.apply("again")
        assert fixed.ok and fixed.changed and loop.nginx.live == fixed.checksum


@run
async def test_apply_during_a_debounce_ends_it() -> None:
    async with started() as loop:
        await asyncio.sleep(5)
        loop.world.health(False)
        loop.reconciler.request("health verdict")  # the flusher's, just before the check's apply
        await asyncio.sleep(0.01)
        asked = loop.clock()
        result = await loop.reconciler.apply("instance a checked")
        assert result.ok and result.changed
        assert loop.world.passes[-1] == pytest.approx(asked)  # not a debounce later
        assert len(loop.world.passes) == 2


# --- what a pass reads ---------------------------------------------------------------------------------


@run
async def test_a_health_change_reads_the_states_only_and_renders_what_a_full_pass_would() -> None:
    async with started() as loop:
        assert len(loop.world.full) == 1
        loop.world.health(False)
        out = await loop.reconciler.apply("instance a checked")
        assert out.ok and out.changed and out.incremental
        assert len(loop.world.full) == 1 and len(loop.world.passes) == 2
        spec = loop.reconciler.spec
        assert spec is not None and spec.excluded and not spec.pools[0].members
        # What a pass that reads everything makes of the same registry: the same tree.
        fresh = make_loop()
        fresh.world.health(False)
        assert (await fresh.reconciler.reconcile_now()).checksum == out.checksum
        loop.world.health(True)
        back = await loop.reconciler.apply("instance a checked")
        assert back.incremental and back.checksum != out.checksum and len(loop.world.full) == 1


@run
async def test_a_configuration_change_or_a_forced_pass_reads_everything() -> None:
    async with started() as loop:
        loop.world.change()
        changed = await loop.reconciler.apply("api write")
        assert changed.ok and not changed.incremental and len(loop.world.full) == 2
        forced = await loop.reconciler.reconcile_now(force=True)
        assert not forced.incremental and len(loop.world.full) == 3


@run
async def test_secrets_dns_and_files_are_read_again_once_a_resync_interval() -> None:
    async with started() as loop:
        began = loop.clock()
        await asyncio.sleep(TIMING.resync_interval_s - 10)
        loop.world.health(False)
        light = await loop.reconciler.apply("instance a checked")
        assert light.incremental and loop.world.environment == [began]
        await asyncio.sleep(11)  # the last read of the environment is now older than the resync interval
        loop.world.health(True)
        again = await loop.reconciler.apply("instance a checked")
        # Read again, found unchanged: still an update of the previous spec, no full read.
        assert again.changed and again.incremental and len(loop.world.full) == 1
        assert loop.world.environment == [began, loop.world.passes[-1]]
