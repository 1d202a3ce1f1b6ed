"""OpenAPI parts for routing views (/admin/models); schemas, merged by build_openapi."""

from __future__ import annotations

from control_plane.api.openapi_common import Schema, json_object
from control_plane.providers import ApiFamily, Kind
from control_plane.registry import validators as v


def schemas() -> dict[str, Schema]:
    server = json_object(
        {
            "name": {"type": "string"},
            "source": {"type": "string", "enum": ["configured", "discovered"]},
            "available": {
                "type": "boolean",
                "description": "In a pool now (false: excluded, see /admin/status)",
            },
        },
        ["name", "source", "available"],
    )
    model = json_object(
        {"model": {"type": "string"}, "instances": {"type": "array", "items": server}}, ["model", "instances"]
    )
    return {
        "ModelList": json_object({"models": {"type": "array", "items": model}}, ["models"]),
        "SelectRequest": json_object(
            {
                "model": {"type": "string", "pattern": v.MODEL_RE.pattern},
                "api": {"type": "string", "enum": [str(f) for f in ApiFamily], "default": "openai"},
                "kind": {"type": "string", "enum": [str(k) for k in Kind], "default": "chat"},
            },
            ["model"],
        ),
        "Selection": _selection(),
    }


def _selection() -> Schema:
    share = {"type": "number", "minimum": 0, "maximum": 1}
    candidate = json_object(
        {
            "name": {"type": "string"},
            "share": {**share, "description": "Expected share of traffic while every candidate answers"},
            "tier": {"type": "integer", "description": "0 serves; 1 is nginx backup"},
            "weight": {"type": "integer"},
            "score": {"type": "number"},
            "reasons": {"type": "array", "items": {"type": "string"}},
        },
        ["name", "share", "tier", "weight", "score", "reasons"],
    )
    excluded = json_object({"name": {"type": "string"}, "reason": {"type": "string"}}, ["name", "reason"])
    return json_object(
        {
            "model": {"type": "string", "description": "The resolved model (alias, spelling, fallback)"},
            "requested": {"type": "string"},
            "fallback_from": {"type": "string"},
            "pool": {"type": "string"},
            "strategy": {"type": "string"},
            "balancer": {"type": "string"},
            "instance": {"type": ["string", "null"], "description": "The most likely next pick"},
            "candidates": {"type": "array", "items": candidate},
            "excluded": {"type": "array", "items": excluded},
        },
        ["model", "requested", "pool", "strategy", "balancer", "instance", "candidates", "excluded"],
    )
