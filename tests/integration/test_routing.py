"""Issue 13 against real nginx: model discovery (and, below, routing that learns)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import httpx
import ollama
import pytest

from tests.backends.stub_llm import StubServer
from tests.integration.conftest import start_stub
from tests.integration.gateway import Gateway, wait_for
from tests.integration.load import Load

# Probe twice a second: discovery follows the probe.
QUICK_PROBES = {"probe_interval_s": 0.5, "probe_timeout_s": 1.0, "rise": 1, "fall": 3}


def models_view(gw: Gateway) -> dict[str, list[dict[str, Any]]]:
    response = gw.admin.get("/admin/models")
    assert response.status_code == 200, response.text
    return {item["model"]: item["instances"] for item in response.json()["models"]}


def served_by(gw: Gateway, model: str) -> list[str]:
    return [i["name"] for i in models_view(gw).get(model, []) if i["available"]]


def pool_models(gw: Gateway) -> set[str]:
    return {pool["model"] for pool in gw.status()["pools"]}


def ollama_chat(gw: Gateway, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    return gw.client.post("/api/chat", json=body)


def test_a_model_pulled_at_runtime_is_served_and_leaves_when_removed(
    gateway: Gateway, stubs: dict[str, StubServer]
) -> None:
    stub = start_stub(stubs, "o1", models=("base",))
    r = gateway.add_instance(  # discover_models unset (None): the ollama default, on
        name="o1",
        provider_type="ollama",
        api_base=stub.url,
        supported_models=["base"],
        health=QUICK_PROBES,
        discover_models=None,
    )
    assert r.status_code == 201, r.text
    gateway.wait_applied()
    assert ollama_chat(gateway, "fresh").status_code == 404

    stub.set_models(["base", "fresh:latest"])  # `ollama pull fresh` on the instance; no admin call
    wait_for(lambda: served_by(gateway, "fresh:latest") == ["o1"], what="fresh discovered")
    view = models_view(gateway)
    assert view["base"] == [{"name": "o1", "source": "configured", "available": True}]
    assert view["fresh:latest"] == [{"name": "o1", "source": "discovered", "available": True}]
    gateway.wait_applied()
    answer = ollama_chat(gateway, "fresh")  # Ollama's spelling of fresh:latest
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-ISHGW-Instance"] == "o1"
    # The official SDK, by the full name the list gave.
    sdk = ollama.Client(host=gateway.url)
    assert sdk.chat(model="fresh:latest", messages=[{"role": "user", "content": "hi"}]).message.content

    stub.set_models(["base"])  # `ollama rm fresh`
    wait_for(lambda: "fresh:latest" not in models_view(gateway), what="fresh gone")
    wait_for(lambda: "fresh:latest" not in pool_models(gateway), what="its pools gone")
    gateway.wait_applied()
    gone = ollama_chat(gateway, "fresh")
    assert gone.status_code == 404, gone.text
    assert ollama_chat(gateway, "base").status_code == 200


def test_discovery_off_serves_only_configured_models(gateway: Gateway, stubs: dict[str, StubServer]) -> None:
    stub = start_stub(stubs, "o2", models=("base", "extra"))
    r = gateway.add_instance(
        name="o2",
        provider_type="ollama",
        api_base=stub.url,
        supported_models=["base"],
        discover_models=False,
        health=QUICK_PROBES,
    )
    assert r.status_code == 201, r.text
    wait_for(
        lambda: (
            gateway.admin.get("/admin/instances/o2/state").json()["discovered_models"] == ["base", "extra"]
        ),
        what="probe listed the models",
    )
    gateway.wait_applied()
    assert set(models_view(gateway)) == {"base"}
    assert ollama_chat(gateway, "extra").status_code == 404


# --- routing that learns -----------------------------------------------------------------------------------

# Recompute every second over a 5 s window: the defaults (10 s, 60 s) made quick enough for a test.
FAST_WEIGHTS = {"weights_interval_s": 1.0, "weights_window_s": 5.0, "weights_min_change": 0.2}


def slow_stubs(
    gw: Gateway, stubs: dict[str, StubServer], delays: dict[str, int], **per: dict[str, Any]
) -> None:
    """Stand-ins answering after `delay` ms (+-20 %), registered for model m."""
    for name, delay in delays.items():
        stub = start_stub(stubs, name)
        stub.set_mode("slow", delay_ms=delay, jitter_pct=20)
        extra = {key: values[name] for key, values in per.items()}
        r = gw.add_instance(
            name=name, provider_type="openai_compatible", api_base=stub.url, supported_models=["m"], **extra
        )
        assert r.status_code == 201, r.text
    gw.wait_applied()


def set_routing(gw: Gateway, **routing: Any) -> None:
    r = gw.admin.put("/admin/routing", json=routing)
    assert r.status_code == 200, r.text
    gw.wait_applied()


def selection(gw: Gateway, model: str = "m") -> dict[str, Any]:
    r = gw.admin.post("/admin/select", json={"model": model, "api": "openai", "kind": "chat"})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def select_share(gw: Gateway, name: str) -> float:
    return next((c["share"] for c in selection(gw)["candidates"] if c["name"] == name), 0.0)


def traffic(load: Load, requests: int, timeout: float = 30.0) -> dict[str, float]:
    """Each instance's share of the next `requests` answers the load gets."""
    before = Counter(load.seen)
    wait_for(
        lambda: sum(load.seen.values()) - sum(before.values()) >= requests, timeout=timeout, what="traffic"
    )
    delta = Counter(load.seen)
    delta.subtract(before)
    total = sum(delta.values())
    return {name: count / total for name, count in delta.items() if count}


