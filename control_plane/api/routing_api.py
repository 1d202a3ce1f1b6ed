"""Admin API for routing: GET/PUT /admin/routing (aliases, strategies, fallbacks), and what routing serves
and why: GET /admin/models (every model, its instances, configured or discovered) and POST /admin/select
(where a request for a model would go, explained)."""

from __future__ import annotations

import asyncio

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from control_plane.api.app_keys import RECONCILER, STORE
from control_plane.api.apply import answer_applied, wants_wait
from control_plane.api.bodies import ApiError, read_json, read_object, validate_strict
from control_plane.providers import ApiFamily, Kind
from control_plane.registry.models import ModelName, RoutingConfig
from control_plane.routing.discovery import catalog
from control_plane.routing.explain import select


class SelectRequest(BaseModel):
    """POST /admin/select: a request's model, the API it speaks and its kind."""

    model_config = ConfigDict(extra="forbid")

    model: ModelName
    api: ApiFamily = ApiFamily.OPENAI
    kind: Kind = Kind.CHAT


async def list_models(request: web.Request) -> web.Response:
    instances = await asyncio.to_thread(request.app[STORE].list_instances)
    spec = request.app[RECONCILER].spec
    available = (
        frozenset((p.model, m.instance) for p in spec.pools for m in p.members) if spec else frozenset()
    )
    return web.json_response({"models": catalog(instances, available)})


async def select_instance(request: web.Request) -> web.Response:
    asked = validate_strict(SelectRequest, await read_object(request))
    reconciler = request.app[RECONCILER]
    spec, learned = reconciler.spec, reconciler.learned() if reconciler.learned else {}
    answer = select(spec, asked.model, asked.api, asked.kind, learned) if spec else None
    if answer is None:
        raise ApiError(404, "not_found", f"model {asked.model} is not served for {asked.api} {asked.kind}")
    return web.json_response(answer)


async def get_routing(request: web.Request) -> web.Response:
    routing = await asyncio.to_thread(request.app[STORE].get_routing)
    return web.json_response(routing.model_dump(mode="json"))


async def put_routing(request: web.Request) -> web.Response:
    wait = wants_wait(request)
    routing = validate_strict(RoutingConfig, await read_json(request))
    await asyncio.to_thread(request.app[STORE].set_routing, routing)
    return await answer_applied(request, "routing updated", wait, routing.model_dump(mode="json"), 200)
