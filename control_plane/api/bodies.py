"""What every admin handler module shares: reading requests (strict JSON, JSON objects, validation exactly as
the OpenAPI schema states it, path and query values) and shaping answers (errors naming the field, secrets
masked). Imports nothing else of the API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from control_plane.errors import InvalidInput
from control_plane.registry import validators as v
from control_plane.registry.models import InstanceConfig, mask_secret
from control_plane.registry.validators import validate_strict as validate_strict

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

JSON_TYPES = frozenset({"application/json"})


class ApiError(Exception):
    """An HTTP error with a JSON body, raised by handlers for protocol-level problems (400, 415, ...)."""

    def __init__(self, status: int, error: str, detail: str | None = None) -> None:
        super().__init__(detail or error)
        self.status = status
        self.error = error
        self.detail = detail


def error_body(error: str, detail: object = None) -> dict[str, object]:
    """Every admin error has both fields: a stable code and what went wrong."""
    return {"error": error, "detail": error.replace("_", " ") if detail is None else detail}


def invalid(field: str, message: str) -> InvalidInput:
    """A 422 naming one field."""
    return InvalidInput([{"field": field, "message": message}])


async def run(fn: Callable[..., T], *args: Any) -> T:
    """Run a synchronous store call (SQLAlchemy) off the event loop."""
    return await asyncio.to_thread(fn, *args)


# -- bodies ----------------------------------------------------------------------------------------------


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
        raise invalid("body", "must be a JSON object")
    return data


def _message(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def validation_details(exc: ValidationError) -> list[dict[str, str]]:
    """{field, message} pairs; the offending input value is never included (it may be a secret)."""
    return [
        {"field": ".".join(str(part) for part in err["loc"]) or "body", "message": _message(err["msg"])}
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


# -- path and query --------------------------------------------------------------------------------------


def path_name(request: web.Request) -> str:
    """The ``{name}`` of the path (an instance's or a scaling group's), checked like a name in a body."""
    try:
        return v.check_name(request.match_info["name"])
    except ValueError as exc:
        raise invalid("name", str(exc)) from None


def query_choice(request: web.Request, param: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (the first when the parameter is absent)."""
    value = request.query.get(param, choices[0])
    if value not in choices:
        raise invalid(param, f"must be one of {', '.join(choices)}")
    return value


def query_int(request: web.Request, name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise invalid(name, f"must be an integer {low}-{high}")
    return value


# -- secrets in answers ----------------------------------------------------------------------------------


def literal_keys(configs: Iterable[InstanceConfig]) -> list[str]:
    """The provider keys stored in clear (not references): what an error text must never show."""
    keys = (config.api_key for config in configs)
    return [key for key in keys if key and mask_secret(key) != key]


def redact(text: str, secrets: list[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "****")
    return text
