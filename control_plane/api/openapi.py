"""OpenAPI 3.1 description of the admin API, with schemas generated from the pydantic models.

Keep it in step with ``routes.ROUTES`` (a unit test compares both ways). Patterns come from the validators so
the schema states the same allow-lists the API enforces.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic.json_schema import models_json_schema

from control_plane.api import paging
from control_plane.health.probes import Outcome
from control_plane.registry import importers
from control_plane.registry import validators as v
from control_plane.registry.models import (
    InstanceConfig,
    InstanceState,
    ProviderType,
    RoutingConfig,
    StateUpdate,
)

Schema = dict[str, Any]

REF = "#/components/schemas/{model}"
JSON = "application/json"
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml")
SECURITY_SCHEMES: Schema = {
    "AdminApiKey": {"type": "apiKey", "in": "header", "name": "X-Admin-API-Key"},
    "BearerAuth": {"type": "http", "scheme": "bearer", "description": "The admin API key as a bearer token"},
}


def _ref(name: str, kind: str = "schemas") -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def _ecma(pattern: str) -> str:
    """Python allow-list regexes as JSON Schema (ECMA 262) patterns."""
    return pattern.removesuffix(r"\Z") + "$" if pattern.endswith(r"\Z") else pattern


def _pattern(regex: Any, *, empty_ok: bool = False) -> Schema:
    pattern = _ecma(regex.pattern)
    return {"type": "string", "pattern": f"^$|{pattern}" if empty_ok else pattern}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PORT = "(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
# validators.check_base_url in regex form (hostnames and IPv4; the API also takes bracketed IPv6).
BASE_URL_PATTERN = rf"^https?://{_LABEL}(?:\.{_LABEL})*(?::{_PORT})?(?:/[A-Za-z0-9._~-]*)*$"


def _base_url(*, empty_ok: bool = False) -> Schema:
    return {
        "type": "string",
        "maxLength": 2048,
        "pattern": f"^$|{BASE_URL_PATTERN}" if empty_ok else BASE_URL_PATTERN,
        "description": "http(s)://host[:port][/path]; no credentials, query or fragment",
    }


# -- components generated from the models ----------------------------------------------------------------


def _tighten_instance_config(schema: Schema) -> None:
    props = schema["properties"]
    props["name"].update(_pattern(v.NAME_RE))
    secret = {"anyOf": [_pattern(v.SECRET_RE, empty_ok=True), _pattern(v.SECRET_REF_RE)]}
    props["api_key"]["anyOf"] = [secret, {"type": "null"}]
    props["api_version"]["anyOf"] = [_pattern(v.API_VERSION_RE, empty_ok=True), {"type": "null"}]
    props["supported_models"]["items"] = _pattern(v.MODEL_RE)
    props["model_deployments"]["propertyNames"] = _pattern(v.MODEL_RE)
    props["model_deployments"]["additionalProperties"] = _pattern(v.DEPLOYMENT_RE)
    props["tags"]["items"] = _pattern(v.TAG_RE)
    props["api_base"]["anyOf"] = [_base_url(empty_ok=True), {"type": "null"}]


def _tighten_routing(schema: Schema) -> None:
    props = schema["properties"]
    props["model_aliases"]["propertyNames"] = _pattern(v.MODEL_RE)
    props["model_aliases"]["additionalProperties"] = _pattern(v.MODEL_RE)
    props["strategies"]["propertyNames"] = _pattern(v.MODEL_RE)
    props["session_header"].update(_pattern(v.HEADER_NAME_RE))
    if "fallbacks" in props:
        props["fallbacks"]["propertyNames"] = _pattern(v.MODEL_RE)
        props["fallbacks"]["additionalProperties"]["items"] = _pattern(v.MODEL_RE)


def _model_schemas() -> dict[str, Schema]:
    models = [
        (InstanceConfig, "validation"),
        (InstanceState, "serialization"),
        (StateUpdate, "validation"),
        (RoutingConfig, "validation"),
    ]
    _, top = models_json_schema(models, ref_template=REF)  # type: ignore[arg-type]
    schemas: dict[str, Schema] = top["$defs"]
    _tighten_instance_config(schemas["InstanceConfig"])
    _tighten_routing(schemas["RoutingConfig"])
    return schemas


def _patch_schema(config: Schema) -> Schema:
    return {
        "title": "InstanceConfigPatch",
        "description": "Partial update: the given fields are merged into the current configuration and the "
        "result is validated whole. The name cannot change (a 'name' equal to the current one is tolerated). "
        "A masked api_key ('****...') keeps the current key; null clears it. 'health' merges field by field.",
        "type": "object",
        "additionalProperties": False,
        "properties": {k: copy.deepcopy(val) for k, val in config["properties"].items() if k != "name"},
    }


# -- hand-written components -----------------------------------------------------------------------------


def _object(properties: Schema, required: list[str] | None = None, *, extra: bool = False) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": extra}
    if required:
        schema["required"] = required
    return schema


def _error_schemas() -> dict[str, Schema]:
    field_error = _object({"field": {"type": "string"}, "message": {"type": "string"}}, ["field", "message"])
    return {
        "Error": _object({"error": {"type": "string"}, "detail": {"type": "string"}}, ["error"]),
        "ValidationError": _object(
            {"error": {"const": "invalid_input"}, "detail": {"type": "array", "items": field_error}},
            ["error", "detail"],
        ),
    }


def _instance_schemas() -> dict[str, Schema]:
    item = _object(
        {
            "name": {"type": "string"},
            "config": _ref("InstanceConfig"),
            "state": _ref("InstanceState"),
        },
        ["name", "config", "state"],
    )
    unmasked = {"not": {"type": "string", "pattern": r"^\*\*\*\*"}}
    return {
        "NewInstance": {
            "description": "A new instance's configuration; api_key must not be a masked value ('****...')",
            "allOf": [_ref("InstanceConfig"), {"properties": {"api_key": unmasked}}],
        },
        "Instance": item,
        "InstanceList": _object(
            {"instances": {"type": "array", "items": _ref("Instance")}, "next_cursor": NEXT_CURSOR},
            ["instances"],
        ),
    }


def _migration_schemas() -> dict[str, Schema]:
    ollama_item: Schema = {
        "type": "object",
        "description": "Ollama instance: base_url (api_base is accepted as an alias when base_url is absent) "
        "plus optional name, api_key, instance_type, enabled and other InstanceConfig fields",
        "properties": {"base_url": _base_url()},
        "required": ["base_url"],
    }
    ollama_list: Schema = {
        "type": "array",
        "minItems": 1,
        "uniqueItems": True,
        "description": "Instance names (given or derived from base_url) must be unique",
        "items": _ref("OllamaInstance"),
    }
    providers = sorted({*(p.value for p in ProviderType), *importers.PROVIDER_ALIASES})
    legacy_config: Schema = {
        "type": "object",
        "description": "A legacy instance configuration; the key is the name unless 'name' is given. "
        "Lists may be comma-separated strings; unknown fields are ignored.",
        "required": ["provider_type"],
        "properties": {"provider_type": {"type": "string", "enum": providers}},
    }
    legacy = _object(
        {
            "instance_configs": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": _pattern(v.NAME_RE),
                "additionalProperties": legacy_config,
            },
            "instance_states": {
                "type": ["object", "null"],
                "description": "Observed state by instance name, best effort: invalid values are dropped, "
                "states without a configuration are ignored",
            },
        },
        ["instance_configs"],
    )
    return {
        "OllamaInstance": ollama_item,
        "MigrationRequest": {
            "oneOf": [legacy, _object({"ollama_instances": ollama_list}, ["ollama_instances"]), ollama_list]
        },
        "MigrationResult": _object(
            {"imported": {"type": "array", "items": {"type": "string"}}, "count": {"type": "integer"}},
            ["imported", "count"],
        ),
    }


def _document_schemas() -> dict[str, Schema]:
    return {
        "ConfigDocument": _object(
            {
                "version": {"const": 1},
                "routing": _ref("RoutingConfig"),
                "instances": {"type": "array", "items": _ref("InstanceConfig")},
            },
            ["version", "routing", "instances"],
        ),
        "ImportDocument": _object(
            {
                "version": {"const": 1},
                "routing": _nullable(_ref("RoutingConfig")),
                "instances": {
                    "type": "array",
                    "uniqueItems": True,
                    "description": "Names must be unique. A masked api_key keeps the existing instance's key "
                    "(none for a new one).",
                    "items": _ref("InstanceConfig"),
                },
            },
            ["instances"],
        ),
        "ImportResult": _object(
            {"imported": {"type": "integer"}, "generation": {"type": "integer"}}, ["imported", "generation"]
        ),
    }


def _runtime_schemas() -> dict[str, Schema]:
    counts = _object({"total": {"type": "integer"}, "enabled": {"type": "integer"}}, ["total", "enabled"])
    return {
        "Status": _object(
            {
                "generation": {"type": "integer", "description": "Configuration generation in the store"},
                "instances": counts,
                "pools": {"type": "array", "items": {"type": "object"}, "description": "One page of pools"},
                "next_cursor": NEXT_CURSOR,
            },
            ["generation", "instances"],
            extra=True,
        ),
        "ReloadResult": _object(
            {
                "ok": {"type": "boolean"},
                "error": {"type": ["string", "null"]},
                "phases_ms": {
                    "type": "object",
                    "additionalProperties": {"type": "number"},
                    "description": "Where the pass's time went: gather, build_spec, render, checksum, "
                    "then (the tree changed) write, nginx_t, reload, live",
                },
            },
            ["ok"],
            extra=True,
        ),
        "Health": _object({"ok": {"const": True}}, ["ok"]),
        "ProbeResult": _object(
            {
                "name": {"type": "string"},
                "outcome": {"enum": [str(o) for o in Outcome]},
                "detail": {"type": "string"},
                "latency_ms": {"type": "number"},
                "models": {"type": "array", "items": {"type": "string"}},
            },
            ["name", "outcome", "detail", "latency_ms", "models"],
        ),
        "InstanceHealth": _object(
            {
                "name": {"type": "string"},
                "health_status": {"enum": ["unknown", "healthy", "unhealthy"]},
                "breaker_state": {"enum": ["closed", "open", "half_open"]},
                "breaker_reason": {"type": ["string", "null"]},
                "breaker_open_until": {"type": ["string", "null"]},
                "rate_limited_until": {"type": ["string", "null"]},
                "rate_budget_until": {"type": ["string", "null"]},
                "quarantined_reason": {"type": ["string", "null"]},
                "unhealthy_since": {"type": ["string", "null"]},
                "probes": {"type": "array", "items": {"type": "object"}},
            },
            ["name", "health_status", "breaker_state", "probes"],
        ),
    }


def _schemas() -> dict[str, Schema]:
    schemas = _model_schemas()
    schemas["InstanceConfigPatch"] = _patch_schema(schemas["InstanceConfig"])
    for part in (_error_schemas, _instance_schemas, _migration_schemas, _document_schemas, _runtime_schemas):
        schemas.update(part())
    return dict(sorted(schemas.items()))


# -- parameters and responses ----------------------------------------------------------------------------


NEXT_CURSOR: Schema = {
    "type": ["string", "null"],
    "description": "Pass as cursor for the next page; null on the last page",
}
INSTANCE_FILTERS = ("FilterModel", "FilterProvider", "FilterStatus", "FilterTag")


def _query(name: str, description: str, schema: Schema) -> Schema:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def paging_parameters() -> Schema:
    """limit, cursor and the instance filters (control_plane.api.paging)."""
    return {
        "Limit": _query(
            "limit",
            "Items per page",
            {"type": "integer", "minimum": 1, "maximum": paging.MAX_LIMIT, "default": paging.DEFAULT_LIMIT},
        ),
        "Cursor": _query(
            "cursor",
            "next_cursor of the previous page",
            {"type": "string", "minLength": 1, "maxLength": paging.MAX_CURSOR_LEN},
        ),
        "FilterModel": _query(
            "model",
            "Only instances serving this model",
            {"type": "string", "minLength": 1, "maxLength": paging.MAX_FILTER_LEN},
        ),
        "FilterProvider": _query("provider", "Only this provider type", {"enum": sorted(paging.PROVIDERS)}),
        "FilterStatus": _query(
            "status", "Operator status or health status", {"enum": sorted(paging.STATUSES)}
        ),
        "FilterTag": _query(
            "tag",
            "Only instances with this tag",
            {"type": "string", "minLength": 1, "maxLength": paging.MAX_FILTER_LEN},
        ),
    }


def _parameters() -> Schema:
    mode = {"type": "string", "enum": ["merge", "replace"], "default": "merge"}
    return {
        "InstanceName": {"name": "name", "in": "path", "required": True, "schema": _pattern(v.NAME_RE)},
        "ImportMode": {
            "name": "mode",
            "in": "query",
            "required": False,
            "description": "merge keeps instances not in the input; replace deletes them",
            "schema": mode,
        },
        "ExportFormat": {
            "name": "format",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "enum": ["json", "yaml", "legacy"], "default": "json"},
            "description": "legacy: the instance_configs.json + instance_states.json pair as one JSON object,"
            " which POST /admin/instances/migrate reads back",
        },
        **paging_parameters(),
        "Wait": {
            "name": "wait",
            "in": "query",
            "required": False,
            "description": "true: answer once nginx serves the change (read your writes); false: 202 at once",
            "schema": {"type": "string", "enum": ["true", "false", "1", "0"], "default": "true"},
        },
    }


def _json(schema: Schema) -> Schema:
    return {JSON: {"schema": schema}}


def _error(description: str, schema: str = "Error", headers: Schema | None = None) -> Schema:
    response: Schema = {"description": description, "content": _json(_ref(schema))}
    if headers:
        response["headers"] = headers
    return response


def _header(description: str, schema: Schema) -> Schema:
    return {"description": description, "required": True, "schema": schema}


def _responses() -> Schema:
    return {
        "InvalidJson": _error("The body is not valid JSON"),
        "Unauthorized": _error(
            "Missing or wrong admin key",
            headers={"WWW-Authenticate": _header("Always 'Bearer'", {"type": "string"})},
        ),
        "NotFound": _error("No such instance"),
        "Conflict": _error("Conflicts with the current registry"),
        "PayloadTooLarge": _error("The body is larger than the server accepts"),
        "UnsupportedMediaType": _error("The body's Content-Type is not accepted"),
        "InvalidInput": _error("Validation failed; nothing was changed", "ValidationError"),
        "Accepted": {
            "description": "Stored, but nginx does not serve it yet (?wait=false, or the reconcile failed: "
            "GET /admin/status); the usual answer's fields, plus these",
            "content": _json(
                {
                    "type": "object",
                    "required": ["applied", "detail"],
                    "properties": {"applied": {"const": False}, "detail": {"type": "string"}},
                }
            ),
        },
        "TooManyRequests": _error(
            "Too many failed authentications from this address",
            headers={"Retry-After": _header("Seconds until the window ends", {"type": "integer"})},
        ),
    }


# -- operations ------------------------------------------------------------------------------------------


def _ok(description: str, schema: str, status: str = "200") -> Schema:
    return {status: {"description": description, "content": _json(_ref(schema))}}


def _errors(*codes: int) -> Schema:
    names = {
        400: "InvalidJson",
        401: "Unauthorized",
        404: "NotFound",
        409: "Conflict",
        413: "PayloadTooLarge",
        415: "UnsupportedMediaType",
        422: "InvalidInput",
        429: "TooManyRequests",
    }
    return {str(code): _ref(names[code], "responses") for code in sorted({401, 429, *codes})}


def _body(schema: str, description: str | None = None) -> Schema:
    body: Schema = {"required": True, "content": _json(_ref(schema))}
    if description:
        body["description"] = description
    return body


BODY_ERRORS = (400, 413, 415, 422)


def _op(op_id: str, summary: str, responses: Schema, **extra: Any) -> Schema:
    return {"operationId": op_id, "summary": summary, "tags": ["admin"], "responses": responses, **extra}


def _name_param() -> list[Schema]:
    return [_ref("InstanceName", "parameters")]


def _instance_paths() -> Schema:
    return {
        "/admin/instances": {
            "get": _op(
                "list_instances",
                "List instances, by name, a page at a time (filters: model, provider, status, tag)",
                {**_ok("One page of instances", "InstanceList"), **_errors(422)},
                parameters=[_ref(p, "parameters") for p in ("Limit", "Cursor", *INSTANCE_FILTERS)],
            ),
            "post": _op(
                "create_instance",
                "Create an instance",
                {**_ok("Created", "Instance", "201"), **_errors(409, *BODY_ERRORS)},
                requestBody=_body("NewInstance"),
            ),
        },
        "/admin/instances/migrate": {
            "post": _op(
                "migrate_instances",
                "Import the legacy two-file format or an Ollama instance list",
                {**_ok("Imported", "MigrationResult"), **_errors(409, *BODY_ERRORS)},
                parameters=[_ref("ImportMode", "parameters")],
                requestBody=_body("MigrationRequest"),
            ),
        },
        "/admin/instances/{name}": {
            "parameters": _name_param(),
            "get": _op(
                "get_instance", "One instance", {**_ok("The instance", "Instance"), **_errors(404, 422)}
            ),
            "delete": _op(
                "delete_instance",
                "Delete an instance and its state",
                {"204": {"description": "Deleted"}, **_errors(404, 422)},
            ),
        },
    }


def _instance_detail_paths() -> Schema:
    return {
        "/admin/instances/{name}/config": {
            "parameters": _name_param(),
            "get": _op(
                "get_instance_config",
                "An instance's configuration (api_key masked)",
                {**_ok("The configuration", "InstanceConfig"), **_errors(404, 422)},
            ),
            "put": _op(
                "update_instance_config",
                "Partially update an instance's configuration",
                {**_ok("The updated configuration", "InstanceConfig"), **_errors(404, *BODY_ERRORS)},
                requestBody=_body("InstanceConfigPatch"),
            ),
        },
        "/admin/instances/{name}/check": {
            "parameters": _name_param(),
            "post": _op(
                "check_instance",
                "Probe the instance now",
                {**_ok("The probe result", "ProbeResult"), **_errors(404, 422)},
            ),
        },
        "/admin/instances/{name}/health": {
            "parameters": _name_param(),
            "get": _op(
                "get_instance_health",
                "Health verdicts and recent probe results",
                {**_ok("Health", "InstanceHealth"), **_errors(404, 422)},
            ),
        },
        "/admin/instances/{name}/state": {
            "parameters": _name_param(),
            "get": _op(
                "get_instance_state",
                "An instance's observed state",
                {**_ok("The state", "InstanceState"), **_errors(404, 422)},
            ),
            "put": _op(
                "put_instance_state",
                "Set an instance's operator status",
                {**_ok("The state", "InstanceState"), **_errors(404, *BODY_ERRORS)},
                requestBody=_body("StateUpdate"),
            ),
        },
    }


def _import_body() -> Schema:
    content = {media: {"schema": _ref("ImportDocument")} for media in (JSON, *YAML_TYPES)}
    return {"required": True, "content": content}


def _config_paths() -> Schema:
    export_content = {media: {"schema": _ref("ConfigDocument")} for media in (JSON, "application/yaml")}
    legacy_pair = _object(
        {
            name: {"type": "object", "additionalProperties": {"type": "object"}}
            for name in ("instance_configs", "instance_states")
        },
        ["instance_configs", "instance_states"],
    )
    export_content[JSON] = {"schema": {"oneOf": [_ref("ConfigDocument"), legacy_pair]}}
    return {
        "/admin/config/export": {
            "get": _op(
                "export_config",
                "Export the registry (api keys masked) as JSON or YAML",
                {"200": {"description": "The document", "content": export_content}, **_errors(422)},
                parameters=[_ref("ExportFormat", "parameters")],
            ),
        },
        "/admin/config/import": {
            "post": _op(
                "import_config",
                "Import a document exported by /admin/config/export",
                {**_ok("Imported", "ImportResult"), **_errors(409, *BODY_ERRORS)},
                parameters=[_ref("ImportMode", "parameters")],
                requestBody=_import_body(),
            ),
        },
        "/admin/routing": {
            "get": _op(
                "get_routing", "Routing configuration", {**_ok("Routing", "RoutingConfig"), **_errors()}
            ),
            "put": _op(
                "put_routing",
                "Replace the routing configuration",
                {**_ok("Routing", "RoutingConfig"), **_errors(*BODY_ERRORS)},
                requestBody=_body("RoutingConfig"),
            ),
        },
    }


def _runtime_paths() -> Schema:
    public: Schema = {"security": []}
    return {
        "/admin/status": {
            "get": _op(
                "status",
                "Controller and data-plane status; pools a page at a time (filter: model)",
                {**_ok("Status", "Status"), **_errors(422)},
                parameters=[_ref(p, "parameters") for p in ("Limit", "Cursor", "FilterModel")],
            ),
        },
        "/admin/reload": {
            "post": _op(
                "reload",
                "Render, test and reload nginx now",
                {
                    **_ok("Applied", "ReloadResult"),
                    "409": {
                        "description": "nginx rejected the candidate",
                        "content": _json(_ref("ReloadResult")),
                    },
                    **{k: val for k, val in _errors().items() if k != "409"},
                },
            ),
        },
        "/admin/health": {
            "get": _op("health", "Controller liveness", _ok("Alive", "Health"), **public),
        },
        "/admin/openapi.json": {
            "get": _op(
                "openapi",
                "This document",
                {"200": {"description": "OpenAPI 3.1", "content": _json({"type": "object"})}},
                **public,
            ),
        },
    }


def _alert_paths() -> Schema:
    alert = _object(
        {
            "id": {"type": "integer"},
            "at": {"type": "string", "format": "date-time"},
            "state": {"type": "string", "enum": ["firing", "resolved"]},
            "event": {"type": "string"},
            "subject": {"type": "string"},
            "text": {"type": "string"},
            "deliveries": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        ["id", "at", "state", "event", "subject", "text", "deliveries"],
    )
    answer = _object(
        {
            "alerts": {"type": "array", "items": alert},
            "open": {"type": "array", "items": {"type": "string"}},
            "receivers": {"type": "array", "items": {"type": "string"}},
        },
        ["alerts", "open", "receivers"],
    )
    limit = {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
    }
    return {
        "/admin/alerts": {
            "get": _op(
                "list_alerts",
                "The controller's recent alerts, newest first, with each receiver's delivery state",
                {"200": {"description": "Recent alerts", "content": _json(answer)}, **_errors(422)},
                parameters=[limit],
            ),
        },
    }


# Operations that change what nginx serves: they wait for it (control_plane/api/apply.py).
APPLYING_OPERATIONS = frozenset(
    {
        "create_instance",
        "migrate_instances",
        "delete_instance",
        "update_instance_config",
        "put_instance_state",
        "import_config",
        "put_routing",
        "create_key",
        "update_key",
        "delete_key",
    }
)


def _with_apply(paths: Schema) -> Schema:
    for item in paths.values():
        for operation in item.values():
            if isinstance(operation, dict) and operation.get("operationId") in APPLYING_OPERATIONS:
                operation["parameters"] = [*operation.get("parameters", []), _ref("Wait", "parameters")]
                operation["responses"]["202"] = _ref("Accepted", "responses")
    return paths


def build_openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document for the admin API."""
    from control_plane.api import (  # they build on the helpers above
        openapi_edge,
        openapi_routing,
        openapi_scaling,
    )

    paths: Schema = {}
    parts = (_instance_paths, _instance_detail_paths, _config_paths, _runtime_paths, openapi_edge.paths)
    for part in (*parts, openapi_scaling.paths):
        paths.update(part())
    paths.update(_alert_paths())
    paths.update(_overview_paths())
    paths.update(openapi_routing.paths())
    paths = _with_apply(paths)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ISH Gateway admin API",
            "version": "1",
            "description": "Manage LLM instances behind the gateway. Every error answer is JSON.",
        },
        "servers": [{"url": "/"}],
        "security": [{"AdminApiKey": []}, {"BearerAuth": []}],
        "tags": [{"name": "admin"}],
        "paths": paths,
        "components": {
            "schemas": dict(
                sorted(
                    {
                        **_schemas(),
                        **openapi_edge.schemas(),
                        **openapi_scaling.schemas(),
                        **openapi_routing.schemas(),
                        **_overview_schemas(),
                    }.items()
                )
            ),
            "parameters": {**_parameters(), **openapi_edge.parameters(), **openapi_scaling.parameters()},
            "responses": _responses(),
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


def _overview_paths() -> Schema:
    return {
        "/admin/overview": {
            "get": _op(
                "overview",
                "What the status page (GET /) shows, as JSON: pools, instances and why they are out, "
                "15-minute latency, requests/s, usage today, last reloads, recent alerts. Also readable "
                "with the status page's session cookie.",
                {**_ok("Overview", "Overview"), **_errors()},
            ),
        },
    }


def _overview_schemas() -> dict[str, Schema]:
    return {
        "Overview": _object(
            {
                "generated_at": {"type": "string", "format": "date-time"},
                "refresh_s": {"type": "number"},
                "window_minutes": {"type": "integer"},
                "summary": {"type": "object"},
                "pools": {"type": "array", "items": {"type": "object"}},
                "usage_today": {"type": ["object", "null"]},
                "reloads": {"type": "array", "items": {"type": "object"}},
                "alerts": {"type": ["array", "null"], "items": {"type": "object"}},
                "errors": {"type": "array", "items": {"type": "string"}},
            },
            ["generated_at", "summary", "pools", "reloads", "alerts"],
            extra=True,
        )
    }
