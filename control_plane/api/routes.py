"""The admin API's route table: every route once, with its handler and the description of its operation.
aiohttp registers it (``setup_routes``) and the OpenAPI document's paths are generated from it
(``openapi.build_openapi``), so the two cannot drift apart.

Handlers live in one module per resource (instances, documents, runtime, client_keys, usage, audit,
routing_api, scaling, alerts, status_page); what they share is in ``bodies``.
"""

from __future__ import annotations

import functools
import json

from aiohttp import web

from control_plane.api import (
    alerts,
    audit,
    client_keys,
    documents,
    instances,
    openapi_client_keys,
    routing_api,
    runtime,
    scaling,
    status_page,
    usage,
)
from control_plane.api.instances import NAME_PARAM
from control_plane.api.openapi import (
    INSTANCE_FILTER_PARAMS,
    alerts_limit,
    alerts_responses,
    build_openapi,
    export_responses,
    import_body,
    openapi_responses,
    reload_responses,
)
from control_plane.api.openapi_common import (
    BODY_ERRORS,
    NO_CONTENT,
    Operation,
    Route,
    json_body,
    ok_response,
    ref,
)

INSTANCE = f"/admin/instances/{NAME_PARAM}"
KEY = "/admin/keys/{key_id}"
GROUP = f"/admin/scaling/groups/{NAME_PARAM}"
PAGE = (ref("Limit", "parameters"), ref("Cursor", "parameters"))
MODE = (ref("ImportMode", "parameters"),)
PATH_ERRORS = (404, 422)  # a name or id in the path: malformed (422) or unknown (404)


async def openapi(_request: web.Request) -> web.Response:
    return web.Response(text=_openapi_text(), content_type="application/json")


INSTANCE_ROUTES = (
    Route(
        "GET",
        "/admin/instances",
        instances.list_instances,
        "list_instances",
        Operation(
            "List instances, by name, a page at a time (filters: model, provider, status, tag)",
            ok_response("One page of instances", "InstanceList"),
            (422,),
            params=INSTANCE_FILTER_PARAMS,
        ),
    ),
    Route(
        "POST",
        "/admin/instances",
        instances.create_instance,
        "create_instance",
        Operation(
            "Create an instance",
            ok_response("Created", "Instance", "201"),
            (409, *BODY_ERRORS),
            body=json_body("NewInstance"),
            applies=True,
        ),
    ),
    Route(
        "POST",
        "/admin/instances/migrate",
        documents.migrate,
        "migrate_instances",
        Operation(
            "Import the legacy two-file format or an Ollama instance list",
            ok_response("Imported", "MigrationResult"),
            (409, *BODY_ERRORS),
            body=json_body("MigrationRequest"),
            params=MODE,
            applies=True,
        ),
    ),
    Route(
        "GET",
        INSTANCE,
        instances.get_instance,
        "get_instance",
        Operation("One instance", ok_response("The instance", "Instance"), PATH_ERRORS),
    ),
    Route(
        "DELETE",
        INSTANCE,
        instances.delete_instance,
        "delete_instance",
        Operation("Delete an instance and its state", NO_CONTENT, PATH_ERRORS, applies=True),
    ),
    Route(
        "GET",
        f"{INSTANCE}/config",
        instances.get_config,
        "get_instance_config",
        Operation(
            "An instance's configuration (api_key masked)",
            ok_response("The configuration", "InstanceConfig"),
            PATH_ERRORS,
        ),
    ),
    Route(
        "PUT",
        f"{INSTANCE}/config",
        instances.update_config,
        "update_instance_config",
        Operation(
            "Partially update an instance's configuration",
            ok_response("The updated configuration", "InstanceConfig"),
            (404, *BODY_ERRORS),
            body=json_body("InstanceConfigPatch"),
            applies=True,
        ),
    ),
    Route(
        "GET",
        f"{INSTANCE}/state",
        instances.get_state,
        "get_instance_state",
        Operation("An instance's observed state", ok_response("The state", "InstanceState"), PATH_ERRORS),
    ),
    Route(
        "PUT",
        f"{INSTANCE}/state",
        instances.put_state,
        "put_instance_state",
        Operation(
            "Set an instance's operator status",
            ok_response("The state", "InstanceState"),
            (404, *BODY_ERRORS),
            body=json_body("StateUpdate"),
            applies=True,
        ),
    ),
    Route(
        "POST",
        f"{INSTANCE}/check",
        instances.check_instance,
        "check_instance",
        Operation(
            "Probe the instance now; with wait (the default), answer once nginx serves the verdict",
            ok_response("The probe result", "ProbeResult"),
            PATH_ERRORS,
            applies=True,
        ),
    ),
    Route(
        "GET",
        f"{INSTANCE}/health",
        instances.instance_health,
        "get_instance_health",
        Operation(
            "Health verdicts and recent probe results",
            ok_response("Health", "InstanceHealth"),
            PATH_ERRORS,
        ),
    ),
)

