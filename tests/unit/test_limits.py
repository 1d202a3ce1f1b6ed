"""Issue 12, limits: the pure parts in Python (keys' limit fields, what clients.json carries for gw.limits,
the budget seed, the instances' max_rpm / max_tpm measure in the health tracker)."""

from __future__ import annotations

import json
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from control_plane.health.tracker import HealthTracker, rpm_free_at, tpm_wait
from control_plane.registry.client_keys import ClientKey, ClientKeySettings
from control_plane.registry.models import InstanceConfig, InstanceState, RoutingConfig
from control_plane.registry.store import Store
from control_plane.registry.usage import UsageStore
from control_plane.render.lua_data import clients_data, limits_data
from control_plane.render.spec import ServerSettings, World, build_spec
from control_plane.usage.limits import budget_seeds, period_bounds, write_budget_seed
from control_plane.usage.model import Batch, Counts
from tests.unit.test_health import config, record, tracker_with

NOW = datetime(2026, 11, 30, 17, 0, tzinfo=UTC)


def _key(name: str, **settings: object) -> ClientKey:
    return ClientKey(
        **ClientKeySettings(name=name, **settings).model_dump(),
        id=f"key_{name:0>16}"[:20],
        key_hash="0" * 64,
        key_prefix="ishgw-xxxx",
        key_last4="xxxx",
        created_at=NOW,
        updated_at=NOW,
    )


def _spec(keys: list[ClientKey], instances: list[InstanceConfig], prefix: str = "/srv/ishgw/nginx"):  # type: ignore[no-untyped-def]
    world = World(
        instances=tuple((c, InstanceState()) for c in instances),
        routing=RoutingConfig(),
        now=NOW,
        addresses={"127.0.0.1": ("127.0.0.1",)},
        client_keys=tuple(keys),
    )
    return build_spec(world, ServerSettings(prefix=prefix, run_dir="/srv/ishgw/run"))


def test_key_limit_fields_are_validated() -> None:
    assert ClientKeySettings(name="k").budget_period == "month"
    assert ClientKeySettings(name="k").max_budget_usd == 0
    for bad in (
        {"budget_period": "week"},
        {"max_budget_usd": -1},
        {"max_budget_usd": "lots"},
        {"tpm_limit": -5},
    ):
        with pytest.raises(ValidationError) as exc:
            ClientKeySettings(name="k", **bad)
        assert next(iter(bad)) in str(exc.value)


