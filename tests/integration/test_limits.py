"""Issue 12, limits enforced: a key's tpm_limit and its budget, checked in nginx from shared memory before
anything reaches a provider (gw.limits), in each client API style; a budget survives a restart of nginx
(the controller's seed); an instance at its max_rpm leaves its pools and comes back."""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.backends.stub_llm import StubServer
from tests.integration.conftest import start_stub
from tests.integration.gateway import Gateway, clear_of_midnight, wait_for

LONG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "x" * 1200}]  # ~300 prompt tokens
ENV = {
    "ISHGW_AUTH_REQUIRED": "true",
    "ISHGW_USAGE_ACCOUNTING": "true",
    "ISHGW_USAGE_DRAIN_INTERVAL_S": "0.3",
}


def _key(gw: Gateway, **settings: Any) -> tuple[str, str]:
    created = gw.admin.post("/admin/keys", json=settings)
    assert created.status_code == 201, created.text
    return created.json()["key"], created.json()["id"]


def _instance(gw: Gateway, stubs: dict[str, StubServer], name: str, **extra: Any) -> None:
    stub = start_stub(stubs, name)
    created = gw.add_instance(
        name=name,
        provider_type="ollama",
        api_base=stub.url,
        supported_models=["llama3:8b"],
        instance_type="both",
        **extra,
    )
    assert created.status_code == 201, created.text


def _served(stub: StubServer) -> int:
    """Requests the stand-in answered (its probes count too: GET /api/tags and the like)."""
    return int(httpx.get(f"{stub.url}/_control").json()["counters"]["requests_total"])


def _chat(secret: str, gw: Gateway, model: str = "llama3:8b") -> httpx.Response:
    return httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": model, "messages": LONG},
        headers={"Authorization": f"Bearer {secret}"},
        timeout=10,
    )


def _styles(gw: Gateway, secret: str) -> dict[str, httpx.Response]:
    """One request per API family (the limits answer before the model is looked up)."""
    auth = {"Authorization": f"Bearer {secret}"}
    body = {"model": "llama3:8b", "messages": LONG, "max_tokens": 5}
    return {
        "openai": httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=auth),
        "anthropic": httpx.post(
            f"{gw.url}/v1/messages", json=body, headers={**auth, "anthropic-version": "2023-06-01"}
        ),
        "ollama": httpx.post(f"{gw.url}/api/chat", json={**body, "stream": False}, headers=auth),
    }


