"""OpenAPI parts for client keys (/admin/keys) and the audit log (/admin/audit); merged by build_openapi."""

from __future__ import annotations

import copy

from pydantic.json_schema import models_json_schema

from control_plane.api.openapi import (
    BODY_ERRORS,
    NEXT_CURSOR,
    REF,
    Schema,
    _body,
    _errors,
    _object,
    _ok,
    _op,
    _pattern,
    _ref,
)
from control_plane.registry import validators as v
from control_plane.registry.client_keys import KEY_ID_RE, MODEL_PATTERN_RE, ClientKeySettings

DATE_TIME: Schema = {"type": "string", "format": "date-time"}


def _settings_schema() -> Schema:
    _, top = models_json_schema([(ClientKeySettings, "validation")], ref_template=REF)
    schema: Schema = top["$defs"]["ClientKeySettings"]
    props = schema["properties"]
    props["name"].update(_pattern(v.NAME_RE))
    props["allowed_models"]["items"] = _pattern(MODEL_PATTERN_RE)
    props["expires_at"] = {
        "anyOf": [DATE_TIME, {"type": "null"}],
        "default": None,
        "description": props["expires_at"].get("description", ""),
    }
    schema["title"] = "NewClientKey"
    return schema


_COUNT: Schema = {"type": "integer", "minimum": 0}
_USAGE_TOTALS: Schema = {
    "requests": {**_COUNT, "description": "Requests answered through a pool (any status)"},
    "prompt_tokens": _COUNT,
    "completion_tokens": _COUNT,
    "total_tokens": _COUNT,
    "cost_usd": {"type": "number", "minimum": 0, "description": "At the instance's rates when written"},
    "estimated_requests": {
        **_COUNT,
        "description": "Requests whose answer reported no usage: tokens estimated as bytes / 4",
    },
}
_NULLABLE_TEXT: Schema = {"type": ["string", "null"]}


def _usage_schemas() -> dict[str, Schema]:
    row = _object(
        {
            "key": {**_NULLABLE_TEXT, "description": "Client key id; null: anonymous, or not grouped by key"},
            "key_name": _NULLABLE_TEXT,
            "instance": _NULLABLE_TEXT,
            "model": _NULLABLE_TEXT,
            "day": {"type": "string", "format": "date", "description": "With group_by=day (UTC)"},
            **_USAGE_TOTALS,
        },
        ["key", "key_name", "instance", "model", *_USAGE_TOTALS],
    )
    period = _object({"from": DATE_TIME, "to": DATE_TIME, **_USAGE_TOTALS}, ["from", "to", *_USAGE_TOTALS])
    return {
        "UsageRow": row,
        "UsageReport": _object(
            {"rows": {"type": "array", "items": _ref("UsageRow")}, "from": DATE_TIME, "to": DATE_TIME},
            ["rows", "from", "to"],
        ),
        "KeyUsage": _object(
            {
                "key": _pattern(KEY_ID_RE),
                "key_name": {"type": "string"},
                "today": period,
                "month": copy.deepcopy(period),
            },
            ["key", "key_name", "today", "month"],
        ),
    }


def _query(name: str, description: str, schema: Schema) -> Schema:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def _usage_parameters() -> list[Schema]:
    instant: Schema = {
        "anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}],
        "description": "YYYY-MM-DD or an ISO 8601 date-time (UTC unless it names a zone)",
    }
    group = "(?:key|instance|model|day)"
    return [
        _query(
            "group_by",
            "key, instance, model, day: one or more, comma separated (default key)",
            {"type": "string", "pattern": f"^{group}(?:,{group})*$", "default": "key"},
        ),
        _query("from", "Start (default: 30 days before to); a date is its day's start", instant),
        _query("to", "End, excluded (default: tomorrow 00:00 UTC); a date includes its day", instant),
        _query("key", "Only this client key id", _pattern(KEY_ID_RE)),
        _query("instance", "Only this instance", _pattern(v.NAME_RE)),
        _query("model", "Only this model", _pattern(v.MODEL_RE)),
        _query("format", "json or csv", {"type": "string", "enum": ["json", "csv"], "default": "json"}),
    ]