def test_clients_data_carries_the_limits_only_when_some_key_has_one() -> None:
    chat = InstanceConfig(
        name="chat",
        provider_type="ollama",
        api_base="http://127.0.0.1:1",
        supported_models=["m"],
        input_cost_per_1k_tokens=0.5,
        output_cost_per_1k_tokens=1.5,
    )
    free = InstanceConfig(
        name="free", provider_type="ollama", api_base="http://127.0.0.1:2", supported_models=["m"]
    )
    plain = _key("plain")
    spec = _spec([plain], [chat, free])
    assert limits_data(spec) is None and not spec.access.token_limits
    assert "limits" not in clients_data(spec.access, limits_data(spec))

    tpm, budget = _key("tpm", tpm_limit=1000), _key("budget", max_budget_usd=2.5, budget_period="day")
    off = _key("off", tpm_limit=5, enabled=False)
    spec = _spec([plain, tpm, budget, off], [chat, free])
    assert spec.access.token_limits
    data = clients_data(spec.access, limits_data(spec))["limits"]
    assert data == {
        "keys": {tpm.id: {"tpm": 1000}, budget.id: {"budget": 2.5, "period": "day"}},
        "prices": {"chat": [0.5, 1.5]},
        "seed_file": "/srv/ishgw/nginx/budget-seed.json",
    }


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("day", NOW, datetime(2026, 11, 30, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
        ("month", NOW, datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
        (
            "month",
            datetime(2026, 12, 31, 23, 59, tzinfo=UTC),
            datetime(2026, 12, 1, tzinfo=UTC),
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
        ("total", NOW, datetime(1970, 1, 1, tzinfo=UTC), None),
    ],
)
def test_period_bounds(period: str, now: datetime, start: datetime, end: datetime | None) -> None:
    assert period_bounds(period, now) == (int(start.timestamp()), int(end.timestamp()) if end else None)


def test_the_seed_is_each_budgeted_keys_drained_spend_this_period(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    store.migrate()
    try:
        chat = InstanceConfig(
            name="chat",
            provider_type="ollama",
            api_base="http://127.0.0.1:1",
            supported_models=["m"],
            cost_per_1k_tokens=1.0,
        )
        store.create_instance(chat)
        day, month = _key("day", max_budget_usd=1, budget_period="day"), _key("month", max_budget_usd=1)
        usage = UsageStore(store)
        today = int(NOW.timestamp()) // 60 * 60
        rows = (
            Counts(today, day.id, "chat", "m", 1, 100, 0, 0),  # $0.1 today
            Counts(today - 86400, day.id, "chat", "m", 1, 200, 0, 0),  # $0.2 yesterday: another day
            Counts(today - 86400, month.id, "chat", "m", 1, 300, 0, 0),  # $0.3 this month
            Counts(today, "", "chat", "m", 1, 999, 0, 0),  # anonymous
        )
        assert usage.record(Batch("b1", rows), NOW)
        spec = _spec([day, month, _key("none")], [chat], prefix=str(tmp_path))
        seeds = budget_seeds(usage, spec.access.keys, NOW)
        assert seeds == {
            day.id: {
                "period": "day",
                "start": int(datetime(2026, 11, 30, tzinfo=UTC).timestamp()),
                "spent": pytest.approx(0.1),
            },
            month.id: {
                "period": "month",
                "start": int(datetime(2026, 11, 1, tzinfo=UTC).timestamp()),
                "spent": pytest.approx(0.3),
            },
        }
        write_budget_seed(usage, spec, NOW)
        path = tmp_path / "budget-seed.json"
        assert json.loads(path.read_text()) == seeds
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        store.close()


def test_rpm_free_at() -> None:
    per_second = deque([[100, 3], [110, 2], [130, 5]])
    assert rpm_free_at(per_second, 140, 11) is None  # 10 in the window
    assert rpm_free_at(per_second, 140, 10) == 160  # the 3 of second 100 leave at 160: 7 left
    assert rpm_free_at(per_second, 140, 6) == 170  # then the 2 of second 110: 5 left
    assert rpm_free_at(per_second, 165, 6) == 170  # second 100 is out already: 7 in the window
    assert rpm_free_at(per_second, 140, 1) == 190


@given(st.integers(0, 5000), st.integers(0, 5000), st.floats(0, 59.9), st.integers(1, 3000))
def test_tpm_wait_is_just_enough(prev: int, cur: int, elapsed: float, limit: int) -> None:
    wait = tpm_wait(prev, cur, elapsed, limit)

    def used(t: float) -> float:  # the measure at t seconds after the current minute's start
        return cur + prev * (60 - t) / 60 if t < 60 else cur * (120 - t) / 60

    if used(elapsed) < limit:
        assert wait == 0
    else:
        assert used(elapsed + wait) < limit
        assert used(elapsed + wait - 0.01) >= limit - 1e-6 or elapsed + wait - 0.01 < elapsed


def test_an_instance_at_max_rpm_leaves_its_pools_until_the_window_frees() -> None:
    t = tracker_with(config("a", max_rpm=3), config("b"))
    for at in (1000.0, 1001.0):
        t.observe(record("127.0.0.0:1", 200, at=at), now_mono=1)
    assert not t.membership_changed and t.state_fields("a", 1001, 1)["rate_budget_until"] is None
    t.observe(record("127.0.0.0:1", 200, at=1002.0), now_mono=1)
    assert t.membership_changed
    assert t.state_fields("a", 1002, 1)["rate_budget_until"] == datetime.fromtimestamp(1060, UTC)
    for _ in range(5):
        t.observe(record("127.0.0.1:1", 200, at=1002.0), now_mono=1)  # b has no max_rpm
    assert t.state_fields("b", 1002, 1)["rate_budget_until"] is None
    t.membership_changed = False
    t.tick(now_mono=2, now_wall=1059)
    assert not t.membership_changed
    t.tick(now_mono=3, now_wall=1060)
    assert t.membership_changed and t.state_fields("a", 1060, 3)["rate_budget_until"] is None


def test_an_instance_at_max_tpm_leaves_its_pools_from_the_drained_usage() -> None:
    t = tracker_with(config("a", max_tpm=1000))
    t.add_tokens("a", 960, 600, now_wall=970)
    assert not t.membership_changed
    t.add_tokens("a", 960, 500, now_wall=975)  # 1,100 this minute: free 45 s to the turn + 5.5 s
    assert t.membership_changed
    until = t.state_fields("a", 975, 1)["rate_budget_until"]
    assert isinstance(until, datetime) and until.timestamp() == pytest.approx(
        1020 + 60 * (1 - 1000 / 1100), abs=0.01
    )
    t.add_tokens("nobody", 960, 5000, now_wall=975)  # an instance the tracker does not know: nothing


def test_a_restarted_controller_keeps_the_rate_budget() -> None:
    t = HealthTracker()
    state = InstanceState(rate_budget_until=datetime.fromtimestamp(1060, UTC))
    t.sync([(config("a", max_rpm=3), state)], {"127.0.0.0:1": "a"}, 0, 1000)
    assert t.state_fields("a", 1000, 0)["rate_budget_until"] == datetime.fromtimestamp(1060, UTC)


def test_keys_with_limits_are_counted_even_with_usage_accounting_off() -> None:
    from control_plane.render.nginx import render

    chat = InstanceConfig(
        name="chat", provider_type="ollama", api_base="http://127.0.0.1:1", supported_models=["m"]
    )
    plain = render(_spec([_key("plain")], [chat])).files["servers.conf"]
    limited = render(_spec([_key("tpm", tpm_limit=10)], [chat])).files["servers.conf"]
    assert "counted(" not in plain
    assert "log_by_lua_block { gw_gateway.counted(" in limited
