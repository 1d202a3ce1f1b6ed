"""The snapshot alerts are evaluated on: the health tracker's verdicts, the reconciler's pools and last
result, the certificate's expiry, the keys' budgets (as drained, refreshed in the background)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from control_plane.alerts.rules import BudgetView, InstanceView, PoolView, StateView
from control_plane.background import running
from control_plane.health.tracker import HealthTracker
from control_plane.reconciler import Reconciler
from control_plane.registry.client_keys import ClientKeyStore
from control_plane.registry.models import BreakerState, HealthStatus
from control_plane.registry.usage import UsageStore
from control_plane.state_metrics import certificate_expiry
from control_plane.usage.limits import period_bounds

BUDGET_REFRESH_S = 10.0


def budget_views(keys: ClientKeyStore, usage: UsageStore, now: datetime) -> tuple[BudgetView, ...]:
    """Every key with a budget: what it spent this period as drained (nginx's own count may be a drain
    interval ahead)."""
    views = []
    for key in keys.list():
        if key.max_budget_usd > 0:
            start, _ = period_bounds(key.budget_period, now)
            spent = usage.spent(key.id, start)
            views.append(BudgetView(key.id, key.name, spent, key.max_budget_usd, key.budget_period))
    return tuple(views)


class BudgetWatch:
    """The keys' budget views, read from the registry every BUDGET_REFRESH_S in a worker thread, so the
    alert evaluator (every second, on the event loop) never queries the database."""

    def __init__(self, keys: ClientKeyStore, usage: UsageStore) -> None:
        self.keys, self.usage = keys, usage
        self.current: tuple[BudgetView, ...] = ()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # the database may be briefly away: the next pass tries
                self.current = await asyncio.to_thread(budget_views, self.keys, self.usage, datetime.now(UTC))
            await asyncio.sleep(BUDGET_REFRESH_S)

    async def context(self) -> AsyncIterator[None]:
        async with running({"budget-watch": self.run()}):
            yield


def state_view(
    tracker: HealthTracker,
    reconciler: Reconciler,
    cert: str | None,
    warn_days: float,
    now: float,
    budgets: tuple[BudgetView, ...] = (),
) -> StateView:
    """Only what can raise an incident (rules.conditions): instances unhealthy, with a breaker not closed
    or quarantined, and pools without members. Evaluated every second, it must not copy and sort 10,000
    healthy instances to find none."""
    instances = tuple(
        InstanceView(name, str(e.health), str(e.breaker.state), e.breaker.reason, e.quarantined)
        for name, e in sorted(
            (n, e)
            for n, e in tracker.instances.items()
            if e.health is HealthStatus.UNHEALTHY
            or e.breaker.state is not BreakerState.CLOSED
            or e.quarantined
        )
    )
    spec = reconciler.spec
    pools = tuple(
        PoolView(p.name, str(p.family), str(p.kind), p.model, len(p.members), dict(p.excluded))
        for p in (spec.pools if spec else ())
        if not p.members
    )
    last = reconciler.last_result
    expiry = certificate_expiry(cert)
    return StateView(
        instances=instances,
        pools=pools,
        reload_error=(last.error or "unknown error") if last is not None and not last.ok else None,
        certificate_days_left=None if expiry is None else (expiry - now) / 86400,
        certificate_warn_days=warn_days,
        budgets=budgets,
    )
