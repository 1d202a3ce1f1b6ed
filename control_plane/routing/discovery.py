"""Which models an instance serves: its configured ones, plus what its probe found when it discovers. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from control_plane.registry import validators as v
from control_plane.registry.models import InstanceConfig, InstanceState

MAX_DISCOVERED = 512  # as many as supported_models may hold


class Source(StrEnum):
    CONFIGURED = "configured"
    DISCOVERED = "discovered"


def clean_discovered(names: Iterable[str]) -> tuple[str, ...]:
    """What a probe's model list may contribute: valid model names only (they reach nginx maps and Lua
    data like configured ones), sorted, at most MAX_DISCOVERED. (The request path reads "name" as
    "name:latest" and back, as Ollama does: render/lua_data.py.)"""
    found: set[str] = set()
    for name in names:
        try:
            v.check_model(name)
        except ValueError:
            continue
        found.add(name)
    return tuple(sorted(found)[:MAX_DISCOVERED])


def served_models(config: InstanceConfig, state: InstanceState) -> dict[str, Source]:
    """model -> where it comes from; configured models first (in their order), then discovered ones."""
    served = dict.fromkeys(config.models(), Source.CONFIGURED)
    if config.discovers():
        for model in clean_discovered(state.discovered_models):
            served.setdefault(model, Source.DISCOVERED)
    return served


def catalog(
    instances: Iterable[tuple[InstanceConfig, InstanceState]],
    available: frozenset[tuple[str, str]] = frozenset(),
) -> list[dict[str, object]]:
    """GET /admin/models: every model served, by which instances, from where; `available` holds the
    (model, instance) pairs in a pool of the desired spec now (the rest are excluded, or not yet applied)."""
    models: dict[str, list[dict[str, object]]] = {}
    for config, state in sorted(instances, key=lambda pair: pair[0].name):
        for model, source in served_models(config, state).items():
            models.setdefault(model, []).append(
                {"name": config.name, "source": str(source), "available": (model, config.name) in available}
            )
    return [{"model": model, "instances": models[model]} for model in sorted(models)]
