"""OpenAPI 3.1 description of the admin API: schemas generated from the pydantic models, paths generated
from the route table (``routes.ROUTES``: each route carries its operation's description). Patterns come from
the validators so the schema states the same allow-lists the API enforces.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

from pydantic.json_schema import models_json_schema

from control_plane.api import openapi_client_keys, openapi_routing, openapi_scaling, paging
from control_plane.api.openapi_common import (
    JSON,
    NEXT_CURSOR,
    REF,
    Route,
    Schema,
    error_responses,
    json_content,
    json_object,
    nullable,
    ok_response,
    pattern_schema,
    query_param,
    ref,
)
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

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml")
SECURITY_SCHEMES: Schema = {
    "AdminApiKey": {"type": "apiKey", "in": "header", "name": "X-Admin-API-Key"},
    "BearerAuth": {"type": "http", "scheme": "bearer", "description": "The admin API key as a bearer token"},
}


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
    props["name"].update(pattern_schema(v.NAME_RE))
    secret = {"anyOf": [pattern_schema(v.SECRET_RE, empty_ok=True), pattern_schema(v.SECRET_REF_RE)]}
    props["api_key"]["anyOf"] = [secret, {"type": "null"}]
    props["api_version"]["anyOf"] = [pattern_schema(v.API_VERSION_RE, empty_ok=True), {"type": "null"}]
    props["supported_models"]["items"] = pattern_schema(v.MODEL_RE)
    props["model_deployments"]["propertyNames"] = pattern_schema(v.MODEL_RE)
    props["model_deployments"]["additionalProperties"] = pattern_schema(v.DEPLOYMENT_RE)
    props["tags"]["items"] = pattern_schema(v.TAG_RE)
    props["api_base"]["anyOf"] = [_base_url(empty_ok=True), {"type": "null"}]


def _tighten_routing(schema: Schema) -> None:
    props = schema["properties"]
    props["model_aliases"]["propertyNames"] = pattern_schema(v.MODEL_RE)
    props["model_aliases"]["additionalProperties"] = pattern_schema(v.MODEL_RE)
    props["strategies"]["propertyNames"] = pattern_schema(v.MODEL_RE)
    props["session_header"].update(pattern_schema(v.HEADER_NAME_RE))
    if "fallbacks" in props:
        props["fallbacks"]["propertyNames"] = pattern_schema(v.MODEL_RE)
        props["fallbacks"]["additionalProperties"]["items"] = pattern_schema(v.MODEL_RE)


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


def _error_schemas() -> dict[str, Schema]:
    field_error = json_object(
        {"field": {"type": "string"}, "message": {"type": "string"}}, ["field", "message"]
    )
    return {
        "Error": json_object({"error": {"type": "string"}, "detail": {"type": "string"}}, ["error"]),
        "ValidationError": json_object(
            {"error": {"const": "invalid_input"}, "detail": {"type": "array", "items": field_error}},
            ["error", "detail"],
        ),
    }


def _instance_schemas() -> dict[str, Schema]:
    item = json_object(
        {
            "name": {"type": "string"},
            "config": ref("InstanceConfig"),
            "state": ref("InstanceState"),
        },
        ["name", "config", "state"],
    )
    unmasked = {"not": {"type": "string", "pattern": r"^\*\*\*\*"}}
    return {
        "NewInstance": {
            "description": "A new instance's configuration; api_key must not be a masked value ('****...')",
            "allOf": [ref("InstanceConfig"), {"properties": {"api_key": unmasked}}],
        },
        "Instance": item,
        "InstanceList": json_object(
            {"instances": {"type": "array", "items": ref("Instance")}, "next_cursor": NEXT_CURSOR},
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
        "items": ref("OllamaInstance"),
    }
    providers = sorted({*(p.value for p in ProviderType), *importers.PROVIDER_ALIASES})
    legacy_config: Schema = {
        "type": "object",
        "description": "A legacy instance configuration; the key is the name unless 'name' is given. "
        "Lists may be comma-separated strings; unknown fields are ignored.",
        "required": ["provider_type"],
        "properties": {"provider_type": {"type": "string", "enum": providers}},
    }
    legacy = json_object(
        {
            "instance_configs": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": pattern_schema(v.NAME_RE),
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
            "oneOf": [
                legacy,
                json_object({"ollama_instances": ollama_list}, ["ollama_instances"]),
                ollama_list,
            ]
        },
        "MigrationResult": json_object(
            {"imported": {"type": "array", "items": {"type": "string"}}, "count": {"type": "integer"}},
            ["imported", "count"],
        ),
    }


def _document_schemas() -> dict[str, Schema]:
    groups = {
        "type": "array",
        "description": "Scaling groups (names unique). Their members are in instances like any instance. Left"
        " out of an export without groups; left out of an import, the groups stay as they are; in a replace"
        " import, the only groups.",
        "items": ref("ScalingGroup"),
    }
    return {
        "ConfigDocument": json_object(
            {
                "version": {"const": 1},
                "routing": ref("RoutingConfig"),
                "instances": {"type": "array", "items": ref("InstanceConfig")},
                "scaling_groups": groups,
            },
            ["version", "routing", "instances"],
        ),
        "ImportDocument": json_object(
            {
                "version": {"const": 1},
                "routing": nullable(ref("RoutingConfig")),
                "instances": {
                    "type": "array",
                    "uniqueItems": True,
                    "description": "Names must be unique. A masked api_key keeps the existing instance's key "
                    "(none for a new one).",
                    "items": ref("InstanceConfig"),
                },
                "scaling_groups": groups,
            },
            ["instances"],
        ),
        "ImportResult": json_object(
            {"imported": {"type": "integer"}, "generation": {"type": "integer"}}, ["imported", "generation"]
        ),
    }


def _runtime_schemas() -> dict[str, Schema]:
    counts = json_object({"total": {"type": "integer"}, "enabled": {"type": "integer"}}, ["total", "enabled"])
    return {
        "Status": json_object(
            {
                "generation": {"type": "integer", "description": "Configuration generation in the store"},
                "instances": counts,
                "pools": {"type": "array", "items": {"type": "object"}, "description": "One page of pools"},
                "next_cursor": NEXT_CURSOR,
                "shared_addresses": {
                    "type": "object",
                    "additionalProperties": {"type": "array", "items": {"type": "string"}},
                    "description": "Upstream addresses more than one instance has -> those instances: "
                    "answers are told apart by the pool (the model) that answered; two of them serving "
                    "the same models are named after the first",
                },
            },
            ["generation", "instances"],
            extra=True,
        ),
        "ReloadResult": json_object(
            {
                "ok": {"type": "boolean"},
                "error": {"type": ["string", "null"]},
                "phases_ms": {
                    "type": "object",
                    "additionalProperties": {"type": "number"},
                    "description": "Where the pass's time went: gather, build_spec, render, checksum, "
                    "then (the tree changed) write, nginx_t, reload, live",
                },
                "incremental": {
                    "type": "boolean",
                    "description": "The pass read only the instances' states and updated the previous "
                    "desired state (the configuration generation unchanged)",
                },
            },
            ["ok"],
            extra=True,
        ),
        "Health": json_object({"ok": {"const": True}}, ["ok"]),
        "ProbeResult": json_object(
            {
                "name": {"type": "string"},
                "outcome": {"enum": [str(o) for o in Outcome]},
                "detail": {"type": "string"},
                "latency_ms": {"type": "number"},
                "models": {"type": "array", "items": {"type": "string"}},
            },
            ["name", "outcome", "detail", "latency_ms", "models"],
        ),
        "InstanceHealth": json_object(
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


INSTANCE_FILTERS = ("FilterModel", "FilterProvider", "FilterStatus", "FilterTag")


def paging_parameters() -> Schema:
    """limit, cursor and the instance filters (control_plane.api.paging)."""
    return {
        "Limit": query_param(
            "limit",
            "Items per page",
            {"type": "integer", "minimum": 1, "maximum": paging.MAX_LIMIT, "default": paging.DEFAULT_LIMIT},
        ),
        "Cursor": query_param(
            "cursor",
            "next_cursor of the previous page",
            {"type": "string", "minLength": 1, "maxLength": paging.MAX_CURSOR_LEN},
        ),
        "FilterModel": query_param(
            "model",
            "Only instances serving this model",
            {"type": "string", "minLength": 1, "maxLength": paging.MAX_FILTER_LEN},
        ),
        "FilterProvider": query_param(
            "provider", "Only this provider type", {"enum": sorted(paging.PROVIDERS)}
        ),
        "FilterStatus": query_param(
            "status", "Operator status or health status", {"enum": sorted(paging.STATUSES)}
        ),
        "FilterTag": query_param(
            "tag",
            "Only instances with this tag",
            {"type": "string", "minLength": 1, "maxLength": paging.MAX_FILTER_LEN},
        ),
    }


def _parameters() -> Schema:
    mode = {"type": "string", "enum": ["merge", "replace"], "default": "merge"}
    return {
        "InstanceName": {"name": "name", "in": "path", "required": True, "schema": pattern_schema(v.NAME_RE)},
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


def _error(description: str, schema: str = "Error", headers: Schema | None = None) -> Schema:
    response: Schema = {"description": description, "content": json_content(ref(schema))}
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
            "content": json_content(
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


# -- the parts of operations that need more than the shared helpers ------------------------------------

INSTANCE_FILTER_PARAMS = tuple(ref(p, "parameters") for p in ("Limit", "Cursor", *INSTANCE_FILTERS))


def import_body() -> Schema:
    content = {media: {"schema": ref("ImportDocument")} for media in (JSON, *YAML_TYPES)}
    return {"required": True, "content": content}


def export_responses() -> Schema:
    content = {media: {"schema": ref("ConfigDocument")} for media in (JSON, "application/yaml")}
    legacy_pair = json_object(
        {
            name: {"type": "object", "additionalProperties": {"type": "object"}}
            for name in ("instance_configs", "instance_states")
        },
        ["instance_configs", "instance_states"],
    )
    content[JSON] = {"schema": {"oneOf": [ref("ConfigDocument"), legacy_pair]}}
    return {"200": {"description": "The document", "content": content}}


def reload_responses() -> Schema:
    rejected = {"description": "nginx rejected the candidate", "content": json_content(ref("ReloadResult"))}
    return {**ok_response("Applied", "ReloadResult"), "409": rejected}


def openapi_responses() -> Schema:
    return {"200": {"description": "OpenAPI 3.1", "content": json_content({"type": "object"})}}


def alerts_responses() -> Schema:
    alert = json_object(
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
    answer = json_object(
        {
            "alerts": {"type": "array", "items": alert},
            "open": {"type": "array", "items": {"type": "string"}},
            "receivers": {"type": "array", "items": {"type": "string"}},
        },
        ["alerts", "open", "receivers"],
    )
    return {"200": {"description": "Recent alerts", "content": json_content(answer)}}


def alerts_limit() -> Schema:
    return {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
    }


# -- paths, generated from the route table ----------------------------------------------------------------

# Path parameters by name, as aiohttp spells them in routes.ROUTES (a name may carry a regex there).
PATH_PARAMS = {"name": "InstanceName", "key_id": "KeyId"}
_PLACEHOLDER = re.compile(r"\{(\w+)(?::(?:[^{}]|\{[^{}]*\})*)?\}")  # a regex may hold {} itself


def openapi_path(path: str) -> str:
    """An aiohttp route path as an OpenAPI path: ``{name:regex}`` becomes ``{name}``."""
    return _PLACEHOLDER.sub(lambda m: "{" + m[1] + "}", path)


def _operation(route: Route) -> Schema:
    doc = route.doc
    responses = {**doc.responses, **error_responses(*doc.errors, public=doc.public)}
    params = list(doc.params)
    if doc.applies:
        params.append(ref("Wait", "parameters"))
        responses["202"] = ref("Accepted", "responses")
    operation: Schema = {"operationId": route.name, "summary": doc.summary, "tags": ["admin"]}
    operation["responses"] = responses
    if params:
        operation["parameters"] = params
    if doc.body is not None:
        operation["requestBody"] = doc.body
    if doc.public:
        operation["security"] = []
    return operation


def paths(routes: Iterable[Route]) -> Schema:
    """One path item per route path, one operation per route; path parameters on the path item."""
    items: Schema = {}
    for route in routes:
        path = openapi_path(route.path)
        if path not in items:
            names = _PLACEHOLDER.findall(route.path)
            items[path] = {"parameters": [ref(PATH_PARAMS[n], "parameters") for n in names]} if names else {}
        items[path][route.method.lower()] = _operation(route)
    return items


def build_openapi(routes: Iterable[Route]) -> dict[str, Any]:
    """The OpenAPI 3.1 document for the admin API: ``routes`` (routes.ROUTES) give the paths."""
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
        "paths": paths(routes),
        "components": {
            "schemas": dict(
                sorted(
                    {
                        **_schemas(),
                        **openapi_client_keys.schemas(),
                        **openapi_scaling.schemas(),
                        **openapi_routing.schemas(),
                        **_overview_schemas(),
                    }.items()
                )
            ),
            "parameters": {
                **_parameters(),
                **openapi_client_keys.parameters(),
                **openapi_scaling.parameters(),
            },
            "responses": _responses(),
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


def _overview_schemas() -> dict[str, Schema]:
    return {
        "Overview": json_object(
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
