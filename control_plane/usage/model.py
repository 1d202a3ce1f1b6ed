"""Usage accounting, the pure parts: a drained batch, buckets, cost, the rows /admin/usage answers.

nginx counts (nginx/lua/gw/tally.lua) per (minute, key id, instance, model); the controller drains the
counters in batches (control_plane/usage/drain.py) and stores them per minute and per day
(control_plane/registry/usage.py), with the cost of the instance at the time of writing.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from control_plane.registry.models import InstanceConfig

MINUTE_S = 60
DAY_S = 86_400
GROUPS = ("key", "instance", "model", "day")
TOTALS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "estimated_requests",
)
CSV_FIELDS = ("key", "key_name", "instance", "model", "day", *TOTALS)
_MAX_COUNT = 2**53  # what Lua's numbers hold exactly


class BadBatch(ValueError):
    """The drain answered something that is not a batch (never expected from gw.tally)."""


@dataclass(frozen=True)
class Counts:
    """One (minute, key, instance, model) of a batch. key "" is an anonymous client."""

    minute: int
    key: str
    instance: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    estimated_requests: int


@dataclass(frozen=True)
class Batch:
    id: str | None
    rows: tuple[Counts, ...]


@dataclass(frozen=True)
class Rates:
    """USD per 1,000 tokens."""

    prompt: float = 0.0
    completion: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1000.0


def rates_of(config: InstanceConfig) -> Rates:
    """input/output_cost_per_1k_tokens, each cost_per_1k_tokens when unset."""
    both = config.cost_per_1k_tokens
    prompt = config.input_cost_per_1k_tokens
    completion = config.output_cost_per_1k_tokens
    return Rates(both if prompt is None else prompt, both if completion is None else completion)


def _count(value: Any) -> int:
    if type(value) is not int or not 0 <= value < _MAX_COUNT:
        raise BadBatch(f"not a count: {value!r}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 255:
        raise BadBatch(f"not a name: {value!r}")
    return value


def _counts(row: Any) -> Counts:
    if not isinstance(row, list) or len(row) != 8:
        raise BadBatch(f"not a row: {row!r}")
    minute = _count(row[0])
    if minute % MINUTE_S:
        raise BadBatch(f"not a minute: {minute}")
    return Counts(minute, _text(row[1]), _text(row[2]), _text(row[3]), *(_count(v) for v in row[4:]))


def parse_batch(data: Any) -> Batch:
    """gw.tally's {"id": ..., "rows": [[minute, key, instance, model, r, p, c, e], ...]}."""
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list | dict):
        raise BadBatch("not a batch")
    batch_id = data.get("id")
    if batch_id is not None and (not isinstance(batch_id, str) or not 0 < len(batch_id) <= 64):
        raise BadBatch(f"not a batch id: {batch_id!r}")
    rows = data["rows"] if isinstance(data["rows"], list) else []  # cjson writes an empty array as {}
    return Batch(batch_id, tuple(_counts(row) for row in rows))


def day_of(t: int) -> int:
    return t - t % DAY_S


def day_text(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).date().isoformat()


@dataclass(frozen=True)
class Bucket:
    """What one registry row adds: per (start, key, instance, model)."""

    start: int
    key: str
    instance: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    estimated_requests: int
    cost_usd: float


def buckets(rows: tuple[Counts, ...], rates: dict[str, Rates], size: int) -> list[Bucket]:
    """The batch's rows summed into buckets of `size` seconds (a minute, a day), each with its cost at the
    rates of its instance (none known: 0)."""
    sums: dict[tuple[int, str, str, str], list[int]] = {}
    for row in rows:
        bucket = (row.minute - row.minute % size, row.key, row.instance, row.model)
        total = sums.setdefault(bucket, [0, 0, 0, 0])
        total[0] += row.requests
        total[1] += row.prompt_tokens
        total[2] += row.completion_tokens
        total[3] += row.estimated_requests
    out = []
    for (start, key, instance, model), (req, prompt, completion, estimated) in sums.items():
        cost = rates.get(instance, Rates()).cost(prompt, completion)
        out.append(Bucket(start, key, instance, model, req, prompt, completion, estimated, cost))
    return out


@dataclass(frozen=True)
class UsageQuery:
    """GET /admin/usage: [start, end) in seconds, the dimensions to group by, filters."""

    start: int
    end: int
    group_by: tuple[str, ...] = ("key",)
    key: str | None = None
    instance: str | None = None
    model: str | None = None

    @property
    def by_day(self) -> bool:
        """Whole days: the day buckets answer (kept longer); else the minute buckets."""
        return self.start % DAY_S == 0 and self.end % DAY_S == 0


def answer_row(
    group_by: tuple[str, ...], values: dict[str, Any], key_names: dict[str, str]
) -> dict[str, Any]:
    """One row of the answer: every dimension (null when not grouped by it), then the totals."""
    key = values.get("key")
    row: dict[str, Any] = {
        "key": (key or None) if "key" in group_by else None,
        "key_name": key_names.get(key) if "key" in group_by and key else None,
        "instance": values.get("instance") if "instance" in group_by else None,
        "model": values.get("model") if "model" in group_by else None,
    }
    if "day" in group_by:
        row["day"] = day_text(int(values["day"]))
    prompt, completion = int(values["prompt_tokens"] or 0), int(values["completion_tokens"] or 0)
    row.update(
        requests=int(values["requests"] or 0),
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cost_usd=round(float(values["cost_usd"] or 0.0), 10),
        estimated_requests=int(values["estimated_requests"] or 0),
    )
    return row


def csv_text(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({name: "" if row.get(name) is None else row.get(name) for name in CSV_FIELDS})
    return out.getvalue()
