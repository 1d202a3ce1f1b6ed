"""Reading admin request bodies: strict JSON, JSON objects, and validation exactly as the OpenAPI schema
states it. Shared by every admin handler module."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from control_plane.api.middleware import ApiError
from control_plane.errors import InvalidInput
from control_plane.registry.validators import validate_strict as validate_strict

JSON_TYPES = frozenset({"application/json"})


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def _number(token: str) -> int | float:
    """JSON Schema counts 5.0 as an integer; so does the API (pydantic's strict mode would not)."""
    value = float(token)
    return int(value) if value.is_integer() else value


def parse_json(raw: bytes) -> Any:
    """Strict RFC 8259 JSON (no NaN/Infinity); anything unparsable is a 400."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_number)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "request body is not valid JSON") from None


async def read_json(request: web.Request) -> Any:
    if request.content_type not in JSON_TYPES:
        raise ApiError(415, "unsupported_media_type", "expected Content-Type: application/json")
    return parse_json(await request.read())


async def read_object(request: web.Request) -> dict[str, Any]:
    data = await read_json(request)
    if not isinstance(data, dict):
        raise InvalidInput([{"field": "body", "message": "must be a JSON object"}])
    return data