def schemas() -> dict[str, Schema]:
    new = _settings_schema()
    patch: Schema = {
        "title": "ClientKeyPatch",
        "description": "Partial update: the given fields replace the current ones. The secret never changes.",
        "type": "object",
        "additionalProperties": False,
        "properties": copy.deepcopy(new["properties"]),
    }
    public_props: Schema = {
        "id": _pattern(KEY_ID_RE),
        **copy.deepcopy(new["properties"]),
        "key_prefix": {"type": "string", "description": "The first characters of the key"},
        "key_last4": {"type": "string", "description": "The last 4 characters of the key"},
        "created_at": DATE_TIME,
        "updated_at": DATE_TIME,
    }
    for prop in public_props.values():
        prop.pop("default", None)
    public = _object(public_props, sorted(public_props))
    created = copy.deepcopy(public)
    created["properties"]["key"] = {
        "type": "string",
        "description": "The secret: shown in this answer only, never again",
    }
    created["required"] = sorted([*created["required"], "key"])
    entry = _object(
        {
            "id": {"type": "integer"},
            "at": DATE_TIME,
            "actor": {"type": "string", "description": "key:<sha256 prefix> of the admin key used"},
            "client_ip": {"type": "string"},
            "method": {"type": "string"},
            "path": {"type": "string"},
            "target": {"type": ["string", "null"]},
            "status": {"type": "integer"},
        },
        ["id", "at", "actor", "client_ip", "method", "path", "target", "status"],
    )
    return {
        "NewClientKey": new,
        "ClientKeyPatch": patch,
        "ClientKey": public,
        "CreatedClientKey": created,
        "ClientKeyList": _object(
            {"keys": {"type": "array", "items": _ref("ClientKey")}, "next_cursor": NEXT_CURSOR}, ["keys"]
        ),
        **_usage_schemas(),
        "AuditEntry": entry,
        "AuditList": _object(
            {"entries": {"type": "array", "items": _ref("AuditEntry")}, "next_cursor": NEXT_CURSOR},
            ["entries"],
        ),
    }


def parameters() -> Schema:
    return {
        "KeyId": {"name": "key_id", "in": "path", "required": True, "schema": _pattern(KEY_ID_RE)},
        "AuditLimit": {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
        },
        "AuditCursor": {
            "name": "cursor",
            "in": "query",
            "required": False,
            "description": "next_cursor of the previous page (an entry id: like before)",
            "schema": {"type": "string", "pattern": "^[1-9][0-9]{0,17}$"},
        },
        "AuditBefore": {
            "name": "before",
            "in": "query",
            "required": False,
            "description": "Only entries with a smaller id (paging back)",
            "schema": {"type": "integer", "minimum": 1, "maximum": 2**62},
        },
    }


def paths() -> Schema:
    key_param = [_ref("KeyId", "parameters")]
    return {
        "/admin/keys": {
            "get": _op(
                "list_keys",
                "List client API keys (never the secrets), by id, a page at a time",
                {**_ok("Keys", "ClientKeyList"), **_errors(422)},
                parameters=[_ref("Limit", "parameters"), _ref("Cursor", "parameters")],
            ),
            "post": _op(
                "create_key",
                "Create a client API key; the answer holds its secret (field key), once",
                {**_ok("Created", "CreatedClientKey", "201"), **_errors(409, *BODY_ERRORS)},
                requestBody=_body("NewClientKey"),
            ),
        },
        "/admin/keys/{key_id}": {
            "parameters": key_param,
            "get": _op("get_key", "One client API key", {**_ok("The key", "ClientKey"), **_errors(404, 422)}),
            "put": _op(
                "update_key",
                "Change a client API key (partial)",
                {**_ok("The updated key", "ClientKey"), **_errors(404, 409, *BODY_ERRORS)},
                requestBody=_body("ClientKeyPatch"),
            ),
            "delete": _op(
                "delete_key",
                "Delete a client API key",
                {"204": {"description": "Deleted"}, **_errors(404, 422)},
            ),
        },
        "/admin/usage": {
            "get": _op(
                "get_usage",
                "Token usage and cost summed by key, instance, model or day (whole days: day buckets, kept "
                "longest; else minute buckets)",
                {
                    "200": {
                        "description": "Usage rows",
                        "content": {
                            "application/json": {"schema": _ref("UsageReport")},
                            "text/csv": {"schema": {"type": "string"}},
                        },
                    },
                    **_errors(422),
                },
                parameters=_usage_parameters(),
            ),
        },
        "/admin/keys/{key_id}/usage": {
            "parameters": key_param,
            "get": _op(
                "get_key_usage",
                "One client key's usage today and this month (UTC)",
                {**_ok("The key's usage", "KeyUsage"), **_errors(404, 422)},
            ),
        },
        "/admin/audit": {
            "get": _op(
                "list_audit",
                "Changes made through this API, newest first (no secrets)",
                {**_ok("Audit entries", "AuditList"), **_errors(422)},
                parameters=[
                    _ref("AuditLimit", "parameters"),
                    _ref("AuditBefore", "parameters"),
                    _ref("AuditCursor", "parameters"),
                ],
            ),
        },
    }
