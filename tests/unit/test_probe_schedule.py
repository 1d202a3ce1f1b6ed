"""The prober's schedule (control_plane/health/schedule.py): first probes spread, later ones an interval
apart, removed instances forgotten, each due instance handed out once."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from control_plane.health.schedule import FIRST_ROUND_MIN_S, JITTER, ProbeSchedule, first_round_window


def names(count: int) -> dict[str, float]:
    return {f"i{n:05d}": 10.0 for n in range(count)}


@pytest.mark.parametrize(
    ("new", "interval", "window"),
    [
        (1, 10.0, FIRST_ROUND_MIN_S),
        (50, 10.0, FIRST_ROUND_MIN_S),
        (500, 10.0, 5.0),
        (10_000, 10.0, 10.0),
        (1, 0.5, 0.5),
        (10_000, 3600.0, 100.0),
    ],
)
def test_first_round_window(new: int, interval: float, window: float) -> None:
    assert first_round_window(new, interval) == pytest.approx(window)


def test_a_few_new_instances_are_probed_within_a_second() -> None:
    schedule = ProbeSchedule(random.Random(1))
    schedule.sync(names(5), now=100.0)
    assert sorted(schedule.pop_due(100.0 + FIRST_ROUND_MIN_S)) == sorted(names(5))


def per_second(schedule: ProbeSchedule, intervals: dict[str, float], seconds: int) -> list[int]:
    """Probes started in each second, every instance rescheduled as the prober does."""
    counts = []
    for second in range(1, seconds + 1):
        due = schedule.pop_due(float(second))
        for name in due:
            schedule.started(name, float(second), intervals[name])
        counts.append(len(due))
    return counts


def test_ten_thousand_at_start_are_spread_over_the_interval_and_stay_spread() -> None:
    intervals = names(10_000)
    schedule = ProbeSchedule(random.Random(2))
    schedule.sync(intervals, now=0.0)
    counts = per_second(schedule, intervals, 60)
    assert sum(counts[:10]) == 10_000  # the whole first round within one interval
    assert max(counts) < 1_000 * 1.25  # never far above the steady rate (10,000 / 10 s): no herd
    assert min(counts[12:]) > 1_000 * 0.6  # the jitter blurs the edges of the first round a little


def test_later_probes_are_an_interval_apart() -> None:
    schedule = ProbeSchedule(random.Random(3))
    schedule.sync({"a": 10.0}, now=0.0)
    (name,) = schedule.pop_due(1.0)
    schedule.started(name, 1.0, 10.0)
    due = schedule.due_at("a")
    assert due is not None and 1.0 + 10.0 * (1 - JITTER) <= due <= 1.0 + 10.0 * (1 + JITTER)
    assert schedule.pop_due(due - 0.001) == []
    assert schedule.pop_due(due) == ["a"]


def test_removed_instances_are_forgotten_and_never_handed_out() -> None:
    schedule = ProbeSchedule(random.Random(4))
    schedule.sync(names(100), now=0.0)
    schedule.sync({"i00000": 10.0}, now=0.0)
    assert len(schedule) == 1
    assert schedule.pop_due(20.0) == ["i00000"]


def test_a_resync_keeps_existing_due_times_and_each_due_instance_comes_once() -> None:
    schedule = ProbeSchedule(random.Random(5))
    schedule.sync(names(300), now=0.0)
    before = {n: schedule.due_at(n) for n in names(300)}
    schedule.sync(names(300), now=0.5)
    assert {n: schedule.due_at(n) for n in names(300)} == before
    handed = Counter(schedule.pop_due(100.0))
    assert set(handed) == set(names(300)) and set(handed.values()) == {1}


def test_an_instance_still_in_flight_is_looked_at_again() -> None:
    schedule = ProbeSchedule(random.Random(6))
    schedule.sync({"a": 10.0}, now=0.0)
    assert schedule.pop_due(2.0) == ["a"]
    schedule.later("a", 2.25)
    assert schedule.pop_due(2.2) == []
    assert schedule.pop_due(2.25) == ["a"]


def test_churn_does_not_grow_the_heap_without_bound() -> None:
    schedule = ProbeSchedule(random.Random(7))
    for round_ in range(50):
        schedule.sync({f"r{round_}-{n}": 10.0 for n in range(100)}, now=float(round_))
    assert len(schedule) == 100
    assert len(schedule._heap) <= 2 * 100 + 64 + 100


# --- the probe history each instance keeps (health/tracker.py) -------------------------------------


def test_probe_history_keeps_the_last_ones_and_shares_repeated_details() -> None:
    from control_plane.health.probes import Outcome
    from control_plane.health.tracker import PROBE_HISTORY, ProbeHistory

    history = ProbeHistory()
    for n in range(PROBE_HISTORY + 7):
        history.add(
            1000.0 + n, Outcome.OK if n % 10 else Outcome.FAIL, f"status {200 if n % 10 else 503}", 1.5
        )
    assert len(history) == PROBE_HISTORY
    records = list(history)
    assert [at for at, *_ in records] == [1000.0 + n for n in range(7, PROBE_HISTORY + 7)]
    assert records[-1] == (1000.0 + PROBE_HISTORY + 6, Outcome.OK, "status 200", 1.5)
    assert records[3][1] is Outcome.FAIL and records[3][2] == "status 503"  # n = 10
    details = {id(detail) for _, outcome, detail, _ in records if outcome is Outcome.OK}
    assert len(details) <= 6  # one string per run between failures, not one per probe
