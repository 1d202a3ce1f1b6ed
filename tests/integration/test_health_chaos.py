"""Issue 3 chaos tests: real nginx, stand-in backends told to die, hang, fail or rate-limit, under load.

Each scenario runs a bounded load (threads x seconds, capped request count) and prints its measured
detection/recovery times and error counts (run with -s to see them; the closing note quotes them).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from tests.backends.stub_llm import StubServer
from tests.integration.conftest import start_stub
from tests.integration.gateway import Gateway, wait_for
from tests.integration.load import Load

# Fast health for tests: probe every second, unhealthy after 3 failures, healthy after 2 successes.
FAST = {
    "probe_interval_s": 1.0,
    "probe_timeout_s": 1.0,
    "rise": 2,
    "fall": 3,
    "breaker_cooldown_s": 3.0,
    "breaker_min_requests": 20,
    "breaker_consecutive_failures": 3,
}


def register(gw: Gateway, name: str, stub: StubServer, model: str = "m", **kw: Any) -> None:
    kw.setdefault("health", FAST)
    r = gw.add_instance(name=name, provider_type="ollama", api_base=stub.url, supported_models=[model], **kw)
    assert r.status_code == 201, r.text


def pool_view(gw: Gateway, model: str = "m", family: str = "openai") -> dict[str, Any]:
    for pool in gw.status()["pools"]:
        if pool["model"] == model and pool["family"] == family and pool["kind"] == "chat":
            return pool  # type: ignore[no-any-return]
    raise AssertionError(f"no pool for {model}")


def in_pool(gw: Gateway, name: str, model: str = "m") -> bool:
    return name in pool_view(gw, model)["instances"]


def report(scenario: str, **figures: object) -> None:
    print(f"\n[chaos] {scenario}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def three(gw: Gateway, stubs: dict[str, StubServer]) -> list[StubServer]:
    backends = [start_stub(stubs, f"n{i}") for i in range(3)]
    for stub in backends:
        register(gw, stub.name, stub)
    gw.wait_applied()
    wait_for(lambda: all(in_pool(gw, s.name) for s in backends), what="all in pool")
    return backends


def test_killed_instance_leaves_and_returns(gateway: Gateway, stubs: dict[str, StubServer]) -> None:
    n0, _, _ = three(gateway, stubs)
    wait_for(
        lambda: gateway.admin.get("/admin/instances/n0/state").json()["health_status"] == "healthy",
        what="n0 healthy",
    )
    with Load(gateway.url, "m", sdk=False, seconds=40) as load:
        wait_for(lambda: load.total > 100, what="load running")
        killed = time.monotonic()
        n0.kill()
        wait_for(lambda: not in_pool(gateway, "n0"), timeout=1.0 * 3 + 5, what="n0 out of the pool")
        out_after = time.monotonic() - killed
        reason = pool_view(gateway)["excluded"]["n0"]
        n0.restart()
        restarted = time.monotonic()
        wait_for(lambda: in_pool(gateway, "n0"), timeout=1.0 * 2 + 5, what="n0 back in the pool")
        back_after = time.monotonic() - restarted
        wait_for(lambda: load.last_seen.get("n0", 0) > restarted, what="n0 serving again")
    report(
        "kill 1 of 3",
        out_after_s=round(out_after, 2),
        reason=reason,
        back_after_s=round(back_after, 2),
        requests=load.total,
        client_errors=len(load.failures),
    )
    assert "unhealthy" in reason or "breaker open" in reason
    assert load.failures == []


def test_hanging_instance_is_retried_and_breaker_opens(
    gateway: Gateway, stubs: dict[str, StubServer]
) -> None:
    a, b = start_stub(stubs, "fine"), start_stub(stubs, "hangs")
    register(gateway, "fine", a)
    register(gateway, "hangs", b, timeout_seconds=1, health={**FAST, "probe_interval_s": 60})
    gateway.wait_applied()
    b.set_mode("stall")
    with Load(gateway.url, "m", sdk=False, threads=4, seconds=30) as load:
        started = time.monotonic()
        wait_for(
            lambda: gateway.admin.get("/admin/instances/hangs/state").json()["breaker_state"] == "open",
            timeout=15,
            what="breaker open",
        )
        opened_after = time.monotonic() - started
        served_before = load.total
        wait_for(lambda: load.total > served_before + 100, what="traffic after the breaker opened")
    slowest = max(load.latencies)
    report(
        "hanging instance",
        breaker_open_after_s=round(opened_after, 2),
        requests=load.total,
        client_errors=len(load.failures),
        slowest_s=round(slowest, 2),
    )
    assert load.failures == []
    assert slowest < 1 + 2  # one read timeout, then the retry elsewhere


def test_half_failing_instance_breaker_cycle(gateway: Gateway, stubs: dict[str, StubServer]) -> None:
    good, flaky = start_stub(stubs, "good"), start_stub(stubs, "flaky")
    register(gateway, "good", good)
    # nginx's max_fails rests a server after each failure, so the breaker sees few of its answers: a small
    # minimum sample makes the error-rate rule usable here. The stub fails every second request, but the
    # breaker does not see them in that order: a failed attempt's log line is written only when its retry
    # on "good" has answered, often after the next request to "flaky" (sent before the failure) has been
    # logged as a success. Then every failure is seen with k of 2k+1 requests failed, never the 50 % of
    # the default error rate (CI saw 7 failures in 25 s and no open breaker); 40 % is crossed either way.
    health = {**FAST, "probe_interval_s": 60, "breaker_min_requests": 6, "breaker_error_rate": 0.4}
    register(gateway, "flaky", flaky, health=health)
    gateway.wait_applied()
    flaky.set_mode("status", status=503, fail_ratio=0.5)

    def breaker() -> str:
        return str(gateway.admin.get("/admin/instances/flaky/state").json()["breaker_state"])

    with Load(gateway.url, "m", sdk=False, seconds=40) as load:
        started = time.monotonic()
        wait_for(lambda: breaker() == "open", timeout=25, what="breaker open")
        opened = time.monotonic() - started
        flaky.set_mode("ok")
        healed = time.monotonic()
        wait_for(lambda: breaker() == "half_open", timeout=10, what="half-open")
        wait_for(lambda: breaker() == "closed", timeout=15, what="closed again")
        closed_after = time.monotonic() - healed
    report(
        "503 on half the requests",
        breaker_open_after_s=round(opened, 2),
        closed_after_recovery_s=round(closed_after, 2),
        requests=load.total,
        client_errors=len(load.failures),
    )
    assert load.failures == []


def test_429_retry_after_is_honoured(gateway: Gateway, stubs: dict[str, StubServer]) -> None:
    limited, other = start_stub(stubs, "limited"), start_stub(stubs, "other")
    register(gateway, "limited", limited, health={**FAST, "probe_interval_s": 60})
    register(gateway, "other", other, model="spare")
    gateway.wait_applied()
    # A single-instance pool: the 429 is the final answer, so its Retry-After is in the log line.
    limited.set_mode("status", status=429, retry_after="7")
    first = gateway.client.post("/v1/chat/completions", json={"model": "m"})
    assert first.status_code == 429 and first.headers["Retry-After"] == "7"
    marked = time.monotonic()
    wait_for(lambda: not in_pool(gateway, "limited"), timeout=3, what="rate-limited out of the pool")
    gateway.wait_applied()
    assert "rate-limited until" in pool_view(gateway)["excluded"]["limited"]
    limited.set_mode("ok")
    limited.clear_requests()
    quick = gateway.client.post("/v1/chat/completions", json={"model": "m"})
    assert quick.status_code == 503 and quick.headers["Retry-After"]
    wait_for(lambda: in_pool(gateway, "limited"), timeout=7 + 5, what="back after Retry-After")
    back = time.monotonic() - marked
    gateway.wait_applied()
    report("429 Retry-After: 7", out_for_s=round(back, 2))
    assert back >= 7 - 0.5
    assert gateway.client.post("/v1/chat/completions", json={"model": "m"}).status_code == 200


def chat_requests_after(stub: StubServer, since: float) -> list[float]:
    """Wall-clock times of the chat requests the stub received from `since` on."""
    return sorted(
        r["time"] for r in stub.requests() if r["path"].endswith("/chat/completions") and r["time"] >= since
    )


def test_429_retry_after_20_under_load(gateway: Gateway, stubs: dict[str, StubServer]) -> None:
    """The issue's scenario: one of three instances answers 429 with Retry-After: 20 under steady load.
    Clients see no error (retried elsewhere); the instance gets no traffic for 20 s, then does."""
    limited = start_stub(stubs, "limited")
    register(gateway, "limited", limited, health={**FAST, "probe_interval_s": 60})
    for name in ("other1", "other2"):
        register(gateway, name, start_stub(stubs, name))
    gateway.wait_applied()
    wait_for(lambda: all(in_pool(gateway, n) for n in ("limited", "other1", "other2")), what="all in pool")
    # Paced: on a fast machine 20,000 unpaced requests were spent before the instance came back (~1,000/s).
    with Load(gateway.url, "m", sdk=False, threads=4, seconds=45, max_requests=20_000, rate=400) as load:
        wait_for(lambda: load.total > 100, what="load running")
        told = time.time()
        limited.set_mode("status", status=429, retry_after="20")
        wait_for(lambda: not in_pool(gateway, "limited"), timeout=3, what="out of the pool")
        gateway.wait_applied()
        out_applied = time.time()
        limited.set_mode("ok")  # its window has passed by the time it is asked again
        wait_for(lambda: chat_requests_after(limited, out_applied), timeout=20 + 8, what="traffic again")
    first_429 = chat_requests_after(limited, told)[0]
    gap_from = [t for t in chat_requests_after(limited, told) if t < out_applied]
    back = chat_requests_after(limited, out_applied)[0]
    report(
        "429 Retry-After: 20 under load",
        answered_429_before_out=len(gap_from),
        out_after_s=round(out_applied - first_429, 2),
        no_traffic_for_s=round(back - first_429, 2),
        requests=load.total,
        rps=round(load.total / max(1e-9, time.time() - told + 1), 0),
        client_errors=len(load.failures),
    )
    assert load.failures == []
    assert 20 - 0.5 <= back - first_429 <= 20 + 5


@pytest.mark.parametrize("behind", ["shim", "direct"])
def test_retried_429_keeps_the_instances_retry_after(
    gateway: Gateway, stubs: dict[str, StubServer], behind: str
) -> None:
    """An instance answers 429 with Retry-After: 4 and nginx retries the request on another instance: the
    client sees a 200, and the instance is out for 4 s, not the 20 s default. A credentialed (cloud)
    instance is reached through its shim; a plain local one directly, where nginx keeps only the last
    attempt's headers and the pool's _429 location has to catch the answer first."""
    limited, other = start_stub(stubs, "limited"), start_stub(stubs, "local")
    if behind == "shim":
        r = gateway.add_instance(
            name="limited",
            provider_type="openai",
            api_base=limited.url + "/v1",
            api_key="sk-cloud-provider-0001",
            supported_models=["m"],
            health={**FAST, "probe_interval_s": 60},
        )
        assert r.status_code == 201, r.text
    else:
        register(gateway, "limited", limited, health={**FAST, "probe_interval_s": 60})
    register(gateway, "local", other, health={**FAST, "probe_interval_s": 60})
    gateway.wait_applied()
    wait_for(lambda: in_pool(gateway, "limited") and in_pool(gateway, "local"), what="both in pool")
    limited.set_mode("status", status=429, retry_after="4")
    told = time.time()
    answers = []
    for _ in range(20):  # round robin: some requests try the limited instance first
        answers.append(gateway.client.post("/v1/chat/completions", json={"model": "m"}).status_code)
        if chat_requests_after(limited, told):
            break
    assert chat_requests_after(limited, told) and set(answers) == {200}
    marked = time.monotonic()
    wait_for(lambda: not in_pool(gateway, "limited"), timeout=3, what="rate-limited out of the pool")
    limited.set_mode("ok")
    wait_for(lambda: in_pool(gateway, "limited"), timeout=15, what="back after its Retry-After")
    back = time.monotonic() - marked
    report(f"429 Retry-After: 4 on a retried attempt ({behind})", out_for_s=round(back, 2))
    assert 4 - 1.0 <= back < 10  # the instance's 4 s, not the 20 s default


def test_two_429s_in_one_request_keep_their_own_retry_after(
    gateway: Gateway, stubs: dict[str, StubServer]
) -> None:
    """Two plain local instances answer 429 (Retry-After 3 and 6) and one request meets both before the
    third answers: each is out for its own time, not the 20 s default (a pool's _429_1 and _429_2
    locations each note one)."""
    names = ("slow3", "slow6", "fine")
    for name in names:
        register(gateway, name, start_stub(stubs, name), health={**FAST, "probe_interval_s": 60})
    gateway.wait_applied()
    wait_for(lambda: all(in_pool(gateway, n) for n in names), what="all in pool")
    stubs["slow3"].set_mode("status", status=429, retry_after="3")
    stubs["slow6"].set_mode("status", status=429, retry_after="6")

    def request_ids(name: str) -> set[str]:
        return {
            r["headers"].get("x-request-id", "")
            for r in stubs[name].requests()
            if r["path"].endswith("/chat/completions")
        }

    answers = []
    for _ in range(30):  # round robin: a request that tries both limited instances before the fine one
        answers.append(gateway.client.post("/v1/chat/completions", json={"model": "m"}).status_code)
        if request_ids("slow3") & request_ids("slow6"):
            break
    marked = time.monotonic()
    assert request_ids("slow3") & request_ids("slow6") and set(answers) == {200}
    wait_for(
        lambda: not in_pool(gateway, "slow3") and not in_pool(gateway, "slow6"), timeout=3, what="both out"
    )
    for name in ("slow3", "slow6"):
        stubs[name].set_mode("ok")
    wait_for(lambda: in_pool(gateway, "slow3"), timeout=15, what="slow3 back")
    back3 = time.monotonic() - marked
    wait_for(lambda: in_pool(gateway, "slow6"), timeout=15, what="slow6 back")
    back6 = time.monotonic() - marked
    report("two 429s in one request, Retry-After 3 and 6", out_for_s=(round(back3, 2), round(back6, 2)))
    assert 3 - 1.0 <= back3 < 6 and 6 - 1.0 <= back6 < 12  # each its own time, neither the 20 s default


def test_reload_every_half_second_under_load(gateway: Gateway, stubs: dict[str, StubServer]) -> None:
    three(gateway, stubs)
    stop = threading.Event()
    reloads = [0]

    def reloader() -> None:
        with httpx.Client(base_url=gateway.admin.base_url, headers=dict(gateway.admin.headers)) as admin:
            while not stop.is_set() and reloads[0] < 40:
                admin.post("/admin/reload")
                reloads[0] += 1
                stop.wait(0.5)

    thread = threading.Thread(target=reloader, daemon=True)
    with (
        Load(gateway.url, "m", sdk=True, seconds=15, threads=3) as sdk_load,
        Load(gateway.url, "m", sdk=False, retry_transport=False, seconds=15, threads=3) as raw_load,
    ):
        thread.start()
        wait_for(lambda: reloads[0] >= 20, timeout=30, what="20 reloads")
        stop.set()
        thread.join(10)
    report(
        "reload every 0.5 s",
        reloads=reloads[0],
        sdk_requests=sdk_load.total,
        sdk_failures=len(sdk_load.failures),
        raw_requests=raw_load.total,
        raw_failures=len(raw_load.failures),
        raw_failure_rate=f"{len(raw_load.failures) / max(1, raw_load.total):.4%}",
    )
    assert sdk_load.failures == []
    assert sdk_load.total > 100 and raw_load.total > 100


def test_stream_survives_reloads_and_a_dying_upstream_is_an_error(
    gateway: Gateway, stubs: dict[str, StubServer]
) -> None:
    stub = start_stub(stubs, "streamer")
    register(gateway, "streamer", stub)
    gateway.wait_applied()
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="k", max_retries=0)
    stream = client.chat.completions.create(
        model="m",
        messages=[],
        stream=True,
        extra_headers={"X-Stub-Chunks": "40", "X-Stub-Chunk-Delay-Ms": "50"},
    )
    chunks, finished = 0, None
    for i, chunk in enumerate(stream):
        if chunk.choices:
            chunks += 1
            finished = chunk.choices[0].finish_reason or finished
        if i % 4 == 0 and i < 40:
            gateway.admin.post("/admin/reload")
    assert chunks >= 40 and finished == "stop"
    assert gateway.status()["reloads"] >= 10

    stub.set_mode("die_mid_stream", after_chunks=3)
    broken = client.chat.completions.create(model="m", messages=[], stream=True)
    with pytest.raises(openai.APIError):
        for _ in broken:
            pass


def test_controller_killed_under_load(stubs: dict[str, StubServer]) -> None:
    with Gateway() as gw:
        three(gw, stubs)
        checksum = gw.wait_applied()
        with Load(gw.url, "m", sdk=False, seconds=20) as load:
            wait_for(lambda: load.total > 100, what="load")
            assert gw.proc is not None
            os.kill(gw.proc.pid, signal.SIGKILL)
            gw.proc.wait(10)
            served = load.total
            wait_for(lambda: load.total > served + 300, what="serving without the controller")
            gw.start_controller()
            status = gw.status()
        report(
            "controller killed",
            requests=load.total,
            client_errors=len(load.failures),
            reloads_after_restart=status["reloads"],
        )
        assert load.failures == []
        assert status["checksum"] == checksum and status["reloads"] == 0


def test_pool_down_goes_to_fallback_then_503(gateway: Gateway, stubs: dict[str, StubServer]) -> None:
    local, cloud = start_stub(stubs, "local"), start_stub(stubs, "cloud")
    register(gateway, "local", local, model="llama")
    register(gateway, "cloud", cloud, model="gpt-mini")
    r = gateway.admin.put("/admin/routing", json={"fallbacks": {"llama": ["gpt-mini"]}})
    assert r.status_code == 200, r.text
    gateway.wait_applied()
    assert (
        gateway.client.post("/v1/chat/completions", json={"model": "llama"}).headers["X-Backend-Name"]
        == "local"
    )

    local.kill()  # before the controller notices: nginx's own failure goes down the chain
    r = gateway.client.post("/v1/chat/completions", json={"model": "llama"})
    assert r.status_code == 200 and r.headers["X-Backend-Name"] == "cloud"
    fallback = cloud.last_request("/v1/chat/completions")
    assert fallback["json"]["model"] == "gpt-mini"  # the body was rewritten for the fallback
    assert "x-ishgw-model" not in fallback["headers"]  # only an Azure instance's shim is told the model
    try:
        wait_for(lambda: not in_pool(gateway, "local", "llama"), timeout=10, what="local out")
    except AssertionError as exc:  # seen once in a full run: say what the controller knew
        state = gateway.admin.get("/admin/instances/local/state").json()
        health = gateway.admin.get("/admin/instances/local/health").json()
        raise AssertionError(f"{exc}\nstate: {state}\nhealth: {health}") from exc
    gateway.wait_applied()
    r = gateway.client.post("/v1/chat/completions", json={"model": "llama"})
    assert r.status_code == 200 and r.headers["X-Backend-Name"] == "cloud"

    cloud.kill()
    started = time.monotonic()
    r = gateway.client.post("/v1/chat/completions", json={"model": "llama"})
    took = time.monotonic() - started
    report("whole chain down", answer=r.status_code, took_s=round(took, 3))
    assert (
        r.status_code == 503 and r.headers["Retry-After"] and r.json()["error"]["type"] == "overloaded_error"
    )
    assert took < 5
