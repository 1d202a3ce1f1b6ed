"""GET /admin/alerts: the controller's recent alerts (newest first) and where they go."""

from __future__ import annotations

from aiohttp import web

from control_plane.api.app_keys import ALERTS
from control_plane.api.bodies import query_int


async def list_alerts(request: web.Request) -> web.Response:
    limit = query_int(request, "limit", 50, 1, 200) or 50
    service = request.app[ALERTS]
    return web.json_response(
        {
            "alerts": service.recent(limit),
            "open": sorted(service.open),
            "receivers": [receiver.label for receiver in service.receivers],
        }
    )