CONFIG_ROUTES = (
    Route(
        "GET",
        "/admin/config/export",
        documents.export_config,
        "export_config",
        Operation(
            "Export the registry (api keys masked) as JSON or YAML",
            export_responses(),
            (422,),
            params=(ref("ExportFormat", "parameters"),),
        ),
    ),
    Route(
        "POST",
        "/admin/config/import",
        documents.import_config,
        "import_config",
        Operation(
            "Import a document exported by /admin/config/export",
            ok_response("Imported", "ImportResult"),
            (409, *BODY_ERRORS),
            body=import_body(),
            params=MODE,
            applies=True,
        ),
    ),
    Route(
        "GET",
        "/admin/routing",
        routing_api.get_routing,
        "get_routing",
        Operation("Routing configuration", ok_response("Routing", "RoutingConfig")),
    ),
    Route(
        "PUT",
        "/admin/routing",
        routing_api.put_routing,
        "put_routing",
        Operation(
            "Replace the routing configuration",
            ok_response("Routing", "RoutingConfig"),
            BODY_ERRORS,
            body=json_body("RoutingConfig"),
            applies=True,
        ),
    ),
)

RUNTIME_ROUTES = (
    Route(
        "GET",
        "/admin/health",
        runtime.health,
        "health",
        Operation("Controller liveness", ok_response("Alive", "Health"), public=True),
    ),
    Route(
        "GET",
        "/admin/openapi.json",
        openapi,
        "openapi",
        Operation("This document", openapi_responses(), public=True),
    ),
    Route(
        "GET",
        "/admin/status",
        runtime.status,
        "status",
        Operation(
            "Controller and data-plane status; pools a page at a time (filter: model)",
            ok_response("Status", "Status"),
            (422,),
            params=(*PAGE, ref("FilterModel", "parameters")),
        ),
    ),
    Route(
        "POST",
        "/admin/reload",
        runtime.reload,
        "reload",
        Operation("Render, test and reload nginx now", reload_responses()),
    ),
)

KEY_ROUTES = (
    Route(
        "GET",
        "/admin/keys",
        client_keys.list_keys,
        "list_keys",
        Operation(
            "List client API keys (never the secrets), by id, a page at a time",
            ok_response("Keys", "ClientKeyList"),
            (422,),
            params=PAGE,
        ),
    ),
    Route(
        "POST",
        "/admin/keys",
        client_keys.create_key,
        "create_key",
        Operation(
            "Create a client API key; the answer holds its secret (field key), once",
            ok_response("Created", "CreatedClientKey", "201"),
            (409, *BODY_ERRORS),
            body=json_body("NewClientKey"),
            applies=True,
        ),
    ),
    Route(
        "GET",
        KEY,
        client_keys.get_key,
        "get_key",
        Operation("One client API key", ok_response("The key", "ClientKey"), PATH_ERRORS),
    ),
    Route(
        "PUT",
        KEY,
        client_keys.update_key,
        "update_key",
        Operation(
            "Change a client API key (partial)",
            ok_response("The updated key", "ClientKey"),
            (404, 409, *BODY_ERRORS),
            body=json_body("ClientKeyPatch"),
            applies=True,
        ),
    ),
    Route(
        "DELETE",
        KEY,
        client_keys.delete_key,
        "delete_key",
        Operation("Delete a client API key", NO_CONTENT, PATH_ERRORS, applies=True),
    ),
    Route(
        "GET",
        f"{KEY}/usage",
        usage.get_key_usage,
        "get_key_usage",
        Operation(
            "One client key's usage today and this month (UTC)",
            ok_response("The key's usage", "KeyUsage"),
            PATH_ERRORS,
        ),
    ),
    Route(
        "GET",
        "/admin/usage",
        usage.get_usage,
        "get_usage",
        Operation(
            "Token usage and cost summed by key, instance, model or day (whole days: day buckets, kept "
            "longest; else minute buckets)",
            openapi_client_keys.usage_responses(),
            (422,),
            params=openapi_client_keys.usage_parameters(),
        ),
    ),
    Route(
        "GET",
        "/admin/audit",
        audit.list_audit,
        "list_audit",
        Operation(
            "Changes made through this API, newest first (no secrets)",
            ok_response("Audit entries", "AuditList"),
            (422,),
            params=tuple(ref(p, "parameters") for p in ("AuditLimit", "AuditBefore", "AuditCursor")),
        ),
    ),
)

