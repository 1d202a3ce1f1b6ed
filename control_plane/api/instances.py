"""Admin API for instances: /admin/instances (paged list, create), /admin/instances/{name} (read, delete),
its configuration (read, partial update), its state (read, set the operator status), its health, and a probe
now. Handlers validate everything before any write; every write is applied through ``apply``."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from control_plane import secret_refs
from control_plane.api import paging
from control_plane.api.app_keys import HEALTH, SETTINGS, STORE
from control_plane.api.apply import answer_applied, wants_wait
from control_plane.api.bodies import invalid, path_name, read_json, read_object, run, validate_strict
from control_plane.errors import InvalidInput
from control_plane.registry.models import (
    InstanceConfig,
    InstanceState,
    OperatorStatus,
    StateUpdate,
    is_masked,
    mask_secret,
)
from control_plane.registry.store import Store

CONFIG_FIELDS = frozenset(InstanceConfig.model_fields)
# "/admin/instances/migrate" is a route of its own, so no instance may be called "migrate".
RESERVED_NAMES = frozenset({"migrate"})
NAME_PARAM = "{name:(?!migrate$)[^{}/]+}"

Pair = tuple[InstanceConfig, InstanceState]


def check_unreserved(names: list[str], field: str = "name") -> None:
    errors = [{"field": field, "message": f"{n!r} is reserved"} for n in names if n in RESERVED_NAMES]
    if errors:
        raise InvalidInput(errors)


def check_secret_refs(request: web.Request, keys: list[tuple[str, str | None]]) -> None:
    """Each (field, api_key): a reference must point where provider secrets may live (secret_refs)."""
    policy = request.app[SETTINGS].secret_policy()
    errors = [
        {"field": field, "message": problem}
        for field, key in keys
        if (problem := secret_refs.check_reference(key, policy)) is not None
    ]
    if errors:
        raise InvalidInput(errors)


def config_json(config: InstanceConfig) -> dict[str, Any]:
    """A configuration as it may leave the controller: the api key masked."""
    data = config.model_dump(mode="json")
    data["api_key"] = mask_secret(config.api_key)
    return data


def _item(config: InstanceConfig, state: InstanceState) -> dict[str, Any]:
    return {"name": config.name, "config": config_json(config), "state": state.model_dump(mode="json")}


def _store(request: web.Request) -> Store:
    return request.app[STORE]


async def list_instances(request: web.Request) -> web.Response:
    """Sorted by name, paged (``limit``, ``cursor``; ``next_cursor`` in the answer), filtered by ``model``,
    ``provider``, ``status`` and ``tag``."""
    page = paging.page_of(request.query)
    wanted = paging.instance_filter(request.query)
    pairs = await run(_store(request).list_instances)
    chosen, cursor = paging.take([p for p in pairs if wanted.matches(*p)], lambda p: p[0].name, page)
    return web.json_response({"instances": [_item(c, s) for c, s in chosen], "next_cursor": cursor})


def _create(store: Store, config: InstanceConfig) -> Pair:
    store.create_instance(config)
    return store.get_instance(config.name)


async def create_instance(request: web.Request) -> web.Response:
    wait = wants_wait(request)
    data = await read_object(request)
    if is_masked(data.get("api_key")):
        raise invalid("api_key", "is a masked value; send the real key or a reference env:NAME / file:/path")
    config = validate_strict(InstanceConfig, data)
    check_unreserved([config.name])
    await asyncio.to_thread(check_secret_refs, request, [("api_key", config.api_key)])
    pair = await run(_create, _store(request), config)
    return await answer_applied(request, f"instance {config.name} created", wait, _item(*pair), 201)


async def get_instance(request: web.Request) -> web.Response:
    name = path_name(request)
    return web.json_response(_item(*await run(_store(request).get_instance, name)))


async def delete_instance(request: web.Request) -> web.Response:
    name = path_name(request)
    wait = wants_wait(request)
    await run(_store(request).delete_instance, name)
    return await answer_applied(request, f"instance {name} deleted", wait, None, 204)


async def get_config(request: web.Request) -> web.Response:
    name = path_name(request)
    config, _ = await run(_store(request).get_instance, name)
    return web.json_response(config_json(config))


def check_patch(name: str, patch: dict[str, Any]) -> dict[str, Any]:
    """The fields a partial update changes. The name cannot change; a masked api key keeps the current one."""
    errors = [{"field": str(key), "message": "unknown field"} for key in patch if key not in CONFIG_FIELDS]
    if "name" in patch and patch["name"] != name:
        errors.append({"field": "name", "message": "cannot be changed; create a new instance instead"})
    if errors:
        raise InvalidInput(errors)
    return {k: val for k, val in patch.items() if k != "name" and not (k == "api_key" and is_masked(val))}


def merge_config(current: InstanceConfig, changes: dict[str, Any]) -> InstanceConfig:
    """Apply a partial update and validate the merged whole. Nested settings objects (``health``) merge
    field by field too; every other value, maps and lists included, is replaced."""
    merged = current.model_dump(mode="json")
    for key, value in changes.items():
        nested = isinstance(getattr(current, key), BaseModel) and isinstance(value, dict)
        merged[key] = {**merged[key], **value} if nested else value
    return validate_strict(InstanceConfig, merged)


async def update_config(request: web.Request) -> web.Response:
    name = path_name(request)
    wait = wants_wait(request)
    changes = check_patch(name, await read_object(request))
    store = _store(request)
    current, _ = await run(store.get_instance, name)
    updated = merge_config(current, changes)
    if updated == current:
        return web.json_response(config_json(updated))
    if updated.api_key != current.api_key:
        await asyncio.to_thread(check_secret_refs, request, [("api_key", updated.api_key)])
    await run(store.replace_config, updated)
    return await answer_applied(
        request, f"instance {name} configuration updated", wait, config_json(updated), 200
    )


async def get_state(request: web.Request) -> web.Response:
    name = path_name(request)
    _, state = await run(_store(request).get_instance, name)
    return web.json_response(state.model_dump(mode="json"))


def _set_status(store: Store, name: str, update: StateUpdate) -> InstanceState:
    store.get_instance(name)  # NotFound first
    # Only the operator's field changes, under the store's write lock: health writes are never lost.
    store.patch_states({name: {"status": update.status}})
    return store.get_instance(name)[1]


async def put_state(request: web.Request) -> web.Response:
    name = path_name(request)
    wait = wants_wait(request)
    update = validate_strict(StateUpdate, await read_json(request))
    health = request.app.get(HEALTH)
    if update.status is OperatorStatus.ACTIVE and health is not None:
        # The operator's word lifts a rate limit or an open breaker (and the log says so).
        await run(_store(request).get_instance, name)  # NotFound first
        health.clear(name, "state set to active")
        await health.flush()
    state = await run(_set_status, _store(request), name, update)
    return await answer_applied(
        request, f"instance {name} status {update.status.value}", wait, state.model_dump(mode="json"), 200
    )


async def check_instance(request: web.Request) -> web.Response:
    """Probe the instance now; the verdict counts like any scheduled probe and, with ``wait`` (the default),
    the answer comes once nginx serves what it changed (an instance taken out or put back)."""
    name = path_name(request)
    wait = wants_wait(request)
    health = request.app[HEALTH]
    result = await health.probe_now(name)
    await health.flush()
    body = {
        "name": name,
        "outcome": str(result.outcome),
        "detail": result.detail,
        "latency_ms": round(result.latency_ms, 2),
        "models": list(result.models),
    }
    return await answer_applied(request, f"instance {name} checked", wait, body, 200)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


async def instance_health(request: web.Request) -> web.Response:
    name = path_name(request)
    _, state = await run(_store(request).get_instance, name)
    health = request.app[HEALTH]
    return web.json_response(
        {
            "name": name,
            "health_status": str(state.health_status),
            "breaker_state": str(state.breaker_state),
            "breaker_reason": health.tracker.breaker_reason(name),
            "breaker_open_until": _iso(state.breaker_open_until),
            "rate_limited_until": _iso(state.rate_limited_until),
            "rate_budget_until": _iso(state.rate_budget_until),
            "quarantined_reason": state.quarantined_reason,
            "unhealthy_since": _iso(state.unhealthy_since),
            "probes": health.tracker.history(name),
        }
    )