def test_a_key_over_its_budget_is_refused_in_each_api_style_across_restarts(
    stubs: dict[str, StubServer],
) -> None:
    """max_budget_usd 0.1 a day at $1 per 1,000 tokens: the first request (~300 tokens) spends it; every
    API style then answers 429 (OpenAI: insufficient_quota; Anthropic: budget_exceeded) with the reset time,
    through the SDKs too; the refusal holds after a reload, a controller restart and a restart of nginx
    (the controller's seed), and another key is served meanwhile; the key's usage shows the budget left."""
    clear_of_midnight(180)  # the day's budget resets at midnight (UTC)
    with Gateway(extra_env=ENV) as gw:
        _instance(gw, stubs, "priced", cost_per_1k_tokens=1.0)
        secret, key_id = _key(gw, name="capped", max_budget_usd=0.1, budget_period="day")
        other, _ = _key(gw, name="free")
        bad = gw.admin.post("/admin/keys", json={"name": "bad", "budget_period": "week"})
        assert bad.status_code == 422 and "budget_period" in bad.text
        gw.wait_applied()

        first = _chat(secret, gw)
        assert first.status_code == 200, first.text
        spent = first.json()["usage"]["total_tokens"] / 1000
        assert spent > 0.1

        def refused() -> bool:
            return _chat(secret, gw).status_code == 429

        wait_for(refused, timeout=5, what="the budget spent")
        now = int(time.time())
        midnight = now - now % 86400 + 86400
        reset = datetime.fromtimestamp(midnight, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        answers = _styles(gw, secret)
        for family, answer in answers.items():
            assert answer.status_code == 429, (family, answer.text)
            assert abs(int(answer.headers["Retry-After"]) - (midnight - time.time())) <= 5, family
            assert answer.headers["X-ISHGW-Budget-Reset"] == reset
            assert "X-Request-ID" in answer.headers
        assert answers["openai"].json()["error"]["type"] == "insufficient_quota"
        assert reset in answers["openai"].json()["error"]["message"]
        assert answers["anthropic"].json()["error"]["type"] == "budget_exceeded"
        assert "budget of $0.1 per day" in answers["ollama"].json()["error"]

        with pytest.raises(openai.RateLimitError) as oe:
            openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0).chat.completions.create(
                model="llama3:8b", messages=LONG
            )
        assert oe.value.type == "insufficient_quota"
        with pytest.raises(anthropic.RateLimitError) as ae:
            anthropic.Anthropic(base_url=gw.url, api_key=secret, max_retries=0).messages.create(
                model="llama3:8b", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
        assert ae.value.body["error"]["type"] == "budget_exceeded"  # type: ignore[index]
        with pytest.raises(ollama.ResponseError) as le:
            ollama.Client(host=gw.url, headers={"Authorization": f"Bearer {secret}"}).chat(
                model="llama3:8b", messages=[{"role": "user", "content": "hi"}]
            )
        assert le.value.status_code == 429
        assert _chat(other, gw).status_code == 200  # another key is not limited

        def drained() -> dict[str, Any]:
            answer = gw.admin.get(f"/admin/keys/{key_id}/usage")
            assert answer.status_code == 200, answer.text
            budget = answer.json()["budget"]
            return budget if budget["spent_usd"] >= spent - 1e-9 else {}

        budget = wait_for(drained, timeout=10, what="the spend drained")
        assert budget["left_usd"] == 0 and budget["resets_at"] == reset and budget["period"] == "day"
        assert budget["max_budget_usd"] == 0.1

        # A reload and a controller restart: the counters stay in shared memory.
        assert gw.admin.post("/admin/reload").status_code == 200
        assert _chat(secret, gw).status_code == 429
        gw.kill_controller()
        gw.start_controller()
        assert _chat(secret, gw).status_code == 429

        # nginx stopped and started again: its shared memory is new; the seed holds the spend.
        master = gw.nginx_master_pid()
        assert master is not None
        os.kill(master, signal.SIGQUIT)
        wait_for(lambda: gw.nginx_master_pid() is None, timeout=10, what="nginx stopped")
        assert gw.admin.post("/admin/reload").status_code == 200
        wait_for(lambda: gw.health().get("ok"), timeout=10, what="nginx started again")
        assert gw.nginx_master_pid() != master
        assert _chat(secret, gw).status_code == 429
        assert _chat(other, gw).status_code == 200

        # Raising the budget serves the key again, and the spend is counted once.
        raised = gw.admin.put(f"/admin/keys/{key_id}", json={"max_budget_usd": 1000})
        assert raised.status_code == 200, raised.text
        gw.wait_applied()
        assert _chat(secret, gw).status_code == 200


def test_a_key_over_its_tpm_limit_waits_for_the_window(stubs: dict[str, StubServer]) -> None:
    """tpm_limit 1,000 (~310 tokens a request): served until its tokens of the last minute reach 1,000,
    then 429 in each API style with a Retry-After, before anything reaches the instance; served again once
    the window frees (waited on, up to the Retry-After it was given)."""
    with Gateway(extra_env={**ENV, "ISHGW_PROBES_ENABLED": "false"}) as gw:  # no GETs counted by the stub
        _instance(gw, stubs, "plain")
        secret, _ = _key(gw, name="tpm", tpm_limit=1000)
        gw.wait_applied()
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0)
        spent, refused = 0, None
        for _ in range(10):  # bounded: at most two more than needed
            try:
                answer = client.chat.completions.create(model="llama3:8b", messages=LONG)
            except openai.RateLimitError as exc:
                refused = exc
                break
            assert answer.usage is not None
            spent += answer.usage.total_tokens
        assert refused is not None and spent >= 1000, spent
        assert refused.type == "rate_limit_error" and "1000 tokens per minute" in refused.message
        wait = int(refused.response.headers["Retry-After"])
        assert 1 <= wait <= 121
        before = _served(stubs["plain"])
        answers = _styles(gw, secret)
        for family, response in answers.items():
            assert response.status_code == 429, (family, response.text)
            assert int(response.headers["Retry-After"]) >= 1
        assert answers["anthropic"].json()["error"]["type"] == "rate_limit_error"
        assert "tokens per minute" in answers["ollama"].json()["error"]
        assert _served(stubs["plain"]) == before  # nothing reached the instance (probes are GETs)

        # Wait on the condition: an unknown model is refused by the limit (429) until the window frees,
        # then looked up (404), and nothing is spent meanwhile.
        refused_at = time.monotonic()

        def free() -> bool:
            return _chat(secret, gw, model="no-such-model").status_code == 404

        wait_for(free, timeout=wait + 3, interval=0.5, what="the tpm window freed")
        assert time.monotonic() - refused_at >= wait - 3  # not long before the Retry-After it was given
        assert _chat(secret, gw).status_code == 200


def _pool(gw: Gateway) -> dict[str, Any]:
    for pool in gw.status()["pools"]:
        if pool["model"] == "llama3:8b" and pool["family"] == "openai" and pool["kind"] == "chat":
            return pool  # type: ignore[no-any-return]
    raise AssertionError("no llama3:8b pool")


def test_an_instance_at_max_rpm_leaves_its_pool_and_comes_back(stubs: dict[str, StubServer]) -> None:
    """Two instances of a model, one with max_rpm 5: once the log stream shows 5 requests to it in the last
    60 s, the controller takes it out of the pool (reason rate_limit_budget) and the other serves; it is
    back once the window frees."""
    with Gateway(extra_env={**ENV, "ISHGW_PROBES_ENABLED": "false"}) as gw:
        _instance(gw, stubs, "capped", max_rpm=5)
        _instance(gw, stubs, "spare")
        secret, _ = _key(gw, name="k")
        gw.wait_applied()
        served: list[str] = []
        for _ in range(40):  # bounded: the first ~10 reach capped, in turn with spare
            answer = _chat(secret, gw)
            assert answer.status_code == 200, answer.text
            served.append(answer.headers["X-ISHGW-Instance"])
            if _pool(gw)["excluded"].get("capped") == "rate_limit_budget":
                break
        assert _pool(gw)["excluded"].get("capped") == "rate_limit_budget", served
        out_at = time.monotonic()
        assert served.count("capped") >= 5  # measured from the log stream: it reached its max_rpm
        state = gw.admin.get("/admin/instances/capped").json()["state"]
        assert state["rate_budget_until"] and state["current_rpm"] >= 5, state
        gw.wait_applied()
        assert {_chat(secret, gw).headers["X-ISHGW-Instance"] for _ in range(6)} == {"spare"}
        wait_for(lambda: "capped" in _pool(gw)["instances"], timeout=65, interval=0.5, what="capped back")
        assert time.monotonic() - out_at > 30  # not before its requests left the 60 s window
        gw.wait_applied()
        assert "capped" in {_chat(secret, gw).headers["X-ISHGW-Instance"] for _ in range(6)}
