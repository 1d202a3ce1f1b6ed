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
    # weights_min_change 0.5, not 0.2: weights go with the square of the latency ratio, so a 10 % shift of
    # f150's latency against f50's moves its share by 20 % of itself. On CI's two busy cores the stand-ins'
    # latencies do shift that much while other tests start and stop (a real change, which 0.2 follows);
    # per-request noise (+-20 %) moves a window's median a few percent: 0.2 ignores it (test_routing_weights).
    steady = {**FAST_WEIGHTS, "weights_min_change": 0.5}
    set_routing(gateway, default_strategy="least_response_time", **steady)
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
        noise_applied=noise_applied,
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
    per: dict[str, dict[str, Any]] = {field: values, "health": dict.fromkeys(values, health)}
    slow_stubs(gateway, stubs, dict.fromkeys(values, 5), **per)
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


def token_stubs(gw: Gateway, stubs: dict[str, StubServer], answers: dict[str, tuple[int, int]]) -> None:
    """Stand-ins answering `tokens` output tokens (their usage says so) after `delay` ms (+-20 %)."""
    for name, (tokens, delay) in answers.items():
        stub = start_stub(stubs, name, chunks=tokens)
        stub.set_mode("slow", delay_ms=delay, jitter_pct=20)
        r = gw.add_instance(
            name=name, provider_type="openai_compatible", api_base=stub.url, supported_models=["m"]
        )
        assert r.status_code == 201, r.text
    gw.wait_applied()


def candidates(gw: Gateway) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in selection(gw)["candidates"]}


def measured_per_token(gw: Gateway, names: tuple[str, ...]) -> bool:
    found = candidates(gw)
    return all(any(r.endswith("ms per output token") for r in found[n]["reasons"]) for n in names)


def test_least_response_time_judges_long_answers_per_output_token(
    gateway: Gateway, stubs: dict[str, StubServer]
) -> None:
    # short and long take the same 12 ms per output token; slow takes 48. By whole-answer latency long
    # (360 ms) would weigh (60/360)^2 of short: 3 against 100.
    token_stubs(gateway, stubs, {"short": (5, 60), "long": (30, 360), "slow": (5, 240)})
    set_routing(gateway, default_strategy="least_response_time", **FAST_WEIGHTS)
    with Load(gateway.url, "m", sdk=False, threads=4, seconds=60, max_requests=4000) as load:
        names = ("short", "long", "slow")
        wait_for(lambda: measured_per_token(gateway, names), timeout=30, what="tokens measured")
        steps = gateway.status()["weights"]["steps"]
        wait_for(lambda: gateway.status()["weights"]["steps"] >= steps + 2, what="2 recomputations")
        gateway.wait_applied()
        found = candidates(gateway)
    report(
        "least_response_time per output token 5x60/30x360/5x240",
        weights={n: found[n]["weight"] for n in names},
        reasons={n: found[n]["reasons"][:2] for n in names},
        requests=load.total,
    )
    assert found["long"]["weight"] >= 60 and found["short"]["weight"] >= 60
    assert found["slow"]["weight"] <= 15
    assert load.failures == []


def test_performance_based_weighs_latency_and_tokens_per_second(
    gateway: Gateway, stubs: dict[str, StubServer]
) -> None:
    token_stubs(gateway, stubs, {"p50": (10, 50), "p150": (10, 150), "p400": (10, 400)})
    set_routing(gateway, default_strategy="performance_based", **FAST_WEIGHTS)
    with Load(gateway.url, "m", sdk=False, threads=4, seconds=60, max_requests=4000) as load:
        wait_for(lambda: select_share(gateway, "p50") >= 0.9, timeout=30, what="weights settle on p50")
        gateway.wait_applied()
        found = candidates(gateway)
        shares = traffic(load, 300)
    report(
        "performance_based 50/150/400 ms, 10 tokens each",
        weights={n: c["weight"] for n, c in found.items()},
        measured={k: round(v, 3) for k, v in shares.items()},
    )
    assert any(r.endswith("output tokens/s") for r in found["p50"]["reasons"])
    assert shares.get("p50", 0) >= 0.8
    assert load.failures == []


def judged(gw: Gateway, name: str, at_most: int) -> bool:
    """Whether the weights in force give `name` at most `at_most`, judged on its success rate."""
    found = candidates(gw)[name]
    return found["weight"] <= at_most and any(r.startswith("success ") for r in found["reasons"])


def test_health_based_weighs_down_a_failing_instance_and_restores_it(
    gateway: Gateway, stubs: dict[str, StubServer]
) -> None:
    slow_stubs(gateway, stubs, {"steady": 20, "flaky": 20})
    set_routing(gateway, default_strategy="health_based", **FAST_WEIGHTS)
    # Every 3rd request to flaky answers 500: below the breaker's error rate (50 %), so only the
    # weights can act on it.
    stubs["flaky"].set_mode("fail", status=500, fail_ratio=1 / 3)
    with Load(gateway.url, "m", sdk=False, threads=4, seconds=90, max_requests=8000) as load:
        wait_for(lambda: judged(gateway, "flaky", 40), timeout=30, what="flaky weighs less")
        gateway.wait_applied()
        failing = candidates(gateway)["flaky"]
        during = traffic(load, 400)
        stubs["flaky"].set_mode("ok")
        recovered = time.monotonic()
        wait_for(lambda: select_share(gateway, "flaky") >= 0.4, timeout=30, what="flaky restored")
        restored_s = time.monotonic() - recovered
        gateway.wait_applied()
        failed = len(load.failures)
        after = traffic(load, 400)
    report(
        "health_based, flaky failing 1 in 3",
        flaky=failing,
        share_during=round(during.get("flaky", 0), 3),
        restored_s=round(restored_s, 1),
        share_after=round(after.get("flaky", 0), 3),
        failures=len(load.failures),
    )
    (rate,) = [int(r[8:-1]) for r in failing["reasons"] if r.startswith("success ")]
    assert 60 <= rate <= 73 and failing["weight"] <= 40, failing  # 2 in 3 answered: weight ~ 0.67^4
    assert during.get("flaky", 0) <= 0.25
    assert after.get("flaky", 0) >= 0.35
    assert load.failures and all(f.startswith("RuntimeError('500") for f in load.failures)
    assert len(load.failures) == failed  # none once it recovered
