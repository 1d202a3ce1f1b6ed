"""OpenAPI parts for autoscaling (/admin/scaling/groups, /admin/scaling/events): schemas and parameters,
merged by build_openapi."""

from __future__ import annotations

from pydantic.json_schema import models_json_schema

from control_plane.api.openapi_common import REF, Schema, json_object, pattern_schema, query_param, ref
from control_plane.registry import validators as v
from control_plane.scaling.model import ScalingGroup


def schemas() -> dict[str, Schema]:
    _, top = models_json_schema([(ScalingGroup, "validation")], ref_template=REF)
    found: dict[str, Schema] = top["$defs"]
    group_view = json_object(
        {"group": ref("ScalingGroup"), "members": {}},
        ["group", "members"],
        extra=True,
    )
    found.update(
        {
            "ScalingGroupView": group_view,
            "ScalingGroupList": json_object(
                {"groups": {"type": "array", "items": ref("ScalingGroupView")}}, ["groups"]
            ),
            "ScalingEvent": json_object(
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
            "ScalingEventList": json_object(
                {"events": {"type": "array", "items": ref("ScalingEvent")}}, ["events"]
            ),
        }
    )
    return found


def parameters() -> Schema:
    return {
        "ScalingEventGroup": query_param("group", "Only this group's events", pattern_schema(v.NAME_RE)),
        "ScalingEventLimit": query_param(
            "limit", "At most this many", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}
        ),
        "ScalingEventBefore": query_param(
            "before",
            "Only events with a smaller id (paging back)",
            {"type": "integer", "minimum": 1, "maximum": 2**62},
        ),
    }
