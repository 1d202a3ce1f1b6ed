"""Admin API for the controller itself: GET /admin/status (generation, pools a page at a time, reloads,
learned weights), POST /admin/reload (render, test and reload now) and GET /admin/health (liveness)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from control_plane.api import paging
from control_plane.api.app_keys import RECONCILER, STORE, WEIGHTS
from control_plane.api.bodies import literal_keys, redact, run
from control_plane.registry.store import Store
from control_plane.render.spec import Pool


def _counts(store: Store) -> tuple[int, int, int]:
    configs = [config for config, _ in store.list_instances()]
    return store.generation(), len(configs), sum(1 for c in configs if c.enabled)


def _name(pool: Pool) -> str:
    return pool.name


async def status(request: web.Request) -> web.Response:
    """``pools`` are paged by name (``limit``, ``cursor``, ``next_cursor``) and filtered by ``model``."""
    page = paging.page_of(request.query)
    model = paging.instance_filter(request.query).model
    generation, total, enabled = await run(_counts, request.app[STORE])
    reconciler = request.app[RECONCILER]
    spec = reconciler.spec
    # Paged by name before they are described (at 1,000 pools describing them all cost more than the rest).
    pools = sorted((p for p in (spec.pools if spec else ()) if model is None or p.model == model), key=_name)
    chosen, next_cursor = paging.take(pools, _name, page)
    body: dict[str, Any] = {**reconciler.status(chosen)}
    body["next_cursor"] = next_cursor
    body["generation"] = generation  # the configuration generation in the store; applied: body["applied"]
    body["instances"] = {"total": total, "enabled": enabled}
    weights = request.app.get(WEIGHTS)
    if weights is not None:
        body["weights"] = weights.status()  # learned strategies: recomputations, weight sets applied
    return web.json_response(body)


def _stored_keys(store: Store) -> list[str]:
    return literal_keys(config for config, _ in store.list_instances())


async def reload(request: web.Request) -> web.Response:
    """A pass that fails (nginx -t, the reload, nginx not adopting it) is a 409 with the reason, any
    provider key in it masked; the running configuration stays."""
    result = await request.app[RECONCILER].reconcile_now(force=True)
    body = result.to_dict()
    if not result.ok:
        secrets = await run(_stored_keys, request.app[STORE])
        error = redact(result.error or "reload failed", secrets)
        return web.json_response({**body, "ok": False, "error": error}, status=409)
    return web.json_response({**body, "ok": True})


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})
