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
