"""The snapshot alerts are evaluated on: the health tracker's verdicts, the reconciler's pools and last
result, the certificate's expiry."""

from __future__ import annotations

from control_plane.alerts.rules import InstanceView, PoolView, StateView
from control_plane.health.tracker import HealthTracker
from control_plane.reconciler import Reconciler
from control_plane.state_metrics import certificate_expiry


def state_view(
    tracker: HealthTracker, reconciler: Reconciler, cert: str | None, warn_days: float, now: float
) -> StateView:
    instances = tuple(
        InstanceView(name, str(e.health), str(e.breaker.state), e.breaker.reason, e.quarantined)
        for name, e in sorted(tracker.instances.items())
    )
    spec = reconciler.spec
    pools = tuple(
        PoolView(p.name, str(p.family), str(p.kind), p.model, len(p.members), dict(p.excluded))
        for p in (spec.pools if spec else ())
    )
    last = reconciler.last_result
    expiry = certificate_expiry(cert)
    return StateView(
        instances=instances,
        pools=pools,
        reload_error=(last.error or "unknown error") if last is not None and not last.ok else None,
        certificate_days_left=None if expiry is None else (expiry - now) / 86400,
        certificate_warn_days=warn_days,
    )
