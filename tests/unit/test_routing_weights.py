"""Learned routing, the pure parts: weights and tiers per strategy, hysteresis, measurement windows, and
how build_spec renders them."""

from __future__ import annotations

import dataclasses
import random
import statistics

import pytest

from control_plane.health.logstream import Attempt, LogRecord
from control_plane.providers import ApiFamily, Kind
from control_plane.registry.models import BreakerState, InstanceState, RoutingConfig, Strategy
from control_plane.render.nginx import render
from control_plane.render.spec import build_spec
from control_plane.routing import weights as lw
from control_plane.routing.measure import MIN_KEPT, Windows, per_token
from control_plane.routing.service import observations
from tests.unit.test_spec import SERVER, inst, pool_of, world

Obs = lw.Observation


def by_name(choices: tuple[lw.Choice, ...]) -> dict[str, lw.Choice]:
    return {c.name: c for c in choices}


def measured(
    name: str, p50: float | None, requests: int = 100, successes: int | None = None, **kw: object
) -> Obs:
    return Obs(name, requests, requests if successes is None else successes, p50, **kw)  # type: ignore[arg-type]


def test_least_response_time_favours_the_fastest() -> None:
    choices = by_name(lw.least_response_time([measured("a", 50), measured("b", 150), measured("c", 400)]))
    assert [choices[n].weight for n in "abc"] == [100, 11, 2]
    share = lw.shares(tuple(choices.values()))
    assert share["a"] > 0.85
    assert choices["a"].reasons[0] == "p50 50 ms over 100 requests"


def test_unmeasured_instances_count_as_the_median_and_nothing_measured_is_even() -> None:
    choices = by_name(
        lw.least_response_time([measured("a", 100), measured("b", 300), measured("new", None, 0)])
    )
    assert choices["new"].weight == round(100 * (100 / 200) ** 2)
    even = lw.least_response_time([measured("a", None, 0), measured("b", None, 0)])
    assert {c.weight for c in even} == {lw.SCALE}


def test_per_token_latency_wins_over_the_median_where_known() -> None:
    long_answers = measured("long", 2000, ms_per_token=10.0)
    short_answers = measured("short", 200, ms_per_token=40.0)
    choices = by_name(lw.least_response_time([long_answers, short_answers]))
    assert choices["long"].weight > choices["short"].weight


def test_health_based_follows_success_and_trickles_half_open() -> None:
    choices = by_name(
        lw.health_based(
            [
                measured("good", 100, 100, 100),
                measured("flaky", 100, 100, 50),
                measured("new", None, 2, 0),  # too few to judge
                measured("probing", 100, 100, 100, breaker=BreakerState.HALF_OPEN),
            ]
        )
    )
    assert choices["good"].weight == 100 and choices["new"].weight == 100
    assert choices["flaky"].weight == 6
    assert choices["probing"].weight == lw.HALF_OPEN_WEIGHT
    assert "breaker half-open: a trickle" in choices["probing"].reasons


def test_performance_based_uses_throughput_and_success() -> None:
    fast_thin = measured("a", 100, tokens_per_s=10.0)
    slow_wide = measured("b", 100, tokens_per_s=40.0)
    assert by_name(lw.performance_based([fast_thin, slow_wide]))["b"].weight == 100
    assert by_name(lw.performance_based([fast_thin, slow_wide]))["a"].weight == 6


def test_load_lowers_weight() -> None:
    choices = by_name(lw.least_response_time([measured("idle", 100), measured("busy", 100, load=1.0)]))
    assert choices["busy"].weight == 50 and "load 100%" in choices["busy"].reasons


@pytest.mark.parametrize(
    ("strategy", "key"),
    [(Strategy.COST_OPTIMIZED, "price"), (Strategy.QUALITY_BASED, "quality")],
)
def test_ranked_tiers_best_then_backup_then_out(strategy: Strategy, key: str) -> None:
    values = {"cheap": 0.1, "mid": 0.5, "mid2": 0.5, "dear": 2.0}
    if key == "quality":
        values = {n: 10 - v for n, v in values.items()}  # best quality first
    choices = by_name(lw.ranked(strategy, [Obs(n, **{key: v}) for n, v in values.items()]))  # type: ignore[arg-type]
    assert {n: c.tier for n, c in choices.items()} == {"cheap": 0, "mid": 1, "mid2": 1, "dear": None}
    assert "best tier" in choices["cheap"].reasons[0]


