"""The admin HTTP API. Every route is registered in ``ROUTES``; handlers validate everything before any write.

Store calls are synchronous (SQLAlchemy) and run in a worker thread; every configuration or state write is
followed by ``reconciler.request(reason)``.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from control_plane import secret_refs
from control_plane.api import alerts as alerts_api
from control_plane.api import audit as audit_api
from control_plane.api import client_keys as keys_api
from control_plane.api import paging, routing_api, status_page
from control_plane.api import scaling as scaling_api
from control_plane.api import usage as usage_api
from control_plane.api.apply import answer_applied, wants_wait
from control_plane.api.bodies import JSON_TYPES, read_json, read_object, validate_strict
from control_plane.api.keys import HEALTH, RECONCILER, SETTINGS, STORE, WEIGHTS
from control_plane.api.middleware import ApiError, install_auth_state, validation_details
from control_plane.api.openapi import build_openapi
from control_plane.errors import InvalidInput, ReloadFailed
from control_plane.registry import importers
from control_plane.registry import validators as v
from control_plane.registry.models import (
    InstanceConfig,
    InstanceState,
    OperatorStatus,
    RoutingConfig,
    StateUpdate,
    is_masked,
    mask_secret,
)
from control_plane.registry.scaling import ScalingStore
from control_plane.registry.store import Store

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml"})
EXPORT_TYPES = {"json": "application/json", "yaml": "application/yaml"}
LEGACY_EXPORT = "legacy"
MODES = ("merge", "replace")
CONFIG_FIELDS = frozenset(InstanceConfig.model_fields)

Pair = tuple[InstanceConfig, InstanceState]


# -- plumbing --------------------------------------------------------------------------------------------


async def _run(fn: Callable[..., T], *args: Any) -> T:
    """Run a synchronous store call off the event loop."""
    return await asyncio.to_thread(fn, *args)


def _store(request: web.Request) -> Store:
    return request.app[STORE]


def _invalid(field: str, message: str) -> InvalidInput:
    return InvalidInput([{"field": field, "message": message}])


# "/admin/instances/migrate" is a route of its own, so no instance may be called "migrate".
RESERVED_NAMES = frozenset({"migrate"})
NAME_PARAM = "{name:(?!migrate$)[^{}/]+}"


def check_unreserved(names: list[str], field: str = "name") -> None:
    errors = [{"field": field, "message": f"{n!r} is reserved"} for n in names if n in RESERVED_NAMES]
    if errors:
        raise InvalidInput(errors)


def _path_name(request: web.Request) -> str:
    name = request.match_info["name"]
    try:
        return v.check_name(name)
    except ValueError as exc:
        raise _invalid("name", str(exc)) from None


def _choice(request: web.Request, param: str, choices: tuple[str, ...]) -> str:
    value = request.query.get(param, choices[0])
    if value not in choices:
        raise _invalid(param, f"must be one of {', '.join(choices)}")
    return value


def _strict_errors(prefix: str, model: type[BaseModel], data: Any) -> list[dict[str, str]]:
    try:
        validate_strict(model, data)
    except ValidationError as exc:
        return [
            {**e, "field": f"{prefix}.{e['field']}" if e["field"] != "body" else prefix}
            for e in validation_details(exc)
        ]
    return []


def check_document_types(doc: dict[str, Any]) -> None:
    """Imported documents get the same strict typing as the rest of the API (the importer coerces)."""
    errors: list[dict[str, str]] = []
    instances = doc.get("instances")
    if isinstance(instances, list):
        for index, item in enumerate(instances):
            if isinstance(item, dict):
                errors += _strict_errors(f"instances[{index}]", InstanceConfig, item)
    if isinstance(doc.get("routing"), dict):
        errors += _strict_errors("routing", RoutingConfig, doc["routing"])
    if errors:
        raise InvalidInput(errors)


def config_json(config: InstanceConfig) -> dict[str, Any]:
    """A configuration as it may leave the controller: the api key masked."""
    data = config.model_dump(mode="json")
    data["api_key"] = mask_secret(config.api_key)
    return data


def _item(config: InstanceConfig, state: InstanceState) -> dict[str, Any]:
    return {"name": config.name, "config": config_json(config), "state": state.model_dump(mode="json")}


def _jsonable(obj: object) -> dict[str, Any]:
    """A dataclass, pydantic model or mapping as a JSON object."""
    to_dict = getattr(obj, "to_dict", None)
    plain = to_jsonable_python(to_dict() if callable(to_dict) else obj, fallback=str)
    return plain if isinstance(plain, dict) else {"result": plain}


def _existing(store: Store) -> dict[str, InstanceConfig]:
    return {config.name: config for config, _ in store.list_instances()}


# -- instances -------------------------------------------------------------------------------------------


async def list_instances(request: web.Request) -> web.Response:
    """Sorted by name, paged (``limit``, ``cursor``; ``next_cursor`` in the answer), filtered by ``model``,
    ``provider``, ``status`` and ``tag``."""
    page = paging.page_of(request.query)
    wanted = paging.instance_filter(request.query)
    pairs = await _run(_store(request).list_instances)
    chosen, cursor = paging.take([p for p in pairs if wanted.matches(*p)], lambda p: p[0].name, page)
    return web.json_response({"instances": [_item(c, s) for c, s in chosen], "next_cursor": cursor})


def _create(store: Store, config: InstanceConfig) -> Pair:
    store.create_instance(config)
    return store.get_instance(config.name)


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


async def create_instance(request: web.Request) -> web.Response:
    wait = wants_wait(request)
    data = await read_object(request)
    if is_masked(data.get("api_key")):
        raise _invalid("api_key", "is a masked value; send the real key or a reference env:NAME / file:/path")
    config = validate_strict(InstanceConfig, data)
    check_unreserved([config.name])
    await asyncio.to_thread(check_secret_refs, request, [("api_key", config.api_key)])
    pair = await _run(_create, _store(request), config)
    return await answer_applied(request, f"instance {config.name} created", wait, _item(*pair), 201)


async def get_instance(request: web.Request) -> web.Response:
    name = _path_name(request)
    return web.json_response(_item(*await _run(_store(request).get_instance, name)))


async def delete_instance(request: web.Request) -> web.Response:
    name = _path_name(request)
    wait = wants_wait(request)
    await _run(_store(request).delete_instance, name)
    return await answer_applied(request, f"instance {name} deleted", wait, None, 204)


async def get_config(request: web.Request) -> web.Response:
    name = _path_name(request)
    config, _ = await _run(_store(request).get_instance, name)
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
    name = _path_name(request)
    wait = wants_wait(request)
    changes = check_patch(name, await read_object(request))
    store = _store(request)
    current, _ = await _run(store.get_instance, name)
    updated = merge_config(current, changes)
    if updated == current:
        return web.json_response(config_json(updated))
    if updated.api_key != current.api_key:
        await asyncio.to_thread(check_secret_refs, request, [("api_key", updated.api_key)])
    await _run(store.replace_config, updated)
    return await answer_applied(
        request, f"instance {name} configuration updated", wait, config_json(updated), 200
    )


async def get_state(request: web.Request) -> web.Response:
    name = _path_name(request)
    _, state = await _run(_store(request).get_instance, name)
    return web.json_response(state.model_dump(mode="json"))


def _set_status(store: Store, name: str, update: StateUpdate) -> InstanceState:
    store.get_instance(name)  # NotFound first
    # Only the operator's field changes, under the store's write lock: health writes are never lost.
    store.patch_states({name: {"status": update.status}})
    return store.get_instance(name)[1]


async def put_state(request: web.Request) -> web.Response:
    name = _path_name(request)
    wait = wants_wait(request)
    update = validate_strict(StateUpdate, await read_json(request))
    health = request.app.get(HEALTH)
    if update.status is OperatorStatus.ACTIVE and health is not None:
        # The operator's word lifts a rate limit or an open breaker (and the log says so).
        await _run(_store(request).get_instance, name)  # NotFound first
        health.clear(name, "state set to active")
        await health.flush()
    state = await _run(_set_status, _store(request), name, update)
    return await answer_applied(
        request, f"instance {name} status {update.status.value}", wait, state.model_dump(mode="json"), 200
    )


async def check_instance(request: web.Request) -> web.Response:
    """Probe the instance now; the verdict counts like any scheduled probe."""
    name = _path_name(request)
    health = request.app[HEALTH]
    result = await health.probe_now(name)
    await health.flush()
    return web.json_response(
        {
            "name": name,
            "outcome": str(result.outcome),
            "detail": result.detail,
            "latency_ms": round(result.latency_ms, 2),
            "models": list(result.models),
        }
    )


async def instance_health(request: web.Request) -> web.Response:
    name = _path_name(request)
    _, state = await _run(_store(request).get_instance, name)
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


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# -- migration, import and export ------------------------------------------------------------------------

LEGACY_KEYS = frozenset({"instance_configs", "instance_states"})
Migration = list[tuple[InstanceConfig, InstanceState | None]]


def _renamed(exc: InvalidInput, old: str, new: str) -> InvalidInput:
    """Error paths from the importers (``configs.x``) in the request body's terms (``instance_configs.x``)."""
    errors = []
    for error in exc.errors:
        field = error["field"]
        if field == old or field.startswith((f"{old}.", f"{old}[")):
            field = new + field[len(old) :]
        errors.append({**error, "field": field or "body"})
    return InvalidInput(errors)


