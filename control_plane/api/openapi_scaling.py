"""OpenAPI parts for autoscaling (/admin/scaling/groups, /admin/scaling/events); merged by build_openapi."""

from __future__ import annotations

from pydantic.json_schema import models_json_schema

from control_plane.api.openapi import (
    BODY_ERRORS,
    REF,
    Schema,
    _body,
    _document_schemas,
    _errors,
    _object,
    _ok,
    _op,
    _pattern,
    _ref,
)
from control_plane.registry import validators as v
from control_plane.scaling.model import ScalingGroup


def schemas() -> dict[str, Schema]:
    _, top = models_json_schema([(ScalingGroup, "validation")], ref_template=REF)
    found: dict[str, Schema] = top["$defs"]
    group_view = _object(
        {"group": _ref("ScalingGroup"), "members": {}},
        ["group", "members"],
        extra=True,
    )
    found.update(
        {
            "ScalingGroupView": group_view,
            "ScalingGroupList": _object(
                {"groups": {"type": "array", "items": _ref("ScalingGroupView")}}, ["groups"]
            ),
            "ScalingEvent": _object(
                {
                    "id": {"type": "integer"},
                    "group": {"type": "string"},
                    "at": {"type": "string", "format": "date-time"},
                    "direction": {"type": "string", "enum": ["out", "in", "adopt", "lost"]},
                    "outcome": {"type": "string"},
                },
                ["id", "group", "at", "direction", "outcome"],
                extra=True,
            ),
            "ScalingEventList": _object(
                {"events": {"type": "array", "items": _ref("ScalingEvent")}}, ["events"]
            ),
        }
    )
    found.update(_documents_with_groups())
    return found


def _documents_with_groups() -> dict[str, Schema]:
    """The export/import document's schemas with ``scaling_groups`` (left out of an export without any; left
    out of an import: the groups stay as they are; in a replace import: the only groups)."""
    documents = _document_schemas()
    groups = {
        "type": "array",
        "description": "Scaling groups (names unique). Their members are in instances like any instance.",
        "items": _ref("ScalingGroup"),
    }
    return {
        name: {**documents[name], "properties": {**documents[name]["properties"], "scaling_groups": groups}}
        for name in ("ConfigDocument", "ImportDocument")
    }


def parameters() -> Schema:
    def query(name: str, description: str, schema: Schema) -> Schema:
        return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}

    return {
        "ScalingEventGroup": query("group", "Only this group's events", _pattern(v.NAME_RE)),
        "ScalingEventLimit": query(
            "limit", "At most this many", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}
        ),
        "ScalingEventBefore": query(
            "before",
            "Only events with a smaller id (paging back)",
            {"type": "integer", "minimum": 1, "maximum": 2**62},
        ),
    }


def paths() -> Schema:
    name = [_ref("InstanceName", "parameters")]
    return {
        "/admin/scaling/groups": {
            "get": _op(
                "list_scaling_groups", "Scaling groups", {**_ok("Groups", "ScalingGroupList"), **_errors()}
            ),
            "post": _op(
                "create_scaling_group",
                "Create a scaling group (its command must be one ISHGW_SCALING_COMMANDS allows; its docker"
                " image one ISHGW_SCALING_IMAGES allows)",
                {**_ok("Created", "ScalingGroupView", "201"), **_errors(409, *BODY_ERRORS)},
                requestBody=_body("ScalingGroup"),
            ),
        },
        "/admin/scaling/groups/{name}": {
            "parameters": name,
            "get": _op(
                "get_scaling_group",
                "One group: its members and its current evaluation (each trigger's value against its"
                " thresholds, cooldowns left, what it would do now)",
                {**_ok("The group", "ScalingGroupView"), **_errors(404, 422)},
            ),
            "put": _op(
                "replace_scaling_group",
                "Replace a scaling group (same name)",
                {**_ok("The group", "ScalingGroupView"), **_errors(404, *BODY_ERRORS)},
                requestBody=_body("ScalingGroup"),
            ),
            "delete": _op(
                "delete_scaling_group",
                "Delete a scaling group; its members are drained and stopped",
                {"204": {"description": "Deleted"}, **_errors(404, 422)},
            ),
        },
        "/admin/scaling/events": {
            "get": _op(
                "list_scaling_events",
                "Scaling events, newest first: what was measured, what was done, its outcome",
                {**_ok("Events", "ScalingEventList"), **_errors(422)},
                parameters=[
                    _ref("ScalingEventGroup", "parameters"),
                    _ref("ScalingEventLimit", "parameters"),
                    _ref("ScalingEventBefore", "parameters"),
                ],
            ),
        },
    }
