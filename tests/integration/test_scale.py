"""The control plane with 10,000 instances: one import call, one transaction, one reload; paged listings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.gateway import Gateway

COUNT, MODELS = 10_000, 1_000
LIMIT_MB = 2  # ISHGW_ADMIN_MAX_BODY_MB here: the 10,000-instance document (about 1.5 MB) fits, 3 MB not


def fleet(count: int, models: int, port: int) -> list[dict[str, Any]]:
    return [
        {
            "name": f"gpu-{i:05d}",
            "provider_type": "openai_compatible",
            "api_base": f"http://127.0.0.1:{port}/v1",
            "supported_models": [f"model-{i % models:04d}"],
            "tags": [f"rack-{i % 7}"],
        }
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def big() -> Iterator[Gateway]:
    env = {"ISHGW_PROBES_ENABLED": "false", "ISHGW_ADMIN_MAX_BODY_MB": str(LIMIT_MB)}
    with Gateway(extra_env=env) as gw:
        yield gw


@pytest.fixture(scope="module")
def imported(big: Gateway) -> dict[str, Any]:
    """The whole fleet in one call; what the registry and nginx looked like before it."""
    before = big.status()
    body = json.dumps({"version": 1, "instances": fleet(COUNT, MODELS, big.http_port)}).encode()
    assert 2**20 < len(body) < LIMIT_MB * 2**20, len(body)
    r = big.admin.post(
        "/admin/config/import?wait=false",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=120,
    )
    assert r.status_code == 202, r.text[:300]
    big.wait_applied(timeout=120)
    return {"before": before, "answer": r.json(), "after": big.status()}


def test_ten_thousand_instances_import_in_one_call_and_one_reload(
    big: Gateway, imported: dict[str, Any]
) -> None:
    before, after = imported["before"], imported["after"]
    assert imported["answer"]["imported"] == COUNT
    assert after["generation"] == before["generation"] + 1  # one transaction
    assert after["reloads"] == before["reloads"] + 1  # one reload
    assert after["instances"]["total"] == COUNT
    assert len(after["pools"]) == MODELS  # one chat pool per model


def test_bodies_over_the_bulk_limit_are_413_and_other_routes_keep_1_mib(big: Gateway, imported: Any) -> None:
    generation = big.status()["generation"]
    r = big.admin.post(
        "/admin/config/import",
        content=b"x" * ((LIMIT_MB + 1) * 2**20),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and r.json()["error"] == "request_entity_too_large", r.text[:200]
    r = big.admin.post(
        "/admin/instances",
        content=b"x" * (LIMIT_MB * 2**20 - 1),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413, r.text[:200]
    assert big.status()["generation"] == generation


def test_listing_pages_through_ten_thousand_instances(big: Gateway, imported: Any) -> None:
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while pages < 20:  # bounded: 10,000 / 1,000 = 10 pages
        params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
        body = big.admin.get("/admin/instances", params=params, timeout=60).json()
        pages += 1
        assert len(body["instances"]) <= 1000
        seen += [item["name"] for item in body["instances"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 10 and seen == sorted(seen) and len(set(seen)) == COUNT
    # The default answer is one bounded page too: the first 1,000 names and a cursor.
    first = big.admin.get("/admin/instances", timeout=60).json()
    assert [i["name"] for i in first["instances"]] == seen[:1000] and first["next_cursor"]


def test_listing_filters(big: Gateway, imported: Any) -> None:
    def names(**params: str) -> list[str]:
        body = big.admin.get("/admin/instances", params=params, timeout=60).json()
        assert body["next_cursor"] is None, params
        return [item["name"] for item in body["instances"]]

    assert names(model="model-0007") == [f"gpu-{i:05d}" for i in range(7, COUNT, MODELS)]
    assert len(names(model="model-0007", tag="rack-0")) == len(
        [i for i in range(7, COUNT, MODELS) if i % 7 == 0]
    )
    assert names(provider="ollama") == []
    assert names(status="draining") == []
    assert (
        len(big.admin.get("/admin/instances", params={"status": "active", "limit": "10"}).json()["instances"])
        == 10
    )
    for params, field in (
        ({"limit": "0"}, "limit"),
        ({"provider": "nope"}, "provider"),
        ({"cursor": "x" * 401}, "cursor"),
    ):
        r = big.admin.get("/admin/instances", params=params)
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == field, r.text[:200]
    status = big.admin.get("/admin/status", params={"model": "model-0007"}).json()
    assert [p["model"] for p in status["pools"]] == ["model-0007"] and status["next_cursor"] is None
    paged = big.admin.get("/admin/status", params={"limit": "600"}).json()
    assert len(paged["pools"]) == 600 and paged["next_cursor"]
    rest = big.admin.get("/admin/status", params={"limit": "600", "cursor": paged["next_cursor"]}).json()
    pool_names = [p["name"] for p in paged["pools"] + rest["pools"]]
    assert rest["next_cursor"] is None and len(set(pool_names)) == MODELS and pool_names == sorted(pool_names)