def test_adaptive_converges_on_the_best_reward_and_keeps_exploring() -> None:
    arms = [measured("fast", 50, 200), measured("slow", 400, 200), measured("broken", 60, 200, 100)]
    choices = lw.adaptive(arms, 0.05, lw.Reward(), "s")
    share = lw.shares(choices)
    assert share["fast"] > 0.9
    assert min(share["slow"], share["broken"]) >= 0.05 / 2 - 0.002  # explore_share spread over the rest
    assert share["slow"] + share["broken"] >= 0.05 - 0.002
    assert choices == lw.adaptive(arms, 0.05, lw.Reward(), "s")  # seeded by its inputs: pure
    # With little evidence Thompson sampling spreads traffic more.
    few = lw.shares(lw.adaptive([measured("fast", 50, 3), measured("slow", 60, 3)], 0.05, lw.Reward(), "s"))
    assert few["slow"] > 0.1


def test_explore_keeps_explore_share_off_the_best() -> None:
    assert lw.explore({"a": 100, "b": 0, "c": 0}, 0.05) == pytest.approx({"a": 0.95, "b": 0.025, "c": 0.025})
    # A tie: the last name counts as the best, the other gets the exploring share.
    assert lw.explore({"a": 50, "b": 50}, 0.1) == pytest.approx({"a": 0.55, "b": 0.45})
    assert lw.explore({"a": 7}, 0.05) == {"a": 1.0}
    assert lw.explore({"a": 0, "b": 0}, 0.0) == {"a": 0.0, "b": 0.0}


def test_adaptive_cost_weight_prefers_the_cheap() -> None:
    arms = [measured("dear", 100, 200, price=1.0), measured("cheap", 110, 200, price=0.1)]
    share = lw.shares(lw.adaptive(arms, 0.05, lw.Reward(success=1, latency=0.2, cost=3), "s"))
    assert share["cheap"] > 0.9


def test_hysteresis_ignores_noise_and_applies_real_moves() -> None:
    rng = random.Random(7)
    base = {"a": 50.0, "b": 150.0, "c": 400.0}
    first = lw.least_response_time([measured(n, v) for n, v in base.items()])
    assert lw.moved(None, first, 0.2)
    for _ in range(200):  # the p50 of a window moves a few percent under +-20 % noise per request
        noisy = lw.least_response_time([measured(n, v * rng.uniform(0.95, 1.05)) for n, v in base.items()])
        assert not lw.moved(first, noisy, 0.2)
    slowed = lw.least_response_time([measured("a", 600), measured("b", 150), measured("c", 400)])
    assert lw.moved(first, slowed, 0.2)
    assert lw.moved(first, first[:2], 0.2)  # an instance left


def test_windows_measure_per_model_and_instance() -> None:
    w = Windows(max_samples=5)
    names = {"10.0.0.1:80": "a", "10.0.0.2:80": "b"}

    def record(at: float, *attempts: Attempt, status: int = 200, model: str = "m") -> LogRecord:
        return LogRecord(at, "rid", "p", model, status, 0.1, attempts, "", "")

    for i in range(4):
        w.observe(record(100 + i, Attempt("10.0.0.1:80", 200, 100.0 + i)), names)
    w.observe(record(104, Attempt("10.0.0.2:80", 502, 5.0), Attempt("10.0.0.1:80", 200, 200.0)), names)
    w.observe(record(104, Attempt("10.0.0.2:80", 429, 5.0), Attempt("10.0.0.9:80", 200, 1.0)), names)
    w.observe(record(104, Attempt("10.0.0.2:80", None, None), status=499), names)  # the client left
    a = w.stats("m", "a", 104, 60)
    assert (a.requests, a.successes, a.p50_ms) == (5, 5, 102.0)
    b = w.stats("m", "b", 104, 60)
    assert (b.requests, b.successes, b.p50_ms) == (1, 0, None)
    # Past the horizon, the newest MIN_KEPT answers still count: thin traffic does not forget.
    assert w.stats("m", "a", 200, 60) == a
    assert w.stats("other", "a", 104, 60).requests == 0
    for i in range(10):
        w.add("m", "b", 300 + i, True, 1.0)
    assert w.stats("m", "b", 310, 60).requests == 5  # bounded


