"""GET /admin/config/export?format=legacy: the legacy pair, which the legacy importer reads back."""

from __future__ import annotations

from typing import Any

from control_plane.registry import importers
from control_plane.registry.models import (
    HealthStatus,
    InstanceConfig,
    InstanceState,
    OperatorStatus,
    ProviderType,
)

SECRET = "sk-live-0123456789abcdef"


def pairs() -> list[tuple[InstanceConfig, InstanceState]]:
    return [
        (
            InstanceConfig(
                name="a",
                provider_type=ProviderType.OPENAI,
                api_key=SECRET,
                supported_models=["m"],
                weight=3,
                tags=["x"],
            ),
            InstanceState(status=OperatorStatus.MAINTENANCE, health_status=HealthStatus.HEALTHY),
        ),
        (
            InstanceConfig(name="b", provider_type=ProviderType.OLLAMA, api_key="env:OLLAMA_KEY"),
            InstanceState(),
        ),
    ]


def test_the_pair_is_keyed_by_name_and_masks_literal_keys() -> None:
    pair = importers.export_legacy(pairs())
    assert set(pair) == {"instance_configs", "instance_states"}
    assert sorted(pair["instance_configs"]) == ["a", "b"] == sorted(pair["instance_states"])
    assert pair["instance_configs"]["a"]["api_key"] == "****cdef"
    assert pair["instance_configs"]["b"]["api_key"] == "env:OLLAMA_KEY"
    assert SECRET not in importers.dump(pair, "json")
    assert pair["instance_states"]["a"]["status"] == "maintenance"


def test_round_trip_through_the_legacy_importer() -> None:
    original = pairs()
    existing = {config.name: config for config, _ in original}
    parsed = importers.parse_legacy(**_split(importers.export_legacy(original)), existing=existing)
    assert [config for config, _ in parsed] == [config for config, _ in original]  # the masked key kept
    assert [state.status if state else None for _, state in parsed] == [s.status for _, s in original]


def test_an_empty_registry_exports_an_empty_pair() -> None:
    assert importers.export_legacy([]) == {"instance_configs": {}, "instance_states": {}}


def _split(pair: dict[str, Any]) -> dict[str, Any]:
    return {"configs": pair["instance_configs"], "states": pair["instance_states"]}