SCALING_ROUTES = (
    Route(
        "GET",
        "/admin/scaling/groups",
        scaling.list_groups,
        "list_scaling_groups",
        Operation("Scaling groups", ok_response("Groups", "ScalingGroupList")),
    ),
    Route(
        "POST",
        "/admin/scaling/groups",
        scaling.create_group,
        "create_scaling_group",
        Operation(
            "Create a scaling group (its command must be one ISHGW_SCALING_COMMANDS allows; its docker"
            " image one ISHGW_SCALING_IMAGES allows)",
            ok_response("Created", "ScalingGroupView", "201"),
            (409, *BODY_ERRORS),
            body=json_body("ScalingGroup"),
        ),
    ),
    Route(
        "GET",
        GROUP,
        scaling.get_group,
        "get_scaling_group",
        Operation(
            "One group: its members and its current evaluation (each trigger's value against its"
            " thresholds, cooldowns left, what it would do now)",
            ok_response("The group", "ScalingGroupView"),
            PATH_ERRORS,
        ),
    ),
    Route(
        "PUT",
        GROUP,
        scaling.replace_group,
        "replace_scaling_group",
        Operation(
            "Replace a scaling group (same name)",
            ok_response("The group", "ScalingGroupView"),
            (404, *BODY_ERRORS),
            body=json_body("ScalingGroup"),
        ),
    ),
    Route(
        "DELETE",
        GROUP,
        scaling.delete_group,
        "delete_scaling_group",
        Operation("Delete a scaling group; its members are drained and stopped", NO_CONTENT, PATH_ERRORS),
    ),
    Route(
        "GET",
        "/admin/scaling/events",
        scaling.list_events,
        "list_scaling_events",
        Operation(
            "Scaling events, newest first: what was measured, what was done, its outcome",
            ok_response("Events", "ScalingEventList"),
            (422,),
            params=tuple(
                ref(p, "parameters") for p in ("ScalingEventGroup", "ScalingEventLimit", "ScalingEventBefore")
            ),
        ),
    ),
)

VIEW_ROUTES = (
    Route(
        "GET",
        "/admin/alerts",
        alerts.list_alerts,
        "list_alerts",
        Operation(
            "The controller's recent alerts, newest first, with each receiver's delivery state",
            alerts_responses(),
            (422,),
            params=(alerts_limit(),),
        ),
    ),
    Route(
        "GET",
        "/admin/overview",
        status_page.overview,
        "overview",
        Operation(
            "What the status page (GET /) shows, as JSON: pools, instances and why they are out, "
            "15-minute latency, requests/s, usage today, last reloads, recent alerts. Also readable "
            "with the status page's session cookie.",
            ok_response("Overview", "Overview"),
        ),
    ),
    Route(
        "GET",
        "/admin/models",
        routing_api.list_models,
        "list_models",
        Operation(
            "Every model served, by which instances, configured or discovered",
            ok_response("Models", "ModelList"),
        ),
    ),
    Route(
        "POST",
        "/admin/select",
        routing_api.select_instance,
        "select_instance",
        Operation(
            "Where a request for a model would go now, and why",
            ok_response("The pool, its candidates and exclusions", "Selection"),
            (404, *BODY_ERRORS),
            body=json_body("SelectRequest"),
        ),
    ),
)

ROUTES: tuple[Route, ...] = (
    *RUNTIME_ROUTES,
    *INSTANCE_ROUTES,
    *CONFIG_ROUTES,
    *KEY_ROUTES,
    *SCALING_ROUTES,
    *VIEW_ROUTES,
)


@functools.cache
def _openapi_text() -> str:
    return json.dumps(build_openapi(ROUTES))


def setup_routes(app: web.Application) -> None:
    """Register every admin route on ``app``."""
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler, name=route.name)