def report(scenario: str, **figures: object) -> None:
    print(f"\n[routing] {scenario}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def test_least_response_time_sends_most_to_the_fastest_and_follows_a_slowdown(
    gateway: Gateway, stubs: dict[str, StubServer]
) -> None:
    slow_stubs(gateway, stubs, {"f50": 50, "f150": 150, "f400": 400})
    set_routing(gateway, default_strategy="least_response_time", **FAST_WEIGHTS)
    with Load(gateway.url, "m", sdk=False, threads=4, seconds=120, max_requests=6000) as load:
        started = time.monotonic()
        wait_for(lambda: select_share(gateway, "f50") >= 0.7, timeout=30, what="weights settle on f50")
        settled_s = time.monotonic() - started
        gateway.wait_applied()
        settled = traffic(load, 600)

        # Latency noise (+-20 % per request) moves no weight far enough to reload.
        weights = gateway.status()["weights"]
        reloads = gateway.status()["reloads"]
        wait_for(
            lambda: gateway.status()["weights"]["steps"] >= weights["steps"] + 8, what="8 recomputations"
        )
        noise_reloads = gateway.status()["reloads"] - reloads
        noise_applied = gateway.status()["weights"]["applied"] - weights["applied"]

        stubs["f50"].set_mode("slow", delay_ms=600, jitter_pct=20)
        slowed = time.monotonic()
        wait_for(lambda: selection(gateway)["instance"] == "f150", timeout=30, what="weights move to f150")
        moved_s = time.monotonic() - slowed
        gateway.wait_applied()
        after = traffic(load, 300)
    report(
        "least_response_time 50/150/400 ms",
        settled_s=round(settled_s, 1),
        share_f50=round(settled.get("f50", 0), 3),
        noise_reloads=noise_reloads,
        moved_after_f50_slowed_s=round(moved_s, 1),
        share_f150_after=round(after.get("f150", 0), 3),
        requests=load.total,
        failures=len(load.failures),
    )
    assert settled.get("f50", 0) >= 0.7
    assert (noise_reloads, noise_applied) == (0, 0)
    assert after.get("f150", 0) >= 0.6 and after.get("f50", 0) < 0.2
    assert load.failures == []


