"""Model discovery: which models an instance serves, how probe lists feed it, and the pools it makes."""

from __future__ import annotations

import pytest

from control_plane.health.probes import Outcome, ProbeResult, evaluate, probe_request
from control_plane.health.tracker import HealthTracker
from control_plane.providers import ApiFamily, Kind
from control_plane.registry.models import InstanceConfig, InstanceState
from control_plane.render.spec import build_spec, pool_name
from control_plane.routing.discovery import MAX_DISCOVERED, Source, catalog, clean_discovered, served_models
from tests.unit.test_spec import SERVER, inst, world


@pytest.mark.parametrize(
    ("provider", "setting", "discovers"),
    [
        ("ollama", None, True),
        ("vllm", None, True),
        ("openai_compatible", None, True),
        ("openai", None, False),
        ("anthropic", None, False),
        ("azure", None, False),
        ("ollama", False, False),
        ("openai", True, True),
    ],
)
def test_discover_models_defaults_by_provider(provider: str, setting: bool | None, discovers: bool) -> None:
    base = "https://az.example.com" if provider == "azure" else "http://127.0.0.1:1"
    config = InstanceConfig(name="a", provider_type=provider, api_base=base, discover_models=setting)
    assert config.discovers() is discovers


def test_served_models_configured_first_then_discovered() -> None:
    state = InstanceState(discovered_models=["z", "m", "llama3:latest"])
    served = served_models(inst("a", supported_models=["m", "b"]), state)
    assert served == {
        "m": Source.CONFIGURED,
        "b": Source.CONFIGURED,
        "llama3:latest": Source.DISCOVERED,
        "z": Source.DISCOVERED,
    }
    assert served_models(inst("a", discover_models=False), state) == {"m": Source.CONFIGURED}


@pytest.mark.parametrize(
    "bad",
    ["", " m", "m\n", "a;b", "x{y}", "-lead", "q'uote", 'dq"', "a" * 129, "tab\tname", "brace}"],
)
def test_discovered_names_are_validated_like_configured_ones(bad: str) -> None:
    assert clean_discovered([bad, "ok-model"]) == ("ok-model",)


def test_discovered_names_are_bounded() -> None:
    names = [f"m{i:04d}" for i in range(MAX_DISCOVERED + 50)]
    assert len(clean_discovered(names)) == MAX_DISCOVERED
    assert clean_discovered([":latest", "m", "m"]) == ("m",)


def test_discovered_models_make_pools_and_leave_them() -> None:
    a = inst("a", supported_models=["m"])
    with_new = world(a, states={"a": InstanceState(discovered_models=["m", "new"])})
    spec = build_spec(with_new, SERVER)
    names = {p.name for p in spec.pools}
    assert pool_name(ApiFamily.OLLAMA, Kind.CHAT, "new") in names
    assert pool_name(ApiFamily.OPENAI, Kind.CHAT, "new") in names
    gone = build_spec(world(a, states={"a": InstanceState(discovered_models=["m"])}), SERVER)
    assert pool_name(ApiFamily.OLLAMA, Kind.CHAT, "new") not in {p.name for p in gone.pools}
    off = build_spec(
        world(inst("a", discover_models=False), states={"a": InstanceState(discovered_models=["new"])}),
        SERVER,
    )
    assert {p.model for p in off.pools} == {"m"}


def test_probe_lists_replace_discovered_models_exactly() -> None:
    config = InstanceConfig(name="a", provider_type="ollama", api_base="http://127.0.0.1:1")
    request = probe_request(config, None)
    assert request is not None
    listed = evaluate(request, 200, b'{"models":[{"name":"x"},{"name":"y"}]}', 1.0)
    empty = evaluate(request, 200, b'{"models":[]}', 1.0)
    garbage = evaluate(request, 200, b"<html>", 1.0)
    assert (listed.listed, listed.models) == (True, ("x", "y"))
    assert (empty.listed, empty.models) == (True, ())
    assert (garbage.outcome, garbage.listed) == (Outcome.OK, False)

    t = HealthTracker()
    t.sync([(config, InstanceState())], {"127.0.0.1:1": "a"}, 0, 0)
    t.probe("a", listed, 0)
    assert t.instances["a"].discovered == ("x", "y") and t.membership_changed
    for _ in range(config.health.rise):
        t.probe("a", listed, 0)  # healthy now
    t.membership_changed = False
    t.probe("a", listed, 0)
    assert not t.membership_changed  # the same list: nothing to reconcile
    t.probe("a", garbage, 0)
    assert t.instances["a"].discovered == ("x", "y")  # no list said nothing
    t.probe("a", empty, 0)
    # mypy keeps the narrowing from the assert above across the call in between
    assert t.instances["a"].discovered == () and t.membership_changed  # type: ignore[comparison-overlap]
    t.probe("a", ProbeResult(Outcome.FAIL, "refused", 1.0), 0)
    assert t.instances["a"].discovered == ()


def test_catalog_names_sources_and_availability() -> None:
    pairs = [
        (inst("b", supported_models=["m"]), InstanceState(discovered_models=["d"])),
        (inst("a", supported_models=["m"], discover_models=False), InstanceState(discovered_models=["d"])),
    ]
    assert catalog(pairs, frozenset({("d", "b"), ("m", "b")})) == [
        {"model": "d", "instances": [{"name": "b", "source": "discovered", "available": True}]},
        {
            "model": "m",
            "instances": [
                {"name": "a", "source": "configured", "available": False},
                {"name": "b", "source": "configured", "available": True},
            ],
        },
    ]
