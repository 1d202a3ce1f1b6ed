"""Admin API for autoscaling: /admin/scaling/groups (CRUD; one group with its members and its current
evaluation) and /admin/scaling/events (newest first)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from sqlalchemy.engine import Connection

from control_plane.api.app_keys import SCALING
from control_plane.api.bodies import invalid, path_name, read_object, validate_strict
from control_plane.errors import InvalidInput, NotFound
from control_plane.registry import importers
from control_plane.registry import validators as v
from control_plane.registry.scaling import ScalingStore
from control_plane.scaling.model import ScalingGroup
from control_plane.scaling.service import ScalingService

EVENTS_MAX = 1000


def _service(request: web.Request) -> ScalingService:
    return request.app[SCALING]


async def _group_body(request: web.Request) -> ScalingGroup:
    group = validate_strict(ScalingGroup, await read_object(request))
    driver = _service(request).driver
    refused = driver.refusal(group)
    if refused:
        raise invalid(driver.field(group), refused)
    return group


def _view(service: ScalingService, group: ScalingGroup, detail: bool) -> dict[str, Any]:
    view: dict[str, Any] = {"group": group.model_dump(mode="json")}
    if detail:
        view.update(service.status(group))
    else:
        view["members"] = len(service.registered(group.name))
    return view


async def _group(service: ScalingService, name: str) -> ScalingGroup:
    groups = await asyncio.to_thread(service.scaling.groups)
    if name not in groups:
        raise NotFound(f"scaling group {name!r} not found")
    return groups[name]


async def list_groups(request: web.Request) -> web.Response:
    service = _service(request)
    groups = await asyncio.to_thread(service.scaling.groups)
    return web.json_response({"groups": [_view(service, g, False) for g in groups.values()]})


async def create_group(request: web.Request) -> web.Response:
    service = _service(request)
    group = await _group_body(request)
    await asyncio.to_thread(service.scaling.create_group, group)
    return web.json_response(_view(service, group, False), status=201)


async def get_group(request: web.Request) -> web.Response:
    service = _service(request)
    group = await _group(service, path_name(request))
    return web.json_response(_view(service, group, True))


async def replace_group(request: web.Request) -> web.Response:
    service = _service(request)
    name = path_name(request)
    group = await _group_body(request)
    if group.name != name:
        raise invalid("name", "must equal the name in the path (a group cannot be renamed)")
    await asyncio.to_thread(service.scaling.replace_group, group)
    return web.json_response(_view(service, group, False))


async def delete_group(request: web.Request) -> web.Response:
    """The group goes at once; its members are drained and stopped by the autoscaler's next passes."""
    service = _service(request)
    await asyncio.to_thread(service.scaling.delete_group, path_name(request))
    return web.Response(status=204)


def _int(request: web.Request, param: str, low: int, high: int, default: int | None) -> int | None:
    text = request.query.get(param)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise invalid(param, f"an integer from {low} to {high}")
    return int(text)


async def list_events(request: web.Request) -> web.Response:
    service = _service(request)
    group = request.query.get("group")
    if group is not None:
        try:
            v.check_name(group)
        except ValueError as exc:
            raise invalid("group", str(exc)) from None
    limit = _int(request, "limit", 1, EVENTS_MAX, 100) or 100
    before = _int(request, "before", 1, 2**62, None)
    events = await asyncio.to_thread(service.scaling.events, group, limit, before)
    return web.json_response({"events": events})


# -- the status page -----------------------------------------------------------------------------------------

EVENTS_SHOWN = 3


async def overview(app: web.Application) -> list[dict[str, Any]] | None:
    """The scaling groups for the status page (GET /, GET /admin/overview); None without an autoscaler."""
    if SCALING not in app:
        return None
    return await asyncio.to_thread(app[SCALING].overview, EVENTS_SHOWN)


# -- the export/import document (GET /admin/config/export, POST /admin/config/import) --------------------


def groups_store(app: web.Application) -> ScalingStore | None:
    """Where the scaling groups are; None in an app built without the autoscaler."""
    return app[SCALING].scaling if SCALING in app else None


def with_groups(scaling: ScalingStore | None, document: dict[str, Any]) -> dict[str, Any]:
    """An exported document with the registry's scaling groups. Blocking: run in a thread."""
    if scaling is None:
        return document
    return importers.export_groups(document, list(scaling.groups().values()))


def imported_groups(request: web.Request, doc: dict[str, Any]) -> list[ScalingGroup] | None:
    """The document's scaling groups, checked as POST /admin/scaling/groups checks one (strict types in
    importers.parse_groups, then the driver's allow-list); None when the document has none."""
    groups = importers.parse_groups(doc)
    if groups is None:
        return None
    if SCALING not in request.app:
        raise invalid("scaling_groups", "this controller runs no autoscaler")
    driver = _service(request).driver
    errors = [
        {"field": f"scaling_groups[{index}].{driver.field(group)}", "message": refused}
        for index, group in enumerate(groups)
        if (refused := driver.refusal(group))
    ]
    if errors:
        raise InvalidInput(errors)
    return groups


def import_writer(
    request: web.Request, groups: list[ScalingGroup] | None, merge: bool
) -> Callable[[Connection], None] | None:
    """What writes the groups in the import's transaction; None leaves the groups as they are."""
    return None if groups is None else _service(request).scaling.importer(groups, merge=merge)
