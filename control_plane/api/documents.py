"""Admin API for whole registry documents: GET /admin/config/export (JSON, YAML or the legacy pair),
POST /admin/config/import (merge or replace) and POST /admin/instances/migrate (the legacy two-file format
or an Ollama instance list). A document is checked whole before anything is written."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from control_plane.api import scaling as scaling_api
from control_plane.api.app_keys import STORE
from control_plane.api.apply import answer_applied, wants_wait
from control_plane.api.bodies import (
    JSON_TYPES,
    ApiError,
    invalid,
    query_choice,
    read_json,
    run,
)
from control_plane.api.instances import check_secret_refs, check_unreserved
from control_plane.errors import InvalidInput
from control_plane.registry import importers
from control_plane.registry.models import InstanceConfig, InstanceState
from control_plane.registry.scaling import ScalingStore
from control_plane.registry.store import Store

YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml"})
EXPORT_TYPES = {"json": "application/json", "yaml": "application/yaml"}
LEGACY_EXPORT = "legacy"
MODES = ("merge", "replace")
LEGACY_KEYS = frozenset({"instance_configs", "instance_states"})

Migration = list[tuple[InstanceConfig, InstanceState | None]]


def _existing(store: Store) -> dict[str, InstanceConfig]:
    return {config.name: config for config, _ in store.list_instances()}


# -- migration -------------------------------------------------------------------------------------------


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
        raise invalid("body", "expected {instance_configs, instance_states}, {ollama_instances} or a list")
    if not parsed:
        raise invalid("body", "nothing to import")
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
    merge = query_choice(request, "mode", MODES) == "merge"
    wait = wants_wait(request)
    body = await read_json(request)
    store = request.app[STORE]
    parsed = parse_migration(body, await run(_existing, store))
    await asyncio.to_thread(check_secret_refs, request, migration_keys(body, parsed))
    await run(_apply_migration, store, parsed, merge)
    names = [config.name for config, _ in parsed]
    return await answer_applied(
        request, "migration imported", wait, {"imported": names, "count": len(names)}, 200
    )


# -- export and import -----------------------------------------------------------------------------------


def _export(store: Store, fmt: str, scaling: ScalingStore | None = None) -> str:
    configs = [config for config, _ in store.list_instances()]
    document = scaling_api.with_groups(scaling, importers.export_document(configs, store.get_routing()))
    return importers.dump(document, fmt)


def _export_legacy(store: Store) -> str:
    return importers.dump(importers.export_legacy(store.list_instances()), "json")


async def export_config(request: web.Request) -> web.Response:
    fmt = query_choice(request, "format", (*EXPORT_TYPES, LEGACY_EXPORT))
    if fmt == LEGACY_EXPORT:  # the legacy instance_configs.json + instance_states.json pair, one object
        text = await run(_export_legacy, request.app[STORE])
        return web.Response(text=text, content_type="application/json", charset="utf-8")
    text = await run(_export, request.app[STORE], fmt, scaling_api.groups_store(request.app))
    return web.Response(text=text, content_type=EXPORT_TYPES[fmt], charset="utf-8")


async def _read_document(request: web.Request) -> dict[str, Any]:
    if request.content_type in YAML_TYPES:
        raw = await request.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid("body", "must be UTF-8 text") from None
        return importers.load(text, "yaml")
    data = await read_json(request)
    if not isinstance(data, dict):
        raise invalid("body", "document must be a JSON object")
    importers.check_depth(data)
    return data


def _import(request: web.Request, doc: dict[str, Any], merge: bool) -> tuple[int, int]:
    store = request.app[STORE]
    configs, routing = importers.parse_document(doc, _existing(store))
    groups = scaling_api.imported_groups(request, doc)
    check_unreserved([config.name for config in configs], "instances")
    check_secret_refs(request, [(f"instances[{i}].api_key", c.api_key) for i, c in enumerate(configs)])
    store.replace_all(configs, routing, merge=merge, also=scaling_api.import_writer(request, groups, merge))
    return len(configs), store.generation()


async def import_config(request: web.Request) -> web.Response:
    merge = query_choice(request, "mode", MODES) == "merge"
    wait = wants_wait(request)
    if request.content_type not in JSON_TYPES | YAML_TYPES:
        raise ApiError(415, "unsupported_media_type", "expected application/json or application/yaml")
    doc = await _read_document(request)
    count, generation = await run(_import, request, doc, merge)
    return await answer_applied(
        request, "configuration imported", wait, {"imported": count, "generation": generation}, 200
    )
