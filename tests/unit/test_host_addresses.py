"""world.HostAddresses: DNS answers kept a TTL, failures too, on a virtual clock with a counting lookup."""

from __future__ import annotations

import asyncio

from control_plane.registry.models import InstanceConfig
from control_plane.world import HostAddresses


def instance(name: str, host: str) -> InstanceConfig:
    base = f"http://{host}:8000/v1"
    return InstanceConfig(name=name, provider_type="openai_compatible", api_base=base, supported_models=["m"])


class Lookups:
    def __init__(self) -> None:
        self.asked: list[str] = []
        self.answers = {"good.example": ("192.0.2.1",), "127.0.0.1": ("127.0.0.1",)}

    async def __call__(self, host: str) -> tuple[str, ...]:
        self.asked.append(host)
        return self.answers.get(host, ())


def test_answers_and_failures_are_kept_for_the_ttl_then_asked_again() -> None:
    now = [100.0]
    lookups = Lookups()
    dns = HostAddresses(ttl_s=30, lookup=lookups, clock=lambda: now[0])
    configs = [instance("a", "good.example"), instance("b", "bad.example"), instance("c", "127.0.0.1")]
    assert asyncio.run(dns.resolve(configs)) == {"good.example": ("192.0.2.1",), "127.0.0.1": ("127.0.0.1",)}
    assert sorted(lookups.asked) == ["127.0.0.1", "bad.example", "good.example"]
    lookups.asked.clear()
    now[0] += 29.9  # within the TTL: no lookup at all, the failure included
    assert asyncio.run(dns.resolve(configs))["good.example"] == ("192.0.2.1",)
    assert lookups.asked == []
    lookups.answers["bad.example"] = ("192.0.2.9",)
    now[0] += 0.1  # the TTL passed: asked again, and a name that now resolves is used
    assert asyncio.run(dns.resolve(configs))["bad.example"] == ("192.0.2.9",)
    assert sorted(lookups.asked) == ["127.0.0.1", "bad.example", "good.example"]


def test_a_new_host_is_looked_up_at_once_and_an_unused_one_forgotten() -> None:
    lookups = Lookups()
    dns = HostAddresses(ttl_s=30, lookup=lookups, clock=lambda: 0.0)
    asyncio.run(dns.resolve([instance("a", "good.example")]))
    assert asyncio.run(dns.resolve([instance("b", "other.example")])) == {}
    assert lookups.asked == ["good.example", "other.example"]
    asyncio.run(dns.resolve([instance("a", "good.example")]))  # forgotten: asked again
    assert lookups.asked == ["good.example", "other.example", "good.example"]
