"""The admin listener's middlewares, in order (``MIDDLEWARES``): JSON errors for everything, the body limit of
the bulk routes, the address filter, the audit trail and the admin-key authentication. Production and tests
build the application with this one list (control_plane.api.admin.create_admin_app)."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import ValidationError

from control_plane.api.address_filter import address_filter_middleware
from control_plane.api.app_keys import SETTINGS
from control_plane.api.audit import audit_middleware
from control_plane.api.auth import auth_middleware
from control_plane.api.bodies import ApiError, error_body, validation_details
from control_plane.errors import Conflict, InvalidInput, NotFound

log = logging.getLogger(__name__)


def _http_exception_response(exc: web.HTTPException) -> web.Response:
    headers = {
        k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after", "www-authenticate")
    }
    error = exc.reason.lower().replace(" ", "_") if exc.reason else "http_error"
    detail = f"{exc.reason}: {_route_hint(exc)}" if exc.status in (404, 405) else exc.reason
    return web.json_response(error_body(error, detail), status=exc.status, headers=headers)


def _route_hint(exc: web.HTTPException) -> str:
    if exc.status == 405 and "Allow" in exc.headers:
        return f"allowed methods are {exc.headers['Allow']}"
    return "no such admin route (GET /admin/openapi.json lists them)"


def error_response(exc: Exception) -> web.StreamResponse:
    """Map an exception to its JSON answer."""
    if isinstance(exc, ApiError):
        return web.json_response(error_body(exc.error, exc.detail), status=exc.status)
    if isinstance(exc, InvalidInput):
        return web.json_response(error_body("invalid_input", exc.errors), status=422)
    if isinstance(exc, ValidationError):
        return web.json_response(error_body("invalid_input", validation_details(exc)), status=422)
    if isinstance(exc, NotFound):
        return web.json_response(error_body("not_found", str(exc) or "not found"), status=404)
    if isinstance(exc, Conflict):
        return web.json_response(error_body("conflict", str(exc) or "conflict"), status=409)
    if isinstance(exc, web.HTTPException):
        return _http_exception_response(exc)
    log.exception("unhandled error in admin API", exc_info=exc)
    return web.json_response(
        error_body("internal_error", "the controller failed to answer; its log has the details"), status=500
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: every answer, including errors and unknown routes, is JSON."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc)
    except Exception as exc:
        return error_response(exc)
    return response


# Routes that take whole registry documents: these may be up to ISHGW_ADMIN_MAX_BODY_MB; every other admin
# body keeps aiohttp's 1 MiB.
BULK_ROUTES = frozenset({("POST", "/admin/config/import"), ("POST", "/admin/instances/migrate")})


@web.middleware
async def body_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Raise the body limit for the bulk routes only (inside error_middleware, so a 413 is JSON)."""
    if (request.method, request.path) in BULK_ROUTES:
        request = request.clone(client_max_size=request.app[SETTINGS].admin_max_body_mb * 2**20)
    return await handler(request)


# Outermost first. The audit middleware wraps authentication: it records refused admin keys as well as
# changes; the address filter refuses before either.
MIDDLEWARES = (
    error_middleware,
    body_limit_middleware,
    address_filter_middleware,
    audit_middleware,
    auth_middleware,
)