def _parse_ollama(items: Any, body_key: str) -> Migration:
    try:
        return [(config, None) for config in importers.parse_ollama_list(items)]
    except InvalidInput as exc:
        raise _renamed(exc, "items", body_key) from None


def _parse_legacy(body: dict[str, Any], existing: dict[str, InstanceConfig]) -> Migration:
    unknown = [{"field": str(k), "message": "unknown field"} for k in body if k not in LEGACY_KEYS]
    if unknown:
        raise InvalidInput(unknown)
    try:
        return importers.parse_legacy(body["instance_configs"], body.get("instance_states"), existing)
    except InvalidInput as exc:
        raise _renamed(_renamed(exc, "configs", "instance_configs"), "states", "instance_states") from None


def parse_migration(body: Any, existing: dict[str, InstanceConfig]) -> Migration:
    """Legacy two-file document, ``{"ollama_instances": [...]}`` or a bare Ollama list."""
    if isinstance(body, list):
        parsed = _parse_ollama(body, "")
    elif isinstance(body, dict) and "instance_configs" in body:
        parsed = _parse_legacy(body, existing)
    elif isinstance(body, dict) and set(body) == {"ollama_instances"}:
        parsed = _parse_ollama(body["ollama_instances"], "ollama_instances")
    else:
        raise _invalid("body", "expected {instance_configs, instance_states}, {ollama_instances} or a list")
    if not parsed:
        raise _invalid("body", "nothing to import")
    check_unreserved([config.name for config, _ in parsed], "body")
    return parsed


