"""Why a request would go where it goes: POST /admin/select and the pools of /admin/status. Pure: it reads
the desired spec (what nginx runs once applied), never the request path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from control_plane.providers import ApiFamily, Kind
from control_plane.registry.models import Strategy
from control_plane.render.lua_data import resolution_table
from control_plane.render.spec import GatewaySpec, Pool, pool_name
from control_plane.routing.weights import Choice

NGINX_BALANCER = {
    Strategy.ROUND_ROBIN: "round robin",
    Strategy.WEIGHTED: "weighted round robin",
    Strategy.LEAST_CONNECTIONS: "least_conn",
    Strategy.IP_HASH: "ip_hash (sticky per client address)",
    Strategy.SESSION: "consistent hash of the session header",
    Strategy.RANDOM_TWO: "random two least_conn",
    Strategy.LEAST_RESPONSE_TIME: "least_conn with weights from latency",
    Strategy.HEALTH_BASED: "weighted round robin, weights from success rates",
    Strategy.PERFORMANCE_BASED: "weighted round robin, weights from latency and throughput",
    Strategy.COST_OPTIMIZED: "cheapest tier, next price tier as backup",
    Strategy.QUALITY_BASED: "best quality_score tier, next as backup",
    Strategy.ADAPTIVE: "weighted round robin, weights from Thompson sampling",
}


def candidates(pool: Pool, fresh: tuple[Choice, ...] | None = None) -> list[dict[str, Any]]:
    """Each member: expected share of traffic while all answer (weights within the serving tier; backups
    take none until the serving tier fails), its tier, weight (what nginx runs), score and reasons (the
    latest measurements, `fresh`, where the weights service has them)."""
    serving = [m for m in pool.members if not m.backup]
    total = sum(m.weight for m in serving)
    learned = {c.name: c for c in (fresh or pool.choices)}
    out = []
    for member in pool.members:
        choice = learned.get(member.instance)
        reasons = list(choice.reasons) if choice else [f"weight {member.weight}"]
        if member.backup:
            reasons.append("backup: serves when the first tier fails")
        out.append(
            {
                "name": member.instance,
                "share": 0.0 if member.backup or not total else round(member.weight / total, 4),
                "tier": 1 if member.backup else 0,
                "weight": member.weight,
                "score": choice.score if choice else float(member.weight),
                "reasons": reasons,
            }
        )
    return sorted(out, key=lambda c: (-c["share"], c["tier"], c["name"]))


def excluded(pool: Pool) -> list[dict[str, str]]:
    return [{"name": name, "reason": reason} for name, reason in pool.excluded]


def explain_pool(pool: Pool, fresh: tuple[Choice, ...] | None = None) -> dict[str, Any]:
    found = candidates(pool, fresh)
    return {
        "model": pool.model,
        "pool": pool.name,
        "strategy": str(pool.strategy),
        "balancer": NGINX_BALANCER[pool.strategy],
        "instance": found[0]["name"] if found else None,
        "candidates": found,
        "excluded": excluded(pool),
    }


def select(
    spec: GatewaySpec,
    model: str,
    family: ApiFamily,
    kind: Kind,
    learned: Mapping[str, tuple[Choice, ...]] | None = None,
) -> dict[str, Any] | None:
    """What the request path does with a request for `model` (the same resolution table: aliases and
    Ollama's ":latest" spellings), and, when its pool has no instance, the first fallback that has one.
    None: the model is not served for this API and kind."""
    table = resolution_table(spec).get(f"{family}|{kind}", {})
    target = table.get(model)
    if target is None:
        return None
    pools = {p.name: p for p in spec.pools}
    learned = learned or {}
    base = target["model"]
    first = pools[pool_name(family, kind, base)]
    if not first.members:
        for fallback in dict(spec.fallbacks).get(base, ()):
            found = table.get(fallback)
            if found and found["pool"]:
                other = pools[found["pool"]]
                explained = explain_pool(other, learned.get(other.model))
                return {**explained, "requested": model, "fallback_from": base}
    return {**explain_pool(first, learned.get(first.model)), "requested": model}