@pytest.mark.parametrize(
    ("strategy", "field", "values"),
    [
        ("cost_optimized", "cost_per_1k_tokens", {"cheap": 0.1, "mid": 0.5, "dear": 2.0}),
        ("quality_based", "quality_score", {"cheap": 90.0, "mid": 70.0, "dear": 10.0}),
    ],
)
def test_ranked_strategy_serves_the_best_tier_and_fails_over_without_errors(
    gateway: Gateway, stubs: dict[str, StubServer], strategy: str, field: str, values: dict[str, float]
) -> None:
    health = {"probe_interval_s": 0.5, "probe_timeout_s": 1.0, "fall": 2, "breaker_consecutive_failures": 3}
    slow_stubs(
        gateway, stubs, dict.fromkeys(values, 5), **{field: values, "health": dict.fromkeys(values, health)}
    )
    set_routing(gateway, default_strategy=strategy)
    assert [(c["name"], c["tier"]) for c in selection(gateway)["candidates"]] == [("cheap", 0), ("mid", 1)]
    with Load(gateway.url, "m", sdk=False, threads=4, seconds=60, max_requests=20_000) as load:
        best = traffic(load, 300)
        stubs["cheap"].kill()
        killed = time.monotonic()
        wait_for(lambda: selection(gateway)["instance"] == "mid", timeout=15, what="mid serves")
        failover_s = time.monotonic() - killed
        gateway.wait_applied()
        after = traffic(load, 300)
    report(strategy, best_share=best.get("cheap"), failover_s=round(failover_s, 2), requests=load.total)
    assert best == {"cheap": 1.0}
    assert after == {"mid": 1.0}
    assert [(c["name"], c["tier"]) for c in selection(gateway)["candidates"]] == [("mid", 0), ("dear", 1)]
    assert load.failures == []


def test_adaptive_converges_keeps_exploring_and_select_agrees_with_traffic(
    gateway: Gateway, stubs: dict[str, StubServer]
) -> None:
    slow_stubs(gateway, stubs, {"a20": 20, "b60": 60, "c150": 150})
    set_routing(gateway, default_strategy="adaptive", explore_share=0.05, **FAST_WEIGHTS)
    with Load(gateway.url, "m", sdk=False, threads=4, seconds=120, max_requests=10_000) as load:
        started = time.monotonic()
        wait_for(lambda: select_share(gateway, "a20") >= 0.9, timeout=30, what="adaptive converges on a20")
        converged_s = time.monotonic() - started
        gateway.wait_applied()
        applied = gateway.status()["weights"]["applied"]
        expected = {c["name"]: c["share"] for c in selection(gateway)["candidates"]}
        measured = traffic(load, 1000)
        unchanged = gateway.status()["weights"]["applied"] == applied
    explored = 1 - measured.get("a20", 0)
    report(
        "adaptive 20/60/150 ms",
        converged_s=round(converged_s, 1),
        expected=expected,
        measured={k: round(v, 3) for k, v in measured.items()},
        explored=round(explored, 3),
        failures=len(load.failures),
    )
    assert unchanged, "weights changed while measuring"
    for name in expected:
        assert abs(measured.get(name, 0) - expected[name]) <= 0.10, (name, measured, expected)
    assert measured.get("b60", 0) > 0.005 and measured.get("c150", 0) > 0.005  # still explored
    assert 0.04 <= explored <= 0.15  # explore_share (0.05) of traffic, within the measuring noise
    assert load.failures == []


def test_a_queueing_vllm_instance_gets_less_traffic(gateway: Gateway, stubs: dict[str, StubServer]) -> None:
    for name in ("idle", "busy"):
        stub = start_stub(stubs, name)
        stub.set_mode("slow", delay_ms=20, jitter_pct=20)
        r = gateway.add_instance(name=name, provider_type="vllm", api_base=stub.url, supported_models=["m"])
        assert r.status_code == 201, r.text
    stubs["busy"].set_load(waiting=20, running=4, cache=0.5)  # what vLLM's /metrics says of a full queue
    set_routing(gateway, default_strategy="health_based", **FAST_WEIGHTS)
    with Load(gateway.url, "m", sdk=False, threads=4, seconds=60, max_requests=5000) as load:
        wait_for(lambda: select_share(gateway, "busy") < 0.4, timeout=30, what="busy weighs less")
        gateway.wait_applied()
        busy = next(c for c in selection(gateway)["candidates"] if c["name"] == "busy")
        shares = traffic(load, 600)
    report("vLLM queue", busy=busy, measured={k: round(v, 3) for k, v in shares.items()})
    assert busy["weight"] == 50 and "vLLM: 20 waiting, 4 running, KV cache 50%" in busy["reasons"]
    assert abs(shares.get("busy", 0) - 1 / 3) <= 0.1
    assert load.failures == []