def migration_keys(body: Any, parsed: Migration) -> list[tuple[str, str | None]]:
    """(field, api_key) per parsed instance, in the request body's terms (parsed keeps the body's order)."""
    if isinstance(body, dict) and "instance_configs" in body:
        fields = [f"instance_configs.{key}.api_key" for key in body["instance_configs"]]
    else:
        prefix = "ollama_instances" if isinstance(body, dict) else ""
        fields = [f"{prefix}[{index}].api_key" for index in range(len(parsed))]
    return [(field, config.api_key) for field, (config, _) in zip(fields, parsed, strict=False)]


def _apply_migration(store: Store, parsed: Migration, merge: bool) -> None:
    store.replace_all([config for config, _ in parsed], None, merge=merge)
    for config, state in parsed:
        if state is not None:
            store.put_state(config.name, state)


async def migrate(request: web.Request) -> web.Response:
    merge = _choice(request, "mode", MODES) == "merge"
    wait = wants_wait(request)
    body = await read_json(request)
    store = _store(request)
    parsed = parse_migration(body, await _run(_existing, store))
    await asyncio.to_thread(check_secret_refs, request, migration_keys(body, parsed))
    await _run(_apply_migration, store, parsed, merge)
    names = [config.name for config, _ in parsed]
    return await answer_applied(
        request, "migration imported", wait, {"imported": names, "count": len(names)}, 200
    )


def _export(store: Store, fmt: str, scaling: ScalingStore | None = None) -> str:
    configs = [config for config, _ in store.list_instances()]
    document = scaling_api.with_groups(scaling, importers.export_document(configs, store.get_routing()))
    return importers.dump(document, fmt)


def _export_legacy(store: Store) -> str:
    return importers.dump(importers.export_legacy(store.list_instances()), "json")