def test_windows_age_out_only_beyond_the_newest_kept_answers() -> None:
    w = Windows()
    for i in range(MIN_KEPT + 10):
        w.add("m", "a", float(i), i % 2 == 0, float(i))
    assert w.stats("m", "a", MIN_KEPT + 10.0, 1000).requests == MIN_KEPT + 10  # all within the window
    later = w.stats("m", "a", 10_000.0, 60)  # all older than the window: the newest MIN_KEPT remain
    assert (later.requests, later.successes) == (MIN_KEPT, MIN_KEPT // 2)
    assert later.p50_ms == statistics.median(float(i) for i in range(10, MIN_KEPT + 10, 2))
    for i in range(5):  # fresh answers in the window: the old ones beyond MIN_KEPT in all still go
        w.add("m", "a", 10_000.0 + i, True, 1.0)
    assert w.stats("m", "a", 10_005.0, 60).requests == MIN_KEPT
    w.forget({("m", "b")})
    assert w.stats("m", "a", 104, 60).requests == 0
    w.add("m", "a", 10_010.0, True, 1.0)  # no measured pool reads (m, a) now: no window is kept for it
    w.add("m", "b", 10_010.0, True, 1.0)
    assert w.stats("m", "a", 10_010.0, 60).requests == 0
    assert w.stats("m", "b", 10_010.0, 60).requests == 1


def test_spec_renders_measured_weights_with_least_conn() -> None:
    routing = RoutingConfig(default_strategy=Strategy.LEAST_RESPONSE_TIME)
    learned = {"m": lw.least_response_time([measured("a", 50), measured("b", 400), measured("c", 100)])}
    plain = world(inst("a"), inst("b"), inst("c"), inst("new"), routing=routing)
    assert {m.weight for m in pool_of(build_spec(plain, SERVER)).members} == {1}
    half_open = {"c": InstanceState(breaker_state=BreakerState.HALF_OPEN)}
    w = world(inst("a"), inst("b"), inst("c"), inst("new"), routing=routing, states=half_open)
    spec = build_spec(dataclasses.replace(w, learned=learned), SERVER)
    pool = pool_of(spec)
    assert {m.instance: m.weight for m in pool.members} == {"a": 100, "b": 2, "c": 1, "new": lw.SCALE}
    assert {c.name for c in pool.choices} == {"a", "b", "c"}
    text = render(spec).files["pools.conf"]
    assert "least_conn;" in text and "weight=100" in text


def test_spec_cost_optimized_tiers_and_never_an_unhealthy_cheap_instance() -> None:
    routing = RoutingConfig(strategies={"m": Strategy.COST_OPTIMIZED})
    configs = [
        inst("cheap", cost_per_1k_tokens=0.1),
        inst("mid", cost_per_1k_tokens=0.5, priority=5),
        inst("dear", cost_per_1k_tokens=2.0),
    ]
    pool = pool_of(build_spec(world(*configs, routing=routing), SERVER))
    assert [(m.instance, m.backup) for m in pool.members] == [("cheap", False), ("mid", True)]
    assert dict(pool.excluded) == {"dear": "worse tier"}
    down = {"cheap": InstanceState(health_status="unhealthy")}
    pool = pool_of(build_spec(world(*configs, routing=routing, states=down), SERVER))
    assert [(m.instance, m.backup) for m in pool.members] == [("dear", True), ("mid", False)]
    assert dict(pool.excluded)["cheap"].startswith("unhealthy")
    text = render(build_spec(world(*configs, routing=routing), SERVER)).files["pools.conf"]
    assert "backup;" in text


def test_spec_quality_based_by_quality_score() -> None:
    routing = RoutingConfig(strategies={"m": Strategy.QUALITY_BASED})
    configs = [inst("best", quality_score=90), inst("ok", quality_score=70), inst("meh", quality_score=10)]
    pool = pool_of(build_spec(world(*configs, routing=routing), SERVER), ApiFamily.OLLAMA, Kind.CHAT)
    assert [(m.instance, m.backup) for m in pool.members] == [("best", False), ("ok", True)]


def test_per_token_speed_needs_every_measured_instance_and_never_mixes_units() -> None:
    # b's answers report no usage: ms per token (a) and ms per answer (b) are not compared; p50 decides.
    mixed = by_name(lw.least_response_time([measured("a", 400, ms_per_token=4.0), measured("b", 100)]))
    assert (mixed["a"].weight, mixed["b"].weight) == (round(100 * (100 / 400) ** 2), 100)
    # an instance not measured at all yet does not stop the others being compared per token
    fresh = by_name(
        lw.least_response_time(
            [
                measured("a", 400, ms_per_token=4.0),
                measured("b", 100, ms_per_token=8.0),
                measured("c", None, 0),
            ]
        )
    )
    assert (fresh["a"].weight, fresh["b"].weight) == (100, 25)
    assert "4.0 ms per output token" in fresh["a"].reasons


def test_performance_based_long_answers_lose_on_latency_only() -> None:
    """Same tokens/s: the long answers' wait counts once (latency), not twice; slower per token: twice."""
    short = measured("short", 100, ms_per_token=10.0, tokens_per_s=100.0)
    long = measured("long", 400, ms_per_token=10.0, tokens_per_s=100.0)
    slow = measured("slow", 400, ms_per_token=40.0, tokens_per_s=25.0)
    choices = by_name(lw.performance_based([short, long, slow]))
    assert [choices[n].weight for n in ("short", "long", "slow")] == [100, 6, 1]
    assert "100 output tokens/s" in choices["long"].reasons


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        ([], (None, None)),
        ([(100.0, 10), (200.0, 10)], (None, None)),  # too few
        ([(100.0, 10), (200.0, 10), (300.0, 0)], (None, None)),  # no output tokens: left out
        ([(100.0, 10), (200.0, 10), (300.0, 10)], (20.0, 30 / 0.6)),
        ([(100.0, 1), (1000.0, 100), (40.0, 4)], (10.0, 105 / 1.14)),
        ([(0.0, 1), (0.0, 1), (0.0, 1)], (0.0, None)),  # no time measured: no rate
    ],
)
def test_per_token_figures(
    answers: list[tuple[float, int]], expected: tuple[float | None, float | None]
) -> None:
    ms, rate = per_token(answers)
    assert ms == (None if expected[0] is None else pytest.approx(expected[0]))
    assert rate == (None if expected[1] is None else pytest.approx(expected[1]))


