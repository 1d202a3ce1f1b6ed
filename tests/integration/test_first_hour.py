"""What a new user meets in the first hour, against a real gateway: a change made through the admin API is
live when the call returns, keys have no surprise limit, probes ask the path traffic uses, and every 429
the gateway makes names the limit."""

from __future__ import annotations

import httpx

from tests.backends.stub_llm import StubServer
from tests.integration.conftest import start_stub
from tests.integration.gateway import Gateway, wait_for

CHAT = "/v1/chat/completions"


def chat(gw: Gateway, model: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return gw.client.post(CHAT, json=body, headers=headers)


def test_admin_changes_are_served_when_the_call_returns(stubs: dict[str, StubServer]) -> None:
    """50 creations, each used on the very next request: keys, instances, state, routing, deletions."""
    stub = start_stub(stubs, "ryw")
    with Gateway(extra_env={"ISHGW_AUTH_REQUIRED": "true"}) as gw:
        for i in range(50):
            key = gw.admin.post("/admin/keys", json={"name": f"k{i}"})
            assert key.status_code == 201 and key.headers["X-ISHGW-Applied"] == "true", key.text
            created = gw.add_instance(
                name=f"i{i}", provider_type="ollama", api_base=stub.url, supported_models=[f"m{i}"]
            )
            assert created.status_code == 201 and created.headers["X-ISHGW-Applied"] == "true"
            answer = chat(gw, f"m{i}", key.json()["key"])
            assert answer.status_code == 200, (i, answer.text)
            assert answer.json()["model"] == f"m{i}"  # (one stand-in serves all: the header names i0)
        secret = key.json()["key"]

        state = gw.admin.put("/admin/instances/i49/state", json={"status": "maintenance"})
        assert state.status_code == 200 and state.headers["X-ISHGW-Applied"] == "true"
        assert chat(gw, "m49", secret).status_code == 503
        routing = gw.admin.put("/admin/routing", json={"model_aliases": {"fast": "m48"}})
        assert routing.status_code == 200
        assert chat(gw, "fast", secret).json()["model"] == "m48"
        assert gw.admin.delete("/admin/instances/i48").status_code == 204
        assert chat(gw, "m48", secret).status_code == 404
        assert gw.admin.delete(f"/admin/keys/{key.json()['id']}").status_code == 204
        assert chat(gw, "m47", secret).status_code == 401

        # ?wait=false answers at once with 202; a bad value is refused before anything is written.
        early = gw.admin.post("/admin/keys?wait=false", json={"name": "later"})
        assert early.status_code == 202 and early.headers["X-ISHGW-Applied"] == "pending"
        assert early.json()["key"].startswith("ishgw-") and early.json()["applied"] is False
        bad = gw.admin.post("/admin/keys?wait=maybe", json={"name": "never"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "wait"
        assert "never" not in {k["name"] for k in gw.admin.get("/admin/keys").json()["keys"]}


def test_a_key_without_rpm_limit_has_no_limit_and_limits_name_themselves(
    stubs: dict[str, StubServer],
) -> None:
    """A key is the unit of quota: the per-address default binds requests without a valid key only, and
    every 429 the gateway makes names the limit that bound and the setting that raises it."""
    stub = start_stub(stubs, "quota")
    env = {"ISHGW_AUTH_REQUIRED": "false", "ISHGW_LIMIT_IP_RPM": "60", "ISHGW_LIMIT_IP_BURST": "0"}
    gateway = Gateway(extra_env=env)
    for name in ("ISHGW_LIMIT_CHAT_RPM", "ISHGW_LIMIT_EMBEDDINGS_RPM"):
        del gateway.env[name]  # unset, as on a default deploy: the class defaults bind anonymous traffic
    with gateway as gw:
        assert (
            gw.add_instance(
                name="q", provider_type="ollama", api_base=stub.url, supported_models=["m"]
            ).status_code
            == 201
        )
        created = gw.admin.post("/admin/keys", json={"name": "app"}).json()
        assert created["rpm_limit"] is None
        codes = [chat(gw, "m", created["key"]).status_code for _ in range(30)]
        assert codes == [200] * 30  # 30 in a second: far over 60/min per address, none refused

        anonymous = [chat(gw, "m") for _ in range(3)]
        limited = [r for r in anonymous if r.status_code == 429]
        assert limited, [r.status_code for r in anonymous]
        message = limited[0].json()["error"]["message"]
        assert "ISHGW_LIMIT_IP_RPM" in message and "without a valid key" in message
        assert limited[0].headers["Retry-After"] == "1"

        tight = gw.admin.post("/admin/keys", json={"name": "tight", "rpm_limit": 1}).json()
        gw.admin.put(f"/admin/keys/{tight['id']}", json={"rpm_limit": 1})
        answers = [chat(gw, "m", tight["key"]) for _ in range(15)]
        refused = [r for r in answers if r.status_code == 429]
        assert refused, [r.status_code for r in answers]
        assert "rpm_limit" in refused[0].json()["error"]["message"]

        limits = gw.status()["limits"]
        assert limits["without_valid_key"]["per_address_rpm"] == 60
        assert limits["without_valid_key"]["chat_rpm"] == 3000
        assert "chat_rpm" not in limits["with_valid_key"]


def test_gateway_wide_default_rpm_for_keys(stubs: dict[str, StubServer]) -> None:
    stub = start_stub(stubs, "default-rpm")
    with Gateway(extra_env={"ISHGW_AUTH_REQUIRED": "true", "ISHGW_KEY_DEFAULT_RPM": "1"}) as gw:
        gw.add_instance(name="d", provider_type="ollama", api_base=stub.url, supported_models=["m"])
        key = gw.admin.post("/admin/keys", json={"name": "defaulted"}).json()
        codes = [chat(gw, "m", key["key"]).status_code for _ in range(15)]
        assert 429 in codes and codes[0] == 200


def test_openai_compatible_server_without_a_path_is_probed_where_traffic_goes(
    stubs: dict[str, StubServer],
) -> None:
    """llama.cpp-style server (API only under /v1) registered with a bare api_base: the probe asks
    /v1/models like traffic asks /v1/chat/completions, so the instance stays in; and a server that has no
    model list at all is never taken out by 404 probes while its traffic succeeds."""
    v1_only = start_stub(stubs, "v1-only", extra_args=["--api-prefix", "/v1"])
    no_list = start_stub(stubs, "no-list", extra_args=["--no-model-list"])
    fast = {"probe_interval_s": 0.5, "fall": 2}
    with Gateway(extra_env={"ISHGW_PROBES_ENABLED": "true"}) as gw:
        for name, stub in (("llama-cpp", v1_only), ("odd", no_list)):
            created = gw.add_instance(
                name=name,
                provider_type="openai_compatible",
                api_base=f"http://127.0.0.1:{stub.port}",
                supported_models=[name],
                health=fast,
            )
            assert created.status_code == 201, created.text

        def probed(name: str, outcome: str) -> bool:
            history = gw.admin.get(f"/admin/instances/{name}/health").json()["probes"]
            return sum(1 for p in history if p["outcome"] == outcome) >= 3

        wait_for(lambda: probed("llama-cpp", "ok"), timeout=10, what="three ok probes of llama-cpp")
        unsupported = "probe_path_unsupported"
        wait_for(lambda: probed("odd", unsupported), timeout=10, what="three unsupported probes of odd")
        health = gw.admin.get("/admin/instances/llama-cpp/health").json()
        assert health["health_status"] == "healthy"
        assert health["probes"][-1]["detail"] == "HTTP 200"
        odd = gw.admin.get("/admin/instances/odd/health").json()
        assert odd["health_status"] == "unknown" and "probe_path" in odd["probes"][-1]["detail"]
        assert gw.status()["excluded"] == {}
        assert chat(gw, "llama-cpp").status_code == 200
        assert chat(gw, "odd").status_code == 200


def test_a_check_answers_once_nginx_serves_its_verdict(stubs: dict[str, StubServer]) -> None:
    """POST .../check changes what nginx serves like any other call: the instance it finds down is out of
    its pool when the call returns, and back in when a later check finds it up."""
    health = {"probe_interval_s": 3600, "fall": 1, "rise": 1}
    with Gateway() as gw:
        for name in ("up", "flaky"):
            stub = start_stub(stubs, name)
            r = gw.add_instance(
                name=name, provider_type="ollama", api_base=stub.url, supported_models=["m"], health=health
            )
            assert r.status_code == 201, r.text
        stubs["flaky"].kill()
        down = gw.admin.post("/admin/instances/flaky/check")
        assert down.status_code == 200 and down.headers["X-ISHGW-Applied"] == "true", down.text
        assert down.json()["outcome"] != "ok"
        assert {chat(gw, "m").headers["X-ISHGW-Instance"] for _ in range(10)} == {"up"}

        stubs["flaky"].start()
        back = gw.admin.post("/admin/instances/flaky/check")
        assert back.status_code == 200 and back.headers["X-ISHGW-Applied"] == "true", back.text
        assert back.json()["outcome"] == "ok"
        assert "flaky" in {chat(gw, "m").headers["X-ISHGW-Instance"] for _ in range(10)}
