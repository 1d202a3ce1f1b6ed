"""Alert conditions (pure): what is wrong now, from a snapshot of the controller's state, and the events that
the difference between two snapshots makes.

An incident is a condition's key being present: it fires once when the key appears and resolves once when
it disappears, however often the state is evaluated in between (deduplication by construction).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Event names (the `event` field of every alert and of GET /admin/alerts).
INSTANCE_DOWN = "instance_down"
BREAKER_OPEN = "breaker_open"
POOL_EMPTY = "pool_without_instance"
CREDENTIAL_REJECTED = "credential_rejected"
RELOAD_FAILED = "reload_failed"
CERTIFICATE_EXPIRING = "certificate_expiring"
KEY_BUDGET = "key_budget"
# Shares of a key's budget that raise an alert (each its own incident: 80 % first, then 100 %).
BUDGET_STEPS = (0.8, 1.0)

RECOVERY_TEXT = {
    INSTANCE_DOWN: "is back",
    BREAKER_OPEN: "breaker closed",
    POOL_EMPTY: "restored",
    CREDENTIAL_REJECTED: "credential accepted again",
    RELOAD_FAILED: "reloads succeed again",
    CERTIFICATE_EXPIRING: "certificate renewed",
    KEY_BUDGET: "under the threshold again (a new period, or a larger budget)",
}


@dataclass(frozen=True)
class InstanceView:
    name: str
    health: str  # HealthStatus value
    breaker: str  # BreakerState value
    breaker_reason: str | None = None
    quarantined: str | None = None


@dataclass(frozen=True)
class PoolView:
    name: str
    family: str
    kind: str
    model: str
    members: int
    excluded: Mapping[str, str]


@dataclass(frozen=True)
class BudgetView:
    key_id: str
    key_name: str
    spent_usd: float
    max_budget_usd: float
    period: str


@dataclass(frozen=True)
class StateView:
    instances: tuple[InstanceView, ...] = ()
    pools: tuple[PoolView, ...] = ()
    reload_error: str | None = None  # the last reconcile failed, with this error
    certificate_days_left: float | None = None  # None: no certificate
    certificate_warn_days: float = 14.0
    budgets: tuple[BudgetView, ...] = ()


@dataclass(frozen=True)
class Condition:
    key: str  # the incident's identity: event + subject
    event: str
    subject: str
    text: str


def _instance_conditions(instance: InstanceView) -> Iterable[Condition]:
    name = instance.name
    if instance.health == "unhealthy":
        yield Condition(
            f"{INSTANCE_DOWN}:{name}", INSTANCE_DOWN, name, f"instance {name} is down (probes fail)"
        )
    if instance.breaker in ("open", "half_open"):
        why = f": {instance.breaker_reason}" if instance.breaker_reason else ""
        yield Condition(f"{BREAKER_OPEN}:{name}", BREAKER_OPEN, name, f"instance {name} breaker open{why}")
    if instance.quarantined:
        yield Condition(
            f"{CREDENTIAL_REJECTED}:{name}",
            CREDENTIAL_REJECTED,
            name,
            f"instance {name} quarantined: {instance.quarantined}",
        )


def _pool_condition(pool: PoolView) -> Condition | None:
    if pool.members:
        return None
    reasons = "; ".join(f"{name}: {why}" for name, why in sorted(pool.excluded.items())) or "no instance"
    subject = f"{pool.family} {pool.kind} {pool.model}"
    return Condition(
        f"{POOL_EMPTY}:{pool.name}",
        POOL_EMPTY,
        subject,
        f"pool {subject} has no available instance ({reasons})",
    )


def _budget_conditions(budget: BudgetView) -> Iterable[Condition]:
    if budget.max_budget_usd <= 0:
        return
    share = budget.spent_usd / budget.max_budget_usd
    for step in BUDGET_STEPS:
        if share >= step:
            percent = f"{step * 100:.0f} %"
            yield Condition(
                f"{KEY_BUDGET}:{budget.key_id}:{percent}",
                KEY_BUDGET,
                f"key {budget.key_name} ({budget.key_id}) at {percent}",
                f"key {budget.key_name} ({budget.key_id}) spent {budget.spent_usd:.4f} USD of its"
                f" {budget.max_budget_usd:g} USD {budget.period} budget ({share * 100:.0f} %)",
            )


def conditions(view: StateView) -> dict[str, Condition]:
    """Every incident open in this snapshot, by key."""
    found: list[Condition] = []
    for instance in view.instances:
        found.extend(_instance_conditions(instance))
    for pool in view.pools:
        condition = _pool_condition(pool)
        if condition is not None:
            found.append(condition)
    if view.reload_error is not None:
        # nginx's message stays in GET /admin/status: it may quote configuration; alerts leave the host.
        text = "configuration reload failed; nginx serves the previous configuration (GET /admin/status)"
        found.append(Condition(RELOAD_FAILED, RELOAD_FAILED, "nginx", text))
    for budget in view.budgets:
        found.extend(_budget_conditions(budget))
    days = view.certificate_days_left
    if days is not None and days < view.certificate_warn_days:
        text = "TLS certificate has expired" if days <= 0 else f"TLS certificate expires in {days:.0f} days"
        found.append(Condition(CERTIFICATE_EXPIRING, CERTIFICATE_EXPIRING, "tls", text))
    return {condition.key: condition for condition in found}


@dataclass(frozen=True)
class Transition:
    state: str  # "firing" or "resolved"
    condition: Condition

    @property
    def text(self) -> str:
        if self.state == "firing":
            return f"[ISH Gateway] FIRING {self.condition.event}: {self.condition.text}"
        recovered = RECOVERY_TEXT.get(self.condition.event, "resolved")
        return f"[ISH Gateway] RESOLVED {self.condition.event}: {self.condition.subject} {recovered}"


def transitions(before: Mapping[str, Condition], now: Mapping[str, Condition]) -> list[Transition]:
    """New incidents fire, cleared ones resolve; an incident whose text changes is still the same one."""
    fired = [Transition("firing", now[key]) for key in now if key not in before]
    resolved = [Transition("resolved", before[key]) for key in before if key not in now]
    return resolved + fired


class RateLimit:
    """A token bucket over alerts sent (clock injected): ``per_minute`` on average, bursts of ``burst``."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.tokens = float(burst)
        self.at: float | None = None

    def allow(self, now: float) -> bool:
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def backoff(attempt: int, base_s: float = 1.0, cap_s: float = 60.0) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): doubling, capped."""
    return float(min(cap_s, base_s * 2 ** (attempt - 1)))