def test_windows_give_the_tokens_to_the_attempt_that_answered() -> None:
    w = Windows()
    names = {"10.0.0.1:80": "a", "10.0.0.2:80": "b"}

    def record(at: float, *attempts: Attempt, tokens: int | None = 50) -> LogRecord:
        return LogRecord(
            at, "r", "p", "m", 200, 0.1, attempts, "", "", prompt_tokens=3, completion_tokens=tokens
        )

    for i in range(3):  # b fails, a answers 50 tokens in 500 ms: 10 ms a token, 100 tokens/s
        w.observe(
            record(100 + i, Attempt("10.0.0.2:80", 502, 5.0), Attempt("10.0.0.1:80", 200, 500.0)), names
        )
    a, b = w.stats("m", "a", 103, 60), w.stats("m", "b", 103, 60)
    assert (a.ms_per_token, a.tokens_per_s) == (10.0, 100.0)
    assert (b.requests, b.successes, b.ms_per_token, b.tokens_per_s) == (3, 0, None, None)
    for i in range(3):  # answers that reported no usage count for latency, not per token
        w.observe(record(110 + i, Attempt("10.0.0.2:80", 200, 20.0), tokens=None), names)
    b = w.stats("m", "b", 113, 60)
    assert (b.successes, b.p50_ms, b.ms_per_token) == (3, 20.0, None)


def test_observations_carry_the_per_token_figures() -> None:
    routing = RoutingConfig(default_strategy=Strategy.LEAST_RESPONSE_TIME)
    w = world(inst("a"), inst("b", api_base="http://127.0.0.1:11435"), routing=routing)
    spec = build_spec(w, SERVER)
    names = spec.address_names()
    assert sorted(names.values()) == ["a", "b"]
    windows = Windows()
    for address, name in names.items():
        for i in range(3):
            attempt = Attempt(address, 200, 100.0 if name == "a" else 400.0)
            windows.observe(
                LogRecord(10.0 + i, "r", "p", "m", 200, 0.1, (attempt,), "", "", completion_tokens=10), names
            )
    found = {o.name: o for o in observations(w, spec, windows, 13.0)["m"]}
    assert (found["a"].ms_per_token, found["a"].tokens_per_s) == (10.0, 100.0)
    assert (found["b"].ms_per_token, found["b"].tokens_per_s) == (40.0, 25.0)
