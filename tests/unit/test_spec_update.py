"""update_spec (render/update.py) equals a full build: random state changes over a mixed fleet, each
pass's update compared with build_indexed of the same world, spec and rendered tree alike. Pure, fast."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from control_plane.registry.models import (
    BreakerState,
    HealthStatus,
    InstanceConfig,
    InstanceState,
    OperatorStatus,
    RoutingConfig,
    Strategy,
    config_fingerprint,
)
from control_plane.render.nginx import BlockMemo, render, render_files
from control_plane.render.spec import ServerSettings, SpecBuild, World, build_indexed
from control_plane.render.update import update_spec
from control_plane.routing.weights import Choice

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SERVER = ServerSettings(prefix="/p", run_dir="/r")
MODELS = [f"m{i}" for i in range(6)]
ADDRESSES = {"127.0.0.1": ("127.0.0.1",), "api.openai.com": ("10.0.0.1",), "10.0.0.9": ("10.0.0.9",)}
ROUTING = RoutingConfig(
    strategies={
        "m1": Strategy.COST_OPTIMIZED,
        "m2": Strategy.LEAST_RESPONSE_TIME,
        "m3": Strategy.ROUND_ROBIN,
        "m4": Strategy.QUALITY_BASED,
        "m5": Strategy.SESSION,
    },
    model_aliases={"alias": "m0"},
)


def fleet(rng: random.Random, count: int) -> list[InstanceConfig]:
    """Direct and shimmed instances (a key, HTTPS, a shorter timeout than a pool mate's), two priority
    tiers, prices and qualities, some discovering models."""
    configs = []
    for i in range(count):
        kind = rng.choice(["ollama", "compatible", "openai", "vllm"])
        models = rng.sample(MODELS, rng.choice([1, 1, 2]))
        common: dict[str, object] = {
            "name": f"i{i:02d}",
            "supported_models": models,
            "timeout_seconds": rng.choice([30, 60, 120]),
            "priority": rng.choice([1, 1, 2]),
            "weight": rng.randint(1, 5),
            "retry_count": rng.randint(0, 3),
            "cost_per_1k_tokens": rng.choice([0.0, 0.5, 2.0]),
            "quality_score": rng.choice([0.5, 0.9]),
        }
        kinds: dict[str, dict[str, object]] = {
            "ollama": {"provider_type": "ollama", "api_base": "http://127.0.0.1:11434"},
            "compatible": {
                "provider_type": "openai_compatible",
                "api_base": "http://10.0.0.9:8000/v1",
                "discover_models": True,
            },
            "vllm": {"provider_type": "vllm", "api_base": "http://10.0.0.9:8001/v1"},
            "openai": {
                "provider_type": "openai",
                "api_base": "https://api.openai.com/v1",
                "api_key": "sk-test",
            },
        }
        config = InstanceConfig.model_validate({**common, **kinds[kind]})
        configs.append(config)
    return configs


def world_of(
    configs: list[InstanceConfig], states: dict[str, InstanceState], now: datetime, **kw: object
) -> World:
    return World(
        instances=tuple((c, states[c.name]) for c in configs),
        routing=ROUTING,
        now=now,
        generation=3,
        addresses=ADDRESSES,
        secrets={c.name: "sk-test" for c in configs if c.api_key},
        **kw,  # type: ignore[arg-type]
    )


def changed_state(
    rng: random.Random, config: InstanceConfig, state: InstanceState, now: datetime
) -> InstanceState:
    """One observed change, as the health service writes them (a probe-only one included)."""
    change = rng.choice(
        [
            "health",
            "health",
            "health",
            "status",
            "breaker",
            "rate_limit",
            "budget",
            "quarantine",
            "probe",
            "probe",
            "discovered",
        ]
    )
    if change == "health":
        healthy = state.health_status is not HealthStatus.HEALTHY
        return state.model_copy(
            update={
                "health_status": HealthStatus.HEALTHY if healthy else HealthStatus.UNHEALTHY,
                "unhealthy_since": None if healthy else now,
            }
        )
    if change == "status":
        return state.model_copy(update={"status": rng.choice(list(OperatorStatus))})
    if change == "breaker":
        breaker = rng.choice(list(BreakerState))
        until = now + timedelta(seconds=30) if breaker is BreakerState.OPEN else None
        return state.model_copy(update={"breaker_state": breaker, "breaker_open_until": until})
    if change == "rate_limit":
        until = now + timedelta(seconds=rng.choice([-5, 3, 20])) if rng.random() < 0.8 else None
        return state.model_copy(update={"rate_limited_until": until})
    if change == "budget":
        until = now + timedelta(seconds=rng.choice([-5, 3, 20])) if rng.random() < 0.8 else None
        return state.model_copy(update={"rate_budget_until": until})
    if change == "quarantine":
        if state.quarantined_reason:
            return state.model_copy(update={"quarantined_reason": None, "quarantine_config": None})
        fingerprint = config_fingerprint(config)
        return state.model_copy(
            update={"quarantined_reason": "credential rejected", "quarantine_config": fingerprint}
        )
    if change == "discovered":
        return state.model_copy(update={"discovered_models": rng.sample(["d1", "d2", *MODELS], 2)})
    return state.model_copy(update={"last_probe_at": now, "probe_latency_ms": rng.random() * 100})


def learned_weights(rng: random.Random, configs: list[InstanceConfig]) -> dict[str, tuple[Choice, ...]]:
    names = [c.name for c in configs if "m2" in c.supported_models]
    return {"m2": tuple(Choice(n, rng.randint(1, 100), 0, 0.5, ("measured",)) for n in sorted(names))}


def assert_same(updated: SpecBuild, full: SpecBuild, rendered: bool = True) -> None:
    """Equal specs render equal trees (render is pure); the trees are compared too, every few passes."""
    assert updated.spec == full.spec
    assert updated == full
    if rendered:
        assert render(updated.spec).files == render(full.spec).files


@pytest.mark.parametrize("seed", range(12))
def test_update_equals_a_full_build_for_random_state_changes(seed: int) -> None:
    rng = random.Random(seed)
    configs = fleet(rng, 40)
    states = {c.name: InstanceState(health_status=HealthStatus.HEALTHY) for c in configs}
    now = NOW
    previous = build_indexed(world_of(configs, states, now), SERVER)
    updated = fallbacks = 0
    shims_seen = {len(previous.spec.shims)}
    for step in range(60):
        now += timedelta(seconds=rng.choice([0, 1, 4, 10]))
        for config in rng.sample(configs, rng.choice([1, 1, 1, 2, 3])):
            states[config.name] = changed_state(rng, config, states[config.name], now)
        learned = learned_weights(rng, configs) if rng.random() < 0.2 else previous.world.learned
        world = world_of(configs, states, now, learned=learned)
        full = build_indexed(world, SERVER)
        result = update_spec(previous, world, SERVER)
        if result is None:
            fallbacks += 1  # (only for discovered models: checked below)
            previous = full
            continue
        updated += 1
        assert_same(result, full, rendered=step % 10 == 9)
        shims_seen.add(len(result.spec.shims))
        previous = result
    assert updated > 40
    assert fallbacks < 20
    assert len(shims_seen) > 1  # availability moved a pool's timeout and with it an address


@pytest.mark.parametrize("seed", range(3))
def test_a_pass_renders_again_only_the_pools_it_rebuilt(seed: int) -> None:
    """The reconciler's BlockMemo (render/nginx.py): the upstream blocks of pools a pass took over from the
    previous one are not rendered again, and the tree is the one a render from scratch gives."""
    rng = random.Random(seed)
    configs = fleet(rng, 40)
    states = {c.name: InstanceState(health_status=HealthStatus.HEALTHY) for c in configs}
    now = NOW
    previous = build_indexed(world_of(configs, states, now), SERVER)
    memo = BlockMemo()
    render_files(previous.spec, memo)
    assert memo.rendered == sum(1 for p in previous.spec.pools if p.members)
    reused = 0
    for _ in range(25):
        now += timedelta(seconds=rng.choice([1, 4]))
        for config in rng.sample(configs, 1):
            states[config.name] = changed_state(rng, config, states[config.name], now)
        world = world_of(configs, states, now)
        result = update_spec(previous, world, SERVER) or build_indexed(world, SERVER)
        kept = {id(p) for p in previous.spec.pools}
        files = render_files(result.spec, memo)
        assert files == render_files(build_indexed(world, SERVER).spec)
        rebuilt = sum(1 for p in result.spec.pools if p.members and id(p) not in kept)
        assert memo.rendered == rebuilt
        reused += sum(1 for p in result.spec.pools if p.members) - rebuilt
        previous = result
    assert reused > 0


def test_unchanged_states_keep_the_spec() -> None:
    configs = fleet(random.Random(1), 10)
    states = {c.name: InstanceState() for c in configs}
    previous = build_indexed(world_of(configs, states, NOW), SERVER)
    result = update_spec(previous, world_of(configs, dict(states), NOW + timedelta(seconds=1)), SERVER)
    assert result is not None
    assert result.spec is previous.spec
    # A probe that changed nothing but its own time and latency: nothing build_spec reads.
    probed = {
        n: s.model_copy(update={"last_probe_at": NOW, "probe_latency_ms": 3.0}) for n, s in states.items()
    }
    again = update_spec(result, world_of(configs, probed, NOW + timedelta(seconds=2)), SERVER)
    assert again is not None and again.spec is previous.spec


def test_a_rate_limit_ends_with_the_clock_alone() -> None:
    configs = fleet(random.Random(2), 10)
    states = {c.name: InstanceState() for c in configs}
    states["i03"] = InstanceState(rate_limited_until=NOW + timedelta(seconds=5))
    previous = build_indexed(world_of(configs, states, NOW), SERVER)
    assert "i03" in dict(previous.spec.excluded)
    later = world_of(configs, states, NOW + timedelta(seconds=6))  # the same state objects
    result = update_spec(previous, later, SERVER)
    assert result is not None
    assert "i03" not in dict(result.spec.excluded)
    assert_same(result, build_indexed(later, SERVER))


def test_served_models_changing_falls_back() -> None:
    configs = fleet(random.Random(3), 10)
    discovering = next(c for c in configs if c.discovers())
    states = {c.name: InstanceState() for c in configs}
    previous = build_indexed(world_of(configs, states, NOW), SERVER)
    states[discovering.name] = InstanceState(discovered_models=["new-model"])
    assert update_spec(previous, world_of(configs, states, NOW), SERVER) is None


@pytest.mark.parametrize(
    "change",
    ["config", "generation", "routing", "secrets", "addresses", "clock back", "instance added", "server"],
)
def test_anything_but_states_falls_back(change: str) -> None:
    configs = fleet(random.Random(4), 10)
    states = {c.name: InstanceState() for c in configs}
    previous = build_indexed(world_of(configs, states, NOW), SERVER)
    world = world_of(configs, states, NOW)
    if change == "config":
        world = world_of([replace_config(configs[0]), *configs[1:]], states, NOW)
    elif change == "generation":
        world = replace(world, generation=4)
    elif change == "routing":
        world = replace(world, routing=RoutingConfig())
    elif change == "secrets":
        world = replace(world, secrets={})
    elif change == "addresses":
        world = replace(world, addresses={})
    elif change == "clock back":
        world = replace(world, now=NOW - timedelta(seconds=1))
    else:
        extra = InstanceConfig.model_validate(
            {
                "name": "z",
                "provider_type": "ollama",
                "api_base": "http://127.0.0.1:1",
                "supported_models": ["m0"],
            }
        )
        world = world_of([*configs, extra], {**states, "z": InstanceState()}, NOW)
    server = replace(SERVER, http_port=SERVER.http_port + 1) if change == "server" else SERVER
    assert update_spec(previous, world, server) is None


def replace_config(config: InstanceConfig) -> InstanceConfig:
    return config.model_copy(update={"weight": config.weight + 1})
