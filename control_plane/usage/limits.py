"""Key budgets across nginx restarts: the seed file gw.limits reads at every (re)load.

nginx counts each budgeted key's spend of its current period in shared memory (nginx/lua/gw/limits.lua),
which survives reloads but not a restart of nginx. Before every (re)load the controller writes, per
budgeted key, what the registry holds of its spend this period (the drained usage, day buckets) into
<prefix>/budget-seed.json; gw.limits' init raises the key's counter to that figure when it holds less.
The counter holds what this nginx counted since its shared memory was made, the registry what was
drained from any nginx: each is a part of the truth, so the larger of the two never counts a request twice.
What a restarted nginx had counted and not yet drained is lost (as for the usage itself: at most one
drain interval, ISHGW_USAGE_DRAIN_INTERVAL_S).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from control_plane.registry.usage import UsageStore
from control_plane.render.client_access import RenderedKey
from control_plane.render.lua_data import BUDGET_SEED_FILE
from control_plane.render.spec import GatewaySpec
from control_plane.usage.model import DAY_S


def period_bounds(period: str, now: datetime) -> tuple[int, int | None]:
    """The start and end (None: never) of the budget period `now` is in, in Unix seconds (UTC)."""
    now = now.astimezone(UTC)
    if period == "day":
        start = int(now.timestamp()) // DAY_S * DAY_S
        return start, start + DAY_S
    if period == "month":
        first = datetime(now.year, now.month, 1, tzinfo=UTC)
        following = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
        return int(first.timestamp()), int(following.timestamp())
    return 0, None


def budget_seeds(usage: UsageStore, keys: Iterable[RenderedKey], now: datetime) -> dict[str, Any]:
    """Per budgeted key: {period, start, spent} as gw.limits.seed_counters reads it."""
    seeds: dict[str, Any] = {}
    for key in keys:
        if key.enabled and key.budget_usd > 0:
            start, _ = period_bounds(key.budget_period, now)
            seeds[key.id] = {"period": key.budget_period, "start": start, "spent": usage.spent(key.id, start)}
    return seeds


def seed_path(spec: GatewaySpec) -> Path:
    return Path(spec.server.prefix) / BUDGET_SEED_FILE


def write_budget_seed(usage: UsageStore, spec: GatewaySpec, now: datetime) -> None:
    """Write the seed file for the configuration about to be loaded (atomically: a temp file, replaced)."""
    path = seed_path(spec)
    text = json.dumps(budget_seeds(usage, spec.access.keys, now), sort_keys=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.replace(temp, path)
