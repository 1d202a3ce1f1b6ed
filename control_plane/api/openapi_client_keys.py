"""OpenAPI parts for client keys (/admin/keys), usage and the audit log (/admin/audit): schemas and
parameters, merged by build_openapi."""

from __future__ import annotations

import copy

from pydantic.json_schema import models_json_schema

from control_plane.api.openapi_common import (
    NEXT_CURSOR,
    REF,
    Schema,
    json_object,
    pattern_schema,
    query_param,
    ref,
)
from control_plane.registry import validators as v
from control_plane.registry.client_keys import KEY_ID_RE, MODEL_PATTERN_RE, ClientKeySettings

DATE_TIME: Schema = {"type": "string", "format": "date-time"}


def _settings_schema() -> Schema:
    _, top = models_json_schema([(ClientKeySettings, "validation")], ref_template=REF)
    schema: Schema = top["$defs"]["ClientKeySettings"]
    props = schema["properties"]
    props["name"].update(pattern_schema(v.NAME_RE))
    props["allowed_models"]["items"] = pattern_schema(MODEL_PATTERN_RE)
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
    row = json_object(
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
    period = json_object(
        {"from": DATE_TIME, "to": DATE_TIME, **_USAGE_TOTALS}, ["from", "to", *_USAGE_TOTALS]
    )
    return {
        "UsageRow": row,
        "UsageReport": json_object(
            {"rows": {"type": "array", "items": ref("UsageRow")}, "from": DATE_TIME, "to": DATE_TIME},
            ["rows", "from", "to"],
        ),
        "KeyUsage": json_object(
            {
                "key": pattern_schema(KEY_ID_RE),
                "key_name": {"type": "string"},
                "today": period,
                "month": copy.deepcopy(period),
            },
            ["key", "key_name", "today", "month"],
        ),
    }


def usage_parameters() -> tuple[Schema, ...]:
    instant: Schema = {
        "anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}],
        "description": "YYYY-MM-DD or an ISO 8601 date-time (UTC unless it names a zone)",
    }
    group = "(?:key|instance|model|day)"
    return (
        query_param(
            "group_by",
            "key, instance, model, day: one or more, comma separated (default key)",
            {"type": "string", "pattern": f"^{group}(?:,{group})*$", "default": "key"},
        ),
        query_param("from", "Start (default: 30 days before to); a date is its day's start", instant),
        query_param("to", "End, excluded (default: tomorrow 00:00 UTC); a date includes its day", instant),
        query_param("key", "Only this client key id", pattern_schema(KEY_ID_RE)),
        query_param("instance", "Only this instance", pattern_schema(v.NAME_RE)),
        query_param("model", "Only this model", pattern_schema(v.MODEL_RE)),
        query_param("format", "json or csv", {"type": "string", "enum": ["json", "csv"], "default": "json"}),
    )


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
        "id": pattern_schema(KEY_ID_RE),
        **copy.deepcopy(new["properties"]),
        "key_prefix": {"type": "string", "description": "The first characters of the key"},
        "key_last4": {"type": "string", "description": "The last 4 characters of the key"},
        "created_at": DATE_TIME,
        "updated_at": DATE_TIME,
    }
    for prop in public_props.values():
        prop.pop("default", None)
    public = json_object(public_props, sorted(public_props))
    created = copy.deepcopy(public)
    created["properties"]["key"] = {
        "type": "string",
        "description": "The secret: shown in this answer only, never again",
    }
    created["required"] = sorted([*created["required"], "key"])
    entry = json_object(
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
        "ClientKeyList": json_object(
            {"keys": {"type": "array", "items": ref("ClientKey")}, "next_cursor": NEXT_CURSOR}, ["keys"]
        ),
        **_usage_schemas(),
        "AuditEntry": entry,
        "AuditList": json_object(
            {"entries": {"type": "array", "items": ref("AuditEntry")}, "next_cursor": NEXT_CURSOR},
            ["entries"],
        ),
    }


def parameters() -> Schema:
    return {
        "KeyId": {"name": "key_id", "in": "path", "required": True, "schema": pattern_schema(KEY_ID_RE)},
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


def usage_responses() -> Schema:
    content = {"application/json": {"schema": ref("UsageReport")}, "text/csv": {"schema": {"type": "string"}}}
    return {"200": {"description": "Usage rows", "content": content}}