async def export_config(request: web.Request) -> web.Response:
    fmt = _choice(request, "format", (*EXPORT_TYPES, LEGACY_EXPORT))
    if fmt == LEGACY_EXPORT:  # the legacy instance_configs.json + instance_states.json pair, one object
        text = await _run(_export_legacy, _store(request))
        return web.Response(text=text, content_type="application/json", charset="utf-8")
    text = await _run(_export, _store(request), fmt, scaling_api.groups_store(request.app))
    return web.Response(text=text, content_type=EXPORT_TYPES[fmt], charset="utf-8")


async def _read_document(request: web.Request) -> dict[str, Any]:
    if request.content_type in YAML_TYPES:
        raw = await request.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid("body", "must be UTF-8 text") from None
        return importers.load(text, "yaml")
    data = await read_json(request)
    if not isinstance(data, dict):
        raise _invalid("body", "document must be a JSON object")
    importers.check_depth(data)
    return data


def _import(request: web.Request, doc: dict[str, Any], merge: bool) -> tuple[int, int]:
    store = _store(request)
    configs, routing = importers.parse_document(doc, _existing(store))
    check_document_types(doc)
    groups = scaling_api.imported_groups(request, doc)
    check_unreserved([config.name for config in configs], "instances")
    check_secret_refs(request, [(f"instances[{i}].api_key", c.api_key) for i, c in enumerate(configs)])
    store.replace_all(configs, routing, merge=merge, also=scaling_api.import_writer(request, groups, merge))
    return len(configs), store.generation()


async def import_config(request: web.Request) -> web.Response:
    merge = _choice(request, "mode", MODES) == "merge"
    wait = wants_wait(request)
    if request.content_type not in JSON_TYPES | YAML_TYPES:
        raise ApiError(415, "unsupported_media_type", "expected application/json or application/yaml")
    doc = await _read_document(request)
    count, generation = await _run(_import, request, doc, merge)
    return await answer_applied(
        request, "configuration imported", wait, {"imported": count, "generation": generation}, 200
    )


# -- routing, status, reload, health, openapi ------------------------------------------------------------


async def get_routing(request: web.Request) -> web.Response:
    routing = await _run(_store(request).get_routing)
    return web.json_response(routing.model_dump(mode="json"))


async def put_routing(request: web.Request) -> web.Response:
    wait = wants_wait(request)
    routing = validate_strict(RoutingConfig, await read_json(request))
    await _run(_store(request).set_routing, routing)
    return await answer_applied(request, "routing updated", wait, routing.model_dump(mode="json"), 200)


def _counts(store: Store) -> tuple[int, int, int]:
    configs = [config for config, _ in store.list_instances()]
    return store.generation(), len(configs), sum(1 for c in configs if c.enabled)


async def status(request: web.Request) -> web.Response:
    """``pools`` are paged by name (``limit``, ``cursor``, ``next_cursor``) and filtered by ``model``."""
    page = paging.page_of(request.query)
    model = paging.instance_filter(request.query).model
    generation, total, enabled = await _run(_counts, _store(request))
    body: dict[str, Any] = {**request.app[RECONCILER].status()}
    pools = [p for p in body["pools"] if model is None or p["model"] == model]
    body["pools"], body["next_cursor"] = paging.take(pools, lambda p: str(p["name"]), page)
    body["generation"] = generation  # the configuration generation in the store; applied: body["applied"]
    body["instances"] = {"total": total, "enabled": enabled}
    weights = request.app.get(WEIGHTS)
    if weights is not None:
        body["weights"] = weights.status()  # learned strategies: recomputations, weight sets applied
    return web.json_response(body)


def _literal_keys(store: Store) -> list[str]:
    keys = (config.api_key for config, _ in store.list_instances())
    return [key for key in keys if key and mask_secret(key) != key]


