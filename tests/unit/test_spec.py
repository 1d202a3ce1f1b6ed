"""build_spec and providers: pure, exhaustive, fast."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from control_plane import providers
from control_plane.providers import ENDPOINTS, ApiFamily, Kind
from control_plane.registry.models import (
    HealthStatus,
    InstanceConfig,
    InstanceState,
    OperatorStatus,
    ProviderType,
    RoutingConfig,
    Strategy,
)
from control_plane.render.spec import GatewaySpec, Pool, ServerSettings, World, build_spec, pool_name

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SERVER = ServerSettings(prefix="/p", run_dir="/r")


def inst(name: str, **kw: object) -> InstanceConfig:
    kw.setdefault("provider_type", "ollama")
    kw.setdefault("api_base", "http://127.0.0.1:11434")
    kw.setdefault("supported_models", ["m"])
    return InstanceConfig(name=name, **kw)


def world(*configs: InstanceConfig, states: dict[str, InstanceState] | None = None, **kw: object) -> World:
    states = states or {}
    hosts = {
        "127.0.0.1": ("127.0.0.1",),
        "api.openai.com": ("10.0.0.1", "10.0.0.2"),
        "az.example.com": ("10.0.0.3",),
    }
    return World(
        instances=tuple((c, states.get(c.name, InstanceState())) for c in configs),
        routing=kw.pop("routing", RoutingConfig()),  # type: ignore[arg-type]
        now=NOW,
        addresses=hosts,
        secrets={c.name: c.api_key for c in configs if c.api_key},
    )


def pool_of(
    spec: GatewaySpec, family: ApiFamily = ApiFamily.OLLAMA, kind: Kind = Kind.CHAT, model: str = "m"
) -> Pool:
    return next(p for p in spec.pools if p.name == pool_name(family, kind, model))


def test_weighted_members_and_direct_addresses() -> None:
    spec = build_spec(world(inst("a", weight=1), inst("b", weight=3)), SERVER)
    pool = pool_of(spec)
    assert [(m.instance, m.address, m.weight) for m in pool.members] == [
        ("a", "127.0.0.1:11434", 1),
        ("b", "127.0.0.1:11434", 3),
    ]
    assert spec.shims == ()
    assert spec.shared_addresses() == {"127.0.0.1:11434": ("a", "b")}


def test_one_server_registered_once_per_model_is_told_apart_by_the_pool() -> None:
    other = "http://127.0.0.1:11435"
    x, y = inst("x", supported_models=["m1"]), inst("y", supported_models=["m2"])
    spec = build_spec(world(x, y, inst("z", supported_models=["m3"], api_base=other)), SERVER)
    assert spec.shared_addresses() == {"127.0.0.1:11434": ("x", "y")}
    assert spec.pool_keyed_addresses() == {"127.0.0.1:11434"}
    # Each pool of the server (the Ollama and the OpenAI API, per model) names its own member.
    shared = [p for p in spec.pools if p.model != "m3"]
    assert len(shared) >= 4
    by_pool = {f"{p.name}|127.0.0.1:11434": {"m1": "x", "m2": "y"}[p.model] for p in shared}
    # An attempt left unkeyed (an earlier pool of a fallback chain) gets the first.
    assert spec.address_names() == {"127.0.0.1:11434": "x", "127.0.0.1:11435": "z", **by_pool}
    names = spec.instance_header_names()
    assert names == ({"127.0.0.1:11435": "z"}, ("127.0.0.1:11434",), by_pool)
    # Two instances at one address in the same pools are one server answering the same models.
    same = build_spec(world(inst("a"), inst("b")), SERVER)
    assert same.shared_addresses() == {"127.0.0.1:11434": ("a", "b")}
    assert same.pool_keyed_addresses() == frozenset()
    assert same.address_names() == {"127.0.0.1:11434": "a"}
    alone = build_spec(world(inst("a"), inst("b", api_base=other)), SERVER)
    assert alone.shared_addresses() == {} and alone.pool_keyed_addresses() == frozenset()


def test_round_robin_ignores_weights() -> None:
    routing = RoutingConfig(strategies={"m": Strategy.ROUND_ROBIN})
    spec = build_spec(world(inst("a", weight=5), inst("b", weight=3), routing=routing), SERVER)
    assert {m.weight for m in pool_of(spec).members} == {1}


@pytest.mark.parametrize(
    ("state", "config_kw", "reason"),
    [
        (InstanceState(), {"enabled": False}, "disabled"),
        (InstanceState(status=OperatorStatus.DRAINING), {}, "draining"),
        (InstanceState(status=OperatorStatus.MAINTENANCE), {}, "maintenance"),
        (InstanceState(health_status=HealthStatus.UNHEALTHY), {}, "unhealthy"),
        (InstanceState(rate_limited_until=NOW + timedelta(seconds=5)), {}, "rate-limited until"),
        (InstanceState(), {"api_base": "http://nowhere.invalid:1"}, "did not resolve"),
    ],
)
def test_excluded_instances_leave_pools(
    state: InstanceState, config_kw: dict[str, object], reason: str
) -> None:
    spec = build_spec(world(inst("a"), inst("b", **config_kw), states={"b": state}), SERVER)
    pool = pool_of(spec)
    assert [m.instance for m in pool.members] == ["a"]
    assert reason in dict(pool.excluded)["b"]
    assert reason in dict(spec.excluded)["b"]


def test_expired_rate_limit_is_back() -> None:
    states = {"b": InstanceState(rate_limited_until=NOW - timedelta(seconds=1))}
    spec = build_spec(world(inst("a"), inst("b"), states=states), SERVER)
    assert len(pool_of(spec).members) == 2


def test_unresolvable_secret_reference_excludes() -> None:
    config = inst(
        "a", provider_type="openai", api_base="https://api.openai.com/v1", api_key="env:NOPE_NOT_SET"
    )
    w = world(config)
    w = World(instances=w.instances, routing=w.routing, now=NOW, addresses=w.addresses, secrets={})
    spec = build_spec(w, SERVER)
    assert "reference" in dict(spec.excluded)["a"]


def test_priority_tiers_best_serves_next_is_backup() -> None:
    spec = build_spec(world(inst("a", priority=1), inst("b", priority=2), inst("c", priority=3)), SERVER)
    members = {m.instance: m.backup for m in pool_of(spec).members}
    assert members == {"a": False, "b": True}
    assert dict(pool_of(spec).excluded)["c"] == "lower priority tier"


def test_worse_tier_serves_when_better_tier_is_out() -> None:
    states = {"a": InstanceState(health_status=HealthStatus.UNHEALTHY)}
    spec = build_spec(world(inst("a", priority=1), inst("b", priority=2), states=states), SERVER)
    assert [(m.instance, m.backup) for m in pool_of(spec).members] == [("b", False)]


@pytest.mark.parametrize("strategy", [Strategy.IP_HASH, Strategy.SESSION, Strategy.RANDOM_TWO])
def test_hash_strategies_get_no_backup_tier(strategy: Strategy) -> None:
    routing = RoutingConfig(strategies={"m": strategy})
    spec = build_spec(world(inst("a", priority=1), inst("b", priority=2), routing=routing), SERVER)
    assert [m.instance for m in pool_of(spec).members] == ["a"]


def test_pool_with_no_available_instance_is_kept_empty() -> None:
    spec = build_spec(world(inst("a", enabled=False)), SERVER)
    pool = pool_of(spec)
    assert pool.members == () and not pool.available


def test_chat_and_embedding_pools_are_separate() -> None:
    spec = build_spec(
        world(inst("c"), inst("e", instance_type="embedding"), inst("b", instance_type="both")), SERVER
    )
    chat = pool_of(spec, kind=Kind.CHAT)
    emb = pool_of(spec, kind=Kind.EMBEDDING)
    assert [m.instance for m in chat.members] == ["b", "c"]
    assert [m.instance for m in emb.members] == ["b", "e"]


def test_tries_bounded_by_members_and_retry_count() -> None:
    spec = build_spec(world(inst("a", retry_count=5), inst("b", retry_count=0)), SERVER)
    assert pool_of(spec).tries == 2
    spec = build_spec(world(inst("a", retry_count=0)), SERVER)
    assert pool_of(spec).tries == 1


def test_keyed_instance_goes_through_a_shim_with_credentials() -> None:
    config = inst(
        "o", provider_type="openai", api_base="https://api.openai.com/v1", api_key="sk-abcdefghijkl"
    )
    spec = build_spec(world(config), SERVER)
    (shim,) = spec.shims
    assert shim.servers == ("10.0.0.1:443", "10.0.0.2:443")
    assert dict(shim.headers) == {"Authorization": "Bearer sk-abcdefghijkl"}
    assert shim.tls_name == "api.openai.com" and shim.scheme == "https"
    routes = {r.client_path: r.upstream_path for r in shim.routes}
    assert routes["/v1/chat/completions"] == "/v1/chat/completions"
    member = pool_of(spec, family=ApiFamily.OPENAI).members[0]
    assert member.address == shim.socket.join(["unix:", ""])


def test_azure_paths_use_deployments_and_api_version() -> None:
    config = inst(
        "az",
        provider_type="azure",
        api_base="https://az.example.com",
        api_key="k" * 20,
        api_version="2024-06-01",
        supported_models=[],
        model_deployments={"gpt-4o": "dep1"},
    )
    spec = build_spec(world(config), SERVER)
    (shim,) = spec.shims
    assert dict(shim.headers) == {"api-key": "k" * 20}
    assert shim.deployments == (("gpt-4o", "dep1"),) and shim.maps_deployments
    routes = {r.client_path: r.upstream_path for r in shim.routes}
    assert routes["/v1/chat/completions"] == (
        "/openai/deployments/${gw_dep_" + shim.id + "}/chat/completions?api-version=2024-06-01"
    )
    assert pool_of(spec, family=ApiFamily.OPENAI, model="gpt-4o").members


def test_anthropic_headers() -> None:
    config = inst("an", provider_type="anthropic", api_base="http://127.0.0.1:9", api_key="ant-0123456789")
    (shim,) = build_spec(world(config), SERVER).shims
    assert dict(shim.headers) == {"anthropic-version": "2023-06-01", "x-api-key": "ant-0123456789"}
    assert [r.client_path for r in shim.routes] == ["/v1/messages"]


@pytest.mark.parametrize(
    ("provider", "base", "path", "expected"),
    [
        ("openai", None, "/v1/chat/completions", "/v1/chat/completions"),
        ("vllm", "http://h:8000/v1", "/v1/embeddings", "/v1/embeddings"),
        ("vllm", "http://h:8000", "/v1/embeddings", "/v1/embeddings"),
        ("perplexity", None, "/v1/chat/completions", "/chat/completions"),
        ("zai", None, "/v1/chat/completions", "/api/paas/v4/chat/completions"),
        ("openai_compatible", "http://h:1/api/v2", "/v1/completions", "/api/v2/completions"),
        ("ollama", "http://h:11434", "/api/chat", "/api/chat"),
        ("ollama", "http://h:11434", "/v1/chat/completions", "/v1/chat/completions"),
        ("anthropic", None, "/v1/messages", "/v1/messages"),
    ],
)
def test_upstream_paths(provider: str, base: str | None, path: str, expected: str) -> None:
    config = InstanceConfig(
        name="x", provider_type=ProviderType(provider), api_base=base, instance_type="both"
    )
    endpoint = next(e for e in ENDPOINTS if e.path == path)
    assert providers.upstream_path(config, endpoint) == expected


def test_direct_only_when_nothing_to_add() -> None:
    assert providers.is_direct(inst("a"))
    assert providers.is_direct(inst("v", provider_type="vllm", api_base="http://h:1/v1"))
    assert not providers.is_direct(inst("v", provider_type="vllm", api_base="http://h:1/x"))
    assert not providers.is_direct(inst("k", api_key="abcdefghijklmn"))
    assert not providers.is_direct(inst("s", api_base="https://h"))
    assert not providers.is_direct(inst("an", provider_type="anthropic", api_base="http://h:1"))


def test_aliases_and_session_header_in_spec() -> None:
    routing = RoutingConfig(model_aliases={"fast": "m"}, session_header="X-User")
    spec = build_spec(world(inst("a"), routing=routing), SERVER)
    assert spec.aliases == (("fast", "m"),) and spec.session_header == "X-User"


def test_spec_is_deterministic_regardless_of_input_order() -> None:
    a, b, c = inst("a"), inst("b", weight=2), inst("c", supported_models=["m", "n"])
    assert build_spec(world(a, b, c), SERVER) == build_spec(world(c, a, b), SERVER)


def test_shorter_timeout_than_pool_mates_goes_through_a_shim() -> None:
    spec = build_spec(world(inst("slow-ok", timeout_seconds=300), inst("strict", timeout_seconds=2)), SERVER)
    (shim,) = spec.shims
    assert shim.instance == "strict" and shim.read_timeout_s == 2 and shim.headers == ()
    members = {m.instance: m.address for m in pool_of(spec).members}
    assert members["slow-ok"] == "127.0.0.1:11434" and members["strict"].startswith("unix:")
    assert pool_of(spec).read_timeout_s == 300
    # Alone (or with equals) it stays direct.
    assert build_spec(world(inst("strict", timeout_seconds=2)), SERVER).shims == ()


def test_instance_header_names_are_what_the_allow_list_captures() -> None:
    spec = build_spec(world(inst("a"), inst("b-1.x_y", api_base="http://127.0.0.1:11435")), SERVER)
    assert spec.address_names() == {"127.0.0.1:11434": "a", "127.0.0.1:11435": "b-1.x_y"}
    assert spec.instance_header_names() == (spec.address_names(), (), {})


def test_endpoint_paths_pass_the_upstream_path_allow_list() -> None:
    # edge.conf.j2 looks them up exactly in $gw_upstream_path, as the regular expression would give them.
    for endpoint in ENDPOINTS:
        assert re.fullmatch(r"/[A-Za-z0-9._~/-]{0,255}", endpoint.path)


def test_model_header_names_leave_case_twins_and_map_parameters_to_the_regex() -> None:
    spec = build_spec(
        world(inst("a", supported_models=["Llama-3", "llama-3", "qwen2.5:7b", "default", "ok/x@1"])),
        SERVER,
    )
    assert spec.model_header_names() == {"qwen2.5:7b": "qwen2.5:7b", "ok/x@1": "ok/x@1"}
