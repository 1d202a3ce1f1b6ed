"""Issue 13 against real nginx: model discovery (and, below, routing that learns)."""

from __future__ import annotations

from typing import Any

import httpx
import ollama

from tests.backends.stub_llm import StubServer
from tests.integration.conftest import start_stub
from tests.integration.gateway import Gateway, wait_for

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
    r = gateway.add_instance(
        name="o1", provider_type="ollama", api_base=stub.url, supported_models=["base"], health=QUICK_PROBES
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
