"""What the reconciler's observers do after a pass that read only the instances' states (a health
verdict: render/spec.py same_configs): the health service keeps its configurations, tracker entries and
probe schedule, and follows the pools' addresses; after a configuration change it follows everything."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from control_plane.health.service import HealthService
from control_plane.registry.models import HealthStatus, InstanceConfig, InstanceState, RoutingConfig
from control_plane.registry.store import Store
from control_plane.render.spec import ServerSettings, World, build_spec, same_configs
from tests.unit.test_reconciler import make_loop

SERVER = ServerSettings(prefix="/p", run_dir="/r")
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def config(name: str, port: int, interval: float = 10.0) -> InstanceConfig:
    return InstanceConfig(
        name=name,
        provider_type="ollama",
        api_base=f"http://127.0.0.1:{port}",
        supported_models=["m"],
        health={"probe_interval_s": interval},
    )


def world(*pairs: tuple[InstanceConfig, InstanceState]) -> World:
    return World(
        instances=tuple(pairs), routing=RoutingConfig(), now=NOW, addresses={"127.0.0.1": ("127.0.0.1",)}
    )


def test_same_configs_is_identity_in_order() -> None:
    a, b = config("a", 1), config("b", 2)
    up, down = InstanceState(), InstanceState(health_status=HealthStatus.UNHEALTHY)
    before = world((a, up), (b, up))
    assert same_configs(before, world((a, down), (b, up)))  # states differ only
    assert not same_configs(None, before)
    assert not same_configs(before, world((a, up)))
    assert not same_configs(before, world((b, up), (a, up)))
    assert not same_configs(before, world((config("a", 1), up), (b, up)))  # equal, not the same object


def test_a_state_only_pass_keeps_the_health_services_registry_view() -> None:
    async def body() -> None:
        service = HealthService(
            Store("sqlite://"), make_loop().reconciler, "127.0.0.1:1", probes_enabled=False
        )
        a, b = config("a", 1), config("b", 2)
        up, down = InstanceState(), InstanceState(health_status=HealthStatus.UNHEALTHY)
        first = world((a, up), (b, up))
        service.on_world(first, build_spec(first, SERVER))
        configs, entry = service.configs, service.tracker.instances["a"]
        assert set(service.tracker.addresses.values()) == {"a", "b"}

        verdict = world((a, down), (b, up))  # a health verdict: the same configuration objects
        service.on_world(verdict, build_spec(verdict, SERVER))
        assert service.configs is configs and service.tracker.instances["a"] is entry
        assert set(service.tracker.addresses.values()) == {"b"}  # a left its pool

        changed = world((a, down), (config("b", 2, interval=30.0), up), (config("c", 3), up))
        service.on_world(changed, build_spec(changed, SERVER))
        assert service.configs is not configs and set(service.configs) == {"a", "b", "c"}
        assert service.tracker.instances["b"].policy.probe_interval_s == 30.0
        assert set(service.tracker.instances) == {"a", "b", "c"}
        assert set(service.tracker.addresses.values()) == {"b", "c"}

    asyncio.run(body())
