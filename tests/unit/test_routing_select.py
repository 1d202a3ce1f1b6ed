"""POST /admin/select and GET /admin/models: the explanation (pure) and the API's answers to bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from control_plane.api.admin import AdminDeps, create_admin_app
from control_plane.providers import ApiFamily, Kind
from control_plane.registry.models import InstanceState, RoutingConfig, Strategy
from control_plane.registry.store import Store
from control_plane.render.spec import GatewaySpec, build_spec
from control_plane.routing import weights as lw
from control_plane.routing.explain import select
from control_plane.routing.service import refreshed
from control_plane.settings import Settings
from tests.unit.test_admin_api import ADMIN, AUTH, FakeReconciler
from tests.unit.test_spec import SERVER, inst, world


def spec_of(*configs: Any, **kw: Any) -> GatewaySpec:
    return build_spec(world(*configs, **kw), SERVER)


def test_weighted_shares_tiers_and_exclusions() -> None:
    spec = spec_of(inst("a", weight=3), inst("b", weight=1), inst("c", priority=5), inst("d", enabled=False))
    answer = select(spec, "m", ApiFamily.OPENAI, Kind.CHAT)
    assert answer is not None
    assert (answer["model"], answer["strategy"], answer["instance"]) == ("m", "weighted", "a")
    assert [(c["name"], c["share"], c["tier"], c["weight"]) for c in answer["candidates"]] == [
        ("a", 0.75, 0, 3),
        ("b", 0.25, 0, 1),
        ("c", 0.0, 1, 1),
    ]
    assert "backup: serves when the first tier fails" in answer["candidates"][2]["reasons"]
    assert answer["excluded"] == [{"name": "d", "reason": "disabled"}]


def test_aliases_spellings_fallbacks_and_unknown_models() -> None:
    routing = RoutingConfig(model_aliases={"smart": "m"}, fallbacks={"gone": ["m"]})
    spec = spec_of(
        inst("a"),
        inst("o", supported_models=["llama3:latest"]),
        inst("g", supported_models=["gone"], enabled=False),
        routing=routing,
    )
    alias = select(spec, "smart", ApiFamily.OPENAI, Kind.CHAT)
    assert alias is not None and (alias["model"], alias["requested"]) == ("m", "smart")
    spelling = select(spec, "llama3", ApiFamily.OLLAMA, Kind.CHAT)
    assert spelling is not None and spelling["model"] == "llama3:latest"
    fallback = select(spec, "gone", ApiFamily.OPENAI, Kind.CHAT)
    assert fallback is not None and (fallback["model"], fallback["fallback_from"]) == ("m", "gone")
    assert select(spec, "nope", ApiFamily.OPENAI, Kind.CHAT) is None
    assert select(spec, "m", ApiFamily.ANTHROPIC, Kind.CHAT) is None  # ollama instances speak no Anthropic
    assert select(spec, "m", ApiFamily.OPENAI, Kind.EMBEDDING) is None


def test_learned_weights_explain_with_their_reasons() -> None:
    routing = RoutingConfig(default_strategy=Strategy.LEAST_RESPONSE_TIME)
    observed = [lw.Observation("a", 412, 412, 180.0), lw.Observation("b", 100, 100, 540.0)]
    w = dataclasses.replace(
        world(inst("a"), inst("b"), routing=routing),
        learned={"m": lw.decide(Strategy.LEAST_RESPONSE_TIME, observed)},
    )
    answer = select(build_spec(w, SERVER), "m", ApiFamily.OPENAI, Kind.CHAT)
    assert answer is not None and answer["instance"] == "a"
    first = answer["candidates"][0]
    assert first["reasons"][0] == "p50 180 ms over 412 requests" and first["weight"] == 100
    assert answer["balancer"] == "least_conn with weights from latency"


def test_fresh_reasons_explain_the_weights_in_force() -> None:
    routing = RoutingConfig(default_strategy=Strategy.HEALTH_BASED)
    applied = lw.decide(Strategy.HEALTH_BASED, [lw.Observation("a"), lw.Observation("b")])
    later = lw.decide(
        Strategy.HEALTH_BASED, [lw.Observation("a", 50, 50, 80.0), lw.Observation("b", 50, 49, 90.0)]
    )
    kept = refreshed(applied, later)
    assert [c.weight for c in kept] == [c.weight for c in applied]  # nginx's weights stay
    assert kept[0].reasons[0] == "p50 80 ms over 50 requests"
    w = dataclasses.replace(world(inst("a"), inst("b"), routing=routing), learned={"m": applied})
    answer = select(build_spec(w, SERVER), "m", ApiFamily.OPENAI, Kind.CHAT, {"m": kept})
    assert answer is not None and answer["candidates"][0]["reasons"][0].startswith("p50 ")


def test_cost_reasons_name_the_price() -> None:
    routing = RoutingConfig(default_strategy=Strategy.COST_OPTIMIZED)
    spec = spec_of(inst("a", cost_per_1k_tokens=0.2), inst("b", cost_per_1k_tokens=1), routing=routing)
    answer = select(spec, "m", ApiFamily.OPENAI, Kind.CHAT)
    assert answer is not None
    assert answer["candidates"][0]["reasons"][0] == "cost 0.2 $/1k: best tier"


@dataclasses.dataclass
class SpecReconciler(FakeReconciler):
    spec: GatewaySpec | None = None
    learned: Any = None


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> Any:
    store, reconciler = Store("sqlite://"), SpecReconciler()
    store.migrate()
    state = InstanceState(discovered_models=["found"])
    reconciler.spec = spec_of(inst("a"), states={"a": state})
    store.create_instance(inst("a"))
    store.put_state("a", state)
    deps = AdminDeps(Settings(home=tmp_path), store, reconciler, ADMIN)  # type: ignore[arg-type]
    return await aiohttp_client(create_admin_app(deps))


async def test_select_api_answers_and_refuses_bad_input(client: Any) -> None:
    ok = await client.post("/admin/select", json={"model": "found", "api": "ollama"}, headers=AUTH)
    assert ok.status == 200
    assert (await ok.json())["instance"] == "a"
    missing = await client.post("/admin/select", json={"model": "nope"}, headers=AUTH)
    assert missing.status == 404 and "nope" in (await missing.json())["detail"]
    for body, field in [
        ({}, "model"),
        ({"model": "m", "api": "grpc"}, "api"),
        ({"model": "m", "kind": "image"}, "kind"),
        ({"model": "bad name;"}, "model"),
        ({"model": "m", "extra": 1}, "extra"),
        ({"model": 5}, "model"),
    ]:
        r = await client.post("/admin/select", json=body, headers=AUTH)
        assert r.status == 422, body
        assert field in {d["field"] for d in (await r.json())["detail"]}
    assert (
        await client.post("/admin/select", data=b"{", headers={**AUTH, "Content-Type": "application/json"})
    ).status == 400
    assert (await client.post("/admin/select", json={"model": "m"})).status == 401


async def test_models_api_lists_sources(client: Any) -> None:
    r = await client.get("/admin/models", headers=AUTH)
    assert r.status == 200
    assert await r.json() == {
        "models": [
            {"model": "found", "instances": [{"name": "a", "source": "discovered", "available": True}]},
            {"model": "m", "instances": [{"name": "a", "source": "configured", "available": True}]},
        ]
    }