def redact(text: str, secrets: list[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "****")
    return text


async def _reload_failed(request: web.Request, body: dict[str, Any], error: str) -> web.Response:
    secrets = await _run(_literal_keys, _store(request))
    return web.json_response({**body, "ok": False, "error": redact(error, secrets)}, status=409)


async def reload(request: web.Request) -> web.Response:
    try:
        result = await request.app[RECONCILER].reconcile_now(force=True)
    except ReloadFailed as exc:
        return await _reload_failed(request, {}, str(exc) or "reload failed")
    body = _jsonable(result)
    if body.get("ok", True) is False:
        return await _reload_failed(request, body, str(body.get("error") or "reload failed"))
    return web.json_response({**body, "ok": True})


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@functools.cache
def _openapi_text() -> str:
    return json.dumps(build_openapi())


async def openapi(_request: web.Request) -> web.Response:
    return web.Response(text=_openapi_text(), content_type="application/json")


class Route(NamedTuple):
    method: str
    path: str
    handler: Handler
    name: str


ROUTES: tuple[Route, ...] = (
    Route("GET", "/admin/health", health, "health"),
    Route("GET", "/admin/openapi.json", openapi, "openapi"),
    Route("GET", "/admin/instances", list_instances, "list_instances"),
    Route("POST", "/admin/instances", create_instance, "create_instance"),
    Route("POST", "/admin/instances/migrate", migrate, "migrate_instances"),
    Route("GET", f"/admin/instances/{NAME_PARAM}", get_instance, "get_instance"),
    Route("DELETE", f"/admin/instances/{NAME_PARAM}", delete_instance, "delete_instance"),
    Route("GET", f"/admin/instances/{NAME_PARAM}/config", get_config, "get_instance_config"),
    Route("PUT", f"/admin/instances/{NAME_PARAM}/config", update_config, "update_instance_config"),
    Route("GET", f"/admin/instances/{NAME_PARAM}/state", get_state, "get_instance_state"),
    Route("POST", f"/admin/instances/{NAME_PARAM}/check", check_instance, "check_instance"),
    Route("GET", f"/admin/instances/{NAME_PARAM}/health", instance_health, "get_instance_health"),
    Route("PUT", f"/admin/instances/{NAME_PARAM}/state", put_state, "put_instance_state"),
    Route("GET", "/admin/config/export", export_config, "export_config"),
    Route("POST", "/admin/config/import", import_config, "import_config"),
    Route("GET", "/admin/routing", get_routing, "get_routing"),
    Route("PUT", "/admin/routing", put_routing, "put_routing"),
    Route("GET", "/admin/status", status, "status"),
    Route("POST", "/admin/reload", reload, "reload"),
    Route("GET", "/admin/keys", keys_api.list_keys, "list_keys"),
    Route("POST", "/admin/keys", keys_api.create_key, "create_key"),
    Route("GET", f"/admin/keys/{keys_api.KEY_ID_PARAM}", keys_api.get_key, "get_key"),
    Route("PUT", f"/admin/keys/{keys_api.KEY_ID_PARAM}", keys_api.update_key, "update_key"),
    Route("DELETE", f"/admin/keys/{keys_api.KEY_ID_PARAM}", keys_api.delete_key, "delete_key"),
    Route("GET", f"/admin/keys/{keys_api.KEY_ID_PARAM}/usage", usage_api.get_key_usage, "get_key_usage"),
    Route("GET", "/admin/usage", usage_api.get_usage, "get_usage"),
    Route("GET", "/admin/audit", audit_api.list_audit, "list_audit"),
    Route("GET", "/admin/scaling/groups", scaling_api.list_groups, "list_scaling_groups"),
    Route("POST", "/admin/scaling/groups", scaling_api.create_group, "create_scaling_group"),
    Route("GET", f"/admin/scaling/groups/{NAME_PARAM}", scaling_api.get_group, "get_scaling_group"),
    Route("PUT", f"/admin/scaling/groups/{NAME_PARAM}", scaling_api.replace_group, "replace_scaling_group"),
    Route("DELETE", f"/admin/scaling/groups/{NAME_PARAM}", scaling_api.delete_group, "delete_scaling_group"),
    Route("GET", "/admin/scaling/events", scaling_api.list_events, "list_scaling_events"),
    Route("GET", "/admin/alerts", alerts_api.list_alerts, "list_alerts"),
    Route("GET", "/admin/overview", status_page.overview, "overview"),
    Route("GET", "/admin/models", routing_api.list_models, "list_models"),
    Route("POST", "/admin/select", routing_api.select_instance, "select_instance"),
)


def setup_routes(app: web.Application) -> None:
    """Register every admin route (and the auth throttle state) on ``app``."""
    install_auth_state(app)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler, name=route.name)
