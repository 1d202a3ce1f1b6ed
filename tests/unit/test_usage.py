"""Usage accounting's pure parts (control_plane/usage/model.py, the /admin/usage query): batches, buckets,
cost, answer rows, CSV, the time range."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from control_plane.api.usage import parse_query
from control_plane.errors import InvalidInput
from control_plane.registry.models import InstanceConfig
from control_plane.usage.model import (
    DAY_S,
    MINUTE_S,
    BadBatch,
    Rates,
    UsageQuery,
    answer_row,
    buckets,
    csv_text,
    parse_batch,
    rates_of,
)

DAY = 1_796_083_200  # 2026-12-01T00:00:00Z


def test_a_batch_is_parsed_strictly() -> None:
    batch = parse_batch({"id": "ab-1", "rows": [[DAY + 60, "k", "i", "m", 1, 2, 3, 0]]})
    assert batch.id == "ab-1" and batch.rows[0].prompt_tokens == 2 and batch.rows[0].minute == DAY + 60
    assert parse_batch({"id": None, "rows": {}}).rows == ()  # cjson's empty array
    for bad in [
        [],
        {"id": "x"},
        {"id": 5, "rows": []},
        {"id": "x", "rows": [[DAY + 1, "k", "i", "m", 1, 2, 3, 0]]},  # not a minute
        {"id": "x", "rows": [[DAY, "k", "i", "m", -1, 2, 3, 0]]},
        {"id": "x", "rows": [[DAY, "k", "i", "m", 1.5, 2, 3, 0]]},
        {"id": "x", "rows": [[DAY, "k", "i", "m", True, 2, 3, 0]]},
        {"id": "x", "rows": [[DAY, 7, "i", "m", 1, 2, 3, 0]]},
        {"id": "x", "rows": [[DAY, "k", "i", "m", 1, 2, 3]]},
    ]:
        with pytest.raises(BadBatch):
            parse_batch(bad)


def test_rates_fall_back_to_cost_per_1k_tokens() -> None:
    base: dict[str, Any] = {"name": "a", "provider_type": "openai"}
    assert rates_of(InstanceConfig(**base)) == Rates(0.0, 0.0)
    assert rates_of(InstanceConfig(**base, cost_per_1k_tokens=2)) == Rates(2.0, 2.0)
    free_input = InstanceConfig(**base, cost_per_1k_tokens=2, input_cost_per_1k_tokens=0)
    assert rates_of(free_input) == Rates(0.0, 2.0)
    both = InstanceConfig(**base, input_cost_per_1k_tokens=3, output_cost_per_1k_tokens=15)
    assert rates_of(both).cost(1000, 2000) == pytest.approx(33.0)


def test_buckets_sum_minutes_into_days_with_their_cost() -> None:
    rows = parse_batch(
        {
            "id": "b",
            "rows": [
                [DAY, "k", "a", "m", 1, 10, 20, 0],
                [DAY + 60, "k", "a", "m", 2, 30, 40, 1],
                [DAY + DAY_S, "k", "a", "m", 1, 1, 1, 0],
                [DAY, "k", "unknown", "m", 1, 1000, 1000, 0],
            ],
        }
    ).rows
    rates = {"a": Rates(1.0, 2.0)}
    minutes = buckets(rows, rates, MINUTE_S)
    assert len(minutes) == 4
    days = {(b.start, b.instance): b for b in buckets(rows, rates, DAY_S)}
    first = days[(DAY, "a")]
    summed = (first.requests, first.prompt_tokens, first.completion_tokens, first.estimated_requests)
    assert summed == (3, 40, 60, 1)
    assert first.cost_usd == pytest.approx((40 * 1.0 + 60 * 2.0) / 1000)
    assert days[(DAY + DAY_S, "a")].requests == 1
    assert days[(DAY, "unknown")].cost_usd == 0.0


def test_answer_rows_name_only_the_grouped_dimensions() -> None:
    values = {
        "key": "k1",
        "instance": "a",
        "model": "m",
        "day": DAY,
        "requests": 2,
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "cost_usd": 0.5,
        "estimated_requests": 1,
    }
    row = answer_row(("key", "day"), values, {"k1": "app"})
    assert row == {
        "key": "k1",
        "key_name": "app",
        "instance": None,
        "model": None,
        "day": "2026-12-01",
        "requests": 2,
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "cost_usd": 0.5,
        "estimated_requests": 1,
    }
    anonymous = answer_row(("key",), {**values, "key": ""}, {})
    assert anonymous["key"] is None and anonymous["key_name"] is None and "day" not in anonymous
    text = csv_text([row, anonymous])
    assert text.splitlines() == [
        "key,key_name,instance,model,day,requests,prompt_tokens,completion_tokens,total_tokens,cost_usd,"
        "estimated_requests",
        "k1,app,,,2026-12-01,2,3,4,7,0.5,1",
        ",,,,,2,3,4,7,0.5,1",
    ]


def _query(qs: str) -> UsageQuery:
    now = datetime(2026, 12, 1, 15, tzinfo=UTC)
    return parse_query(make_mocked_request("GET", f"/admin/usage?{qs}"), now)


def test_the_time_range_defaults_to_30_whole_days_and_dates_are_whole_days() -> None:
    default = _query("")
    assert (default.start, default.end, default.group_by) == (DAY + DAY_S - 30 * DAY_S, DAY + DAY_S, ("key",))
    assert default.by_day
    days = _query("from=2026-12-01&to=2026-12-01&group_by=model,day,model")
    assert (days.start, days.end, days.group_by) == (DAY, DAY + DAY_S, ("model", "day"))
    minutes = _query("from=2026-12-01T10:00:30&to=2026-12-01T12:00:00%2B01:00&key=key_0123456789abcdef")
    assert (minutes.start, minutes.end, minutes.by_day) == (DAY + 10 * 3600, DAY + 11 * 3600, False)
    assert minutes.key == "key_0123456789abcdef"
    # An empty or reversed range is no error (no rows); the ends of the calendar are kept within 1970-9999.
    reversed_range = _query("from=2026-12-03&to=2026-12-01")
    assert reversed_range.start > reversed_range.end
    edges = _query("from=0001-01-01&to=9999-12-31")
    assert (edges.start, edges.end) == (0, 253_402_300_740)
    for bad in (
        "from=yesterday",
        "group_by=colour",
        "group_by=",
        "instance=../x",
        "model=a%20b",
        "key=nope!",
    ):
        with pytest.raises(InvalidInput):
            _query(bad)
