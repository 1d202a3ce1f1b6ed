"""Key budget alerts: the pure rule (80 % and 100 %, each one incident) and the view read from a real
registry (SQLite in memory)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import insert

from control_plane.alerts.rules import KEY_BUDGET, BudgetView, StateView, conditions, transitions
from control_plane.alerts.view import budget_views
from control_plane.registry.client_keys import ClientKeySettings, ClientKeyStore
from control_plane.registry.store import Store, usage_day
from control_plane.registry.usage import UsageStore


def budget(spent: float, limit: float = 10.0) -> StateView:
    return StateView(budgets=(BudgetView("key_1", "team-a", spent, limit, "month"),))


def test_budget_incidents_at_80_and_100_percent_each_once() -> None:
    assert conditions(budget(7.9)) == {}
    at_80 = conditions(budget(8.0))
    assert [c.event for c in at_80.values()] == [KEY_BUDGET]
    assert "spent 8.0000 USD of its 10 USD month budget (80 %)" in next(iter(at_80.values())).text
    at_100 = conditions(budget(10.5))
    assert len(at_100) == 2
    fired = transitions(at_80, at_100)
    assert [(t.state, t.condition.subject) for t in fired] == [("firing", "key team-a (key_1) at 100 %")]
    assert transitions(at_100, conditions(budget(11.0))) == []  # still over: no new alert
    cleared = transitions(at_100, conditions(budget(0.0)))  # a new period
    assert sorted(t.state for t in cleared) == ["resolved", "resolved"]
    assert conditions(budget(5.0, limit=0.0)) == {}  # no budget


def test_budget_views_read_the_drained_spend_of_the_period() -> None:
    store = Store("sqlite://")
    store.migrate()
    keys = ClientKeyStore(store)
    budgeted, _ = keys.create(ClientKeySettings(name="team-a", max_budget_usd=2.0, budget_period="day"))
    keys.create(ClientKeySettings(name="free"))
    now = datetime(2026, 11, 30, 12, tzinfo=UTC)
    today, yesterday = int(now.timestamp()) // 86400 * 86400, int(now.timestamp()) // 86400 * 86400 - 86400
    row = {"instance": "i", "model": "m", "requests": 1, "prompt_tokens": 1, "completion_tokens": 1}
    with store._write() as conn:
        conn.execute(
            insert(usage_day),
            [
                {**row, "start": today, "key_id": budgeted.id, "estimated_requests": 0, "cost_usd": 1.7},
                {**row, "start": yesterday, "key_id": budgeted.id, "estimated_requests": 0, "cost_usd": 5.0},
            ],
        )
    views = budget_views(keys, UsageStore(store), now)
    assert views == (BudgetView(budgeted.id, "team-a", 1.7, 2.0, "day"),)
    assert [c.subject for c in conditions(StateView(budgets=views)).values()] == [
        f"key team-a ({budgeted.id}) at 80 %"
    ]
    store.close()
