"""What every part of the admin API's OpenAPI description shares: the schema helpers, and ``Route`` (an admin
route with the description of its operation), which ``routes.ROUTES`` lists and ``openapi.build_openapi``
turns into the document's paths. Imports nothing else of the API: the openapi modules and the route table
build on it, never the other way round."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from aiohttp.typedefs import Handler

Schema = dict[str, Any]

REF = "#/components/schemas/{model}"
JSON = "application/json"
NEXT_CURSOR: Schema = {
    "type": ["string", "null"],
    "description": "Pass as cursor for the next page; null on the last page",
}
BODY_ERRORS = (400, 413, 415, 422)
ERROR_RESPONSES = {
    400: "InvalidJson",
    401: "Unauthorized",
    404: "NotFound",
    409: "Conflict",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    422: "InvalidInput",
    429: "TooManyRequests",
}


def ref(name: str, kind: str = "schemas") -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def ecma(pattern: str) -> str:
    """Python allow-list regexes as JSON Schema (ECMA 262) patterns."""
    return pattern.removesuffix(r"\Z") + "$" if pattern.endswith(r"\Z") else pattern


def pattern_schema(regex: Any, *, empty_ok: bool = False) -> Schema:
    pattern = ecma(regex.pattern)
    return {"type": "string", "pattern": f"^$|{pattern}" if empty_ok else pattern}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def json_object(properties: Schema, required: list[str] | None = None, *, extra: bool = False) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": extra}
    if required:
        schema["required"] = required
    return schema


def json_content(schema: Schema) -> Schema:
    return {JSON: {"schema": schema}}


def query_param(name: str, description: str, schema: Schema) -> Schema:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def ok_response(description: str, schema: str, status: str = "200") -> Schema:
    return {status: {"description": description, "content": json_content(ref(schema))}}


NO_CONTENT: Schema = {"204": {"description": "Deleted"}}


def error_responses(*codes: int, public: bool = False) -> Schema:
    """References to the shared error responses; every route that needs the admin key may answer 401/429."""
    wanted = set(codes) if public else {401, 429, *codes}
    return {str(code): ref(ERROR_RESPONSES[code], "responses") for code in sorted(wanted)}


def json_body(schema: str, description: str | None = None) -> Schema:
    body: Schema = {"required": True, "content": json_content(ref(schema))}
    if description:
        body["description"] = description
    return body


@dataclass(frozen=True)
class Operation:
    """One operation's description. ``responses`` are its answers other than the shared errors (``errors``:
    their status codes); ``params`` its query parameters; ``public``: no admin key; ``applies``: it changes
    what nginx serves and takes ?wait= (control_plane/api/apply.py)."""

    summary: str
    responses: Schema
    errors: tuple[int, ...] = ()
    body: Schema | None = None
    params: tuple[Schema, ...] = ()
    public: bool = False
    applies: bool = False


class Route(NamedTuple):
    method: str
    path: str  # as aiohttp routes it (a name parameter may carry a regex)
    handler: Handler
    name: str  # the route's name and its operationId
    doc: Operation
