"""The status page's content as plain data (pure): GET / renders it, GET /admin/overview returns it as JSON
and the page's script redraws itself from that JSON.

Inputs are what the controller already holds: /admin/status's pools (reconciler.status()), the instances'
stored states, the breakers' reasons, the last 15 minutes of traffic (health.recent), today's usage
totals, the reload history and, when the controller sends alerts, the recent ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from control_plane.health.recent import MINUTES, RecentTraffic, Series
from control_plane.registry.models import InstanceState

SPARK_W = 120
SPARK_H = 28
USAGE_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd")


@dataclass(frozen=True)
class Inputs:
    status: Mapping[str, Any]  # reconciler.status()
    states: Mapping[str, InstanceState]
    enabled: Mapping[str, bool]
    breaker_reasons: Mapping[str, str | None]
    recent: RecentTraffic
    now: float  # unix seconds
    usage_today: Mapping[str, Any] | None = None  # None: usage accounting has no rows today
    reloads: Sequence[Mapping[str, Any]] = ()  # oldest first
    alerts: Sequence[Mapping[str, Any]] | None = None  # None: the controller keeps no alerts
    refresh_s: float = 5.0
    errors: Sequence[str] = field(default_factory=tuple)
    scaling: Sequence[Mapping[str, Any]] | None = None  # scaling groups (ScalingService.overview); None: none


def spark_path(values: Sequence[float | None], top: float) -> str:
    """An SVG path through ``values`` (one per minute, oldest first) scaled to [0, top]; minutes without a
    value break the line, and a lone minute is a short dash. Empty when there is nothing to draw."""
    if top <= 0:
        return ""
    step = SPARK_W / max(1, len(values) - 1)
    runs: list[list[str]] = []
    previous: float | None = None
    for index, value in enumerate(values):
        if value is not None:
            y = SPARK_H - min(value, top) / top * (SPARK_H - 2) - 1
            point = f"{index * step:.1f},{y:.1f}"
            if previous is None:
                runs.append([f"M{point}"])
            else:
                runs[-1].append(f"L{point}")
        previous = value
    return " ".join(" ".join(run) if len(run) > 1 else f"{run[0]} h-3" for run in runs)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def traffic(series: Series | None, now: float) -> dict[str, Any]:
    """requests/s, 15-minute p50/p95 and their sparklines (shared scale: the highest p95 point)."""
    minute = int(now // 60)
    if series is None:
        return {"rps": 0.0, "requests": 0, "errors": 0, "p50_ms": None, "p95_ms": None, "spark": None}
    points = series.points(minute)
    requests, p50, p95 = series.summary(minute)
    top = max((p.p95_ms or 0.0 for p in points), default=0.0)
    spark = {
        "p50": spark_path([p.p50_ms for p in points], top),
        "p95": spark_path([p.p95_ms for p in points], top),
        "top_ms": _ms(top),
    }
    return {
        "rps": round(series.rate(now), 2),
        "requests": requests,
        "errors": sum(p.errors for p in points),
        "p50_ms": _ms(p50),
        "p95_ms": _ms(p95),
        "spark": spark if top > 0 else None,
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def instance_row(pool: str, name: str, role: str, reason: str | None, inputs: Inputs) -> dict[str, Any]:
    state = inputs.states.get(name)
    row: dict[str, Any] = {
        "name": name,
        "role": role,  # "primary", "backup" or "out"
        "reason": reason,
        "enabled": inputs.enabled.get(name, True),
        "health": str(state.health_status) if state else "unknown",
        "breaker": str(state.breaker_state) if state else "closed",
        "breaker_reason": inputs.breaker_reasons.get(name),
        "rate_limited_until": _iso(state.rate_limited_until) if state else None,
        "last_error": state.last_error if state else None,
    }
    row.update(traffic(inputs.recent.instance(pool, name), inputs.now))
    return row


def pool_view(pool: Mapping[str, Any], inputs: Inputs) -> dict[str, Any]:
    name = pool["name"]
    rows = [instance_row(name, n, "primary", None, inputs) for n in pool.get("instances", ())]
    rows += [instance_row(name, n, "backup", None, inputs) for n in pool.get("backup", ())]
    rows += [instance_row(name, n, "out", why, inputs) for n, why in dict(pool.get("excluded", {})).items()]
    view: dict[str, Any] = {
        "name": pool["name"],
        "model": pool["model"],
        "family": pool["family"],
        "kind": pool["kind"],
        "strategy": pool["strategy"],
        "available": bool(pool.get("instances") or pool.get("backup")),
        "instances": rows,
    }
    view.update(traffic(inputs.recent.pool(pool["name"]), inputs.now))
    return view


def reload_row(result: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "at": result.get("at"),
        "ok": bool(result.get("ok")),
        "changed": bool(result.get("changed")),
        "generation": result.get("generation"),
        "duration_ms": result.get("duration_ms"),
        "error": result.get("error"),
    }


def usage_view(totals: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not totals or not totals.get("requests"):
        return None
    view = {name: totals.get(name, 0) for name in USAGE_FIELDS}
    view["cost_usd"] = round(float(view["cost_usd"] or 0.0), 4)
    return view


def scaling_event_row(event: Mapping[str, Any]) -> dict[str, Any]:
    """One scaling event as the page shows it: when, what, counts, outcome and why (reason or error)."""
    counts = f"{event['from']} \u2192 {event['to']}" if "from" in event and "to" in event else ""
    return {
        "at": event.get("at"),
        "direction": event.get("direction"),
        "counts": counts,
        "instance": event.get("instance"),
        "outcome": event.get("outcome"),
        "why": event.get("error") or event.get("reason") or "",
        "duration_s": event.get("duration_s"),
    }


def scaling_view(group: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": group["name"],
        "models": list(group.get("models", ())),
        "current": group["current"],
        "desired": group["desired"],
        "min": group["min"],
        "max": group["max"],
        "starting": group.get("starting", 0),
        "busy": bool(group.get("busy")),
        "evaluation": group.get("evaluation") or "",
        "events": [scaling_event_row(e) for e in group.get("events", ())],
    }


def build(inputs: Inputs) -> dict[str, Any]:
    pools = [pool_view(pool, inputs) for pool in inputs.status.get("pools", ())]
    names = {row["name"] for pool in pools for row in pool["instances"]}
    out = {row["name"] for pool in pools for row in pool["instances"] if row["role"] == "out"}
    reloads = [reload_row(r) for r in reversed(inputs.reloads)]  # newest first
    last = inputs.status.get("last_reload")
    return {
        "generated_at": datetime.fromtimestamp(inputs.now, UTC).isoformat(timespec="seconds"),
        "refresh_s": inputs.refresh_s,
        "window_minutes": MINUTES,
        "summary": {
            "pools": len(pools),
            "pools_down": sum(1 for pool in pools if not pool["available"]),
            "instances": len(names),
            "instances_out": len(out),
            "rps": round(sum(pool["rps"] for pool in pools), 2),
            "reloads": inputs.status.get("reloads", 0),
            "reload_failures": inputs.status.get("reload_failures", 0),
            "last_reload_ok": None if not isinstance(last, Mapping) else bool(last.get("ok")),
        },
        "pools": pools,
        "usage_today": usage_view(inputs.usage_today),
        "reloads": reloads,
        "alerts": None if inputs.alerts is None else [dict(alert) for alert in inputs.alerts],
        "errors": list(inputs.errors),
        "scaling": None if inputs.scaling is None else [scaling_view(g) for g in inputs.scaling],
    }
