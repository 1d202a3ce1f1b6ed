"""What a scaling group should do now, from what was measured. Pure: the clock and the samples come in.

measure() turns a window of upstream attempts into the triggers' values; decide() weighs them against the
group's thresholds, sustain time and cooldowns, and returns the decision with every value it used (the
event and GET /admin/scaling/groups/{name} show them) and the memory the next evaluation starts from.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from control_plane.routing.load import prometheus_sums
from control_plane.scaling.model import ScalingGroup

QUEUE_METRIC = "vllm:num_requests_waiting"

Direction = Literal["out", "in", "hold"]


@dataclass(frozen=True)
class Sample:
    """One upstream attempt on a member, as the access-log stream reported it."""

    at: float  # unix seconds, when it ended
    duration_ms: float
    ok: bool


@dataclass(frozen=True)
class Signals:
    members: int  # members serving (registered, not draining)
    values: dict[str, float | None]  # trigger -> value; None: not measurable now (no traffic, not reported)
    rpm: float


@dataclass(frozen=True)
class Memory:
    over_since: dict[str, float] = field(default_factory=dict)  # trigger -> since when it is over, unbroken
    all_under_since: float | None = None
    last_out_at: float | None = None
    last_in_at: float | None = None
    rpm_history: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class TriggerView:
    name: str
    value: float | None
    scale_out_above: float
    scale_in_below: float
    over_for_s: float  # 0 when not over


@dataclass(frozen=True)
class Decision:
    direction: Direction
    current: int
    target: int
    trigger: str | None  # what decided it: a trigger's name, "min_instances", "max_instances", or None
    predictive: bool
    reason: str
    triggers: tuple[TriggerView, ...]
    cooldown_out_left_s: float
    cooldown_in_left_s: float

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def measure(
    group: ScalingGroup,
    samples: Iterable[Sample],
    now: float,
    window_s: float,
    members: int,
    unhealthy: int,
    queue_depth: float | None = None,
) -> Signals:
    """The triggers' values over the last ``window_s``. In-flight requests are estimated by Little's law:
    the busy time of the window's attempts over the window's length is the mean number in flight."""
    recent = [s for s in samples if now - window_s < s.at <= now]
    count = len(recent)
    rpm = count * 60.0 / window_s
    busy_s = sum(min(s.duration_ms / 1000.0, window_s) for s in recent)
    template = group.template
    utilisation: float | None = None
    if members > 0 and template.max_concurrent_requests:
        utilisation = busy_s / window_s / (members * template.max_concurrent_requests)
    elif members > 0 and template.max_rpm:
        utilisation = rpm / (members * template.max_rpm)
    values: dict[str, float | None] = {
        "utilisation": utilisation,
        "p95_latency_ms": percentile([s.duration_ms for s in recent], 0.95) if recent else None,
        "error_rate": sum(1 for s in recent if not s.ok) / count if count else None,
        "queue_depth": queue_depth,
        "unhealthy_instances": float(unhealthy),
    }
    return Signals(members=members, values=values, rpm=rpm)


def queue_depth(reports: Iterable[str | None]) -> float | None:
    """Requests waiting per member that reports them: the mean over the members' /metrics texts of vLLM's
    ``vllm:num_requests_waiting`` (summed over its label sets). A member that did not answer, or answered
    without the metric, is left out; None when none reported (the trigger is then not measurable)."""
    found = [sums[QUEUE_METRIC] for text in reports if text and QUEUE_METRIC in (sums := _waiting(text))]
    return max(0.0, sum(found) / len(found)) if found else None


def _waiting(text: str) -> dict[str, float]:
    return prometheus_sums(text, (QUEUE_METRIC,))


def trend_rpm(history: tuple[tuple[float, float], ...], at: float) -> float | None:
    """Requests per minute at ``at`` by a least-squares line through the history; None with too little."""
    if len(history) < 3 or history[-1][0] - history[0][0] <= 0:
        return None
    n = len(history)
    mean_t = sum(t for t, _ in history) / n
    mean_r = sum(r for _, r in history) / n
    spread = sum((t - mean_t) ** 2 for t, _ in history)
    slope = sum((t - mean_t) * (r - mean_r) for t, r in history) / spread
    return mean_r + slope * (at - mean_t)


def _left(last: float | None, cooldown: float, now: float) -> float:
    return 0.0 if last is None else max(0.0, last + cooldown - now)


def decide(group: ScalingGroup, signals: Signals, memory: Memory, now: float) -> tuple[Decision, Memory]:
    watched = group.triggers.watched()
    over_since = {
        name: memory.over_since.get(name, now)
        for name, t in watched.items()
        if (value := signals.values.get(name)) is not None and value > t.scale_out_above
    }
    all_under = all(
        (value := signals.values.get(name)) is None or value < t.scale_in_below for name, t in watched.items()
    )
    under_since = None if not all_under else now if memory.all_under_since is None else memory.all_under_since
    history = tuple(
        (t, r) for t, r in (*memory.rpm_history, (now, signals.rpm)) if now - t <= group.predictive_window_s
    )
    new_memory = dataclasses.replace(
        memory, over_since=over_since, all_under_since=under_since, rpm_history=history
    )
    views = tuple(
        TriggerView(
            name,
            signals.values.get(name),
            t.scale_out_above,
            t.scale_in_below,
            now - over_since[name] if name in over_since else 0.0,
        )
        for name, t in watched.items()
    )
    out_left = _left(memory.last_out_at, group.cooldown_out_s, now)
    in_left = max(
        _left(memory.last_out_at, group.cooldown_in_s, now),
        _left(memory.last_in_at, group.cooldown_in_s, now),
        group.cooldown_in_s - (now - under_since) if under_since is not None else group.cooldown_in_s,
        0.0,
    )
    current = signals.members

    def made(direction: Direction, trigger: str | None, reason: str, predictive: bool = False) -> Decision:
        target = current + (1 if direction == "out" else -1 if direction == "in" else 0)
        if trigger == "min_instances":
            target = group.min_instances
        elif trigger == "max_instances":
            target = group.max_instances
        return Decision(direction, current, target, trigger, predictive, reason, views, out_left, in_left)

    if current < group.min_instances:
        return made(
            "out", "min_instances", f"{current} members, min_instances {group.min_instances}"
        ), new_memory
    if current > group.max_instances:
        return made(
            "in", "max_instances", f"{current} members, max_instances {group.max_instances}"
        ), new_memory
    held = [v for v in views if v.name in over_since and v.over_for_s >= group.sustain_s]
    if held and current < group.max_instances and out_left == 0:
        v = held[0]
        reason = f"{v.name} {v.value:.3g} > {v.scale_out_above:g} for {v.over_for_s:.0f} s"
        return made("out", v.name, reason), new_memory
    predicted = _predicted(group, signals, history, now)
    if predicted is not None and current < group.max_instances and out_left == 0:
        return made("out", "utilisation", predicted, predictive=True), new_memory
    if current > group.min_instances and in_left == 0 and under_since is not None:
        reason = f"every trigger under its scale_in_below for {now - under_since:.0f} s"
        return made("in", None, reason), new_memory
    over = [v for v in views if v.name in over_since]
    return made("hold", None, _hold_reason(group, current, over, held, out_left, in_left)), new_memory


def _predicted(
    group: ScalingGroup, signals: Signals, history: tuple[tuple[float, float], ...], now: float
) -> str | None:
    """Why the utilisation trend crosses its threshold within two evaluations, or None."""
    threshold = group.triggers.utilisation
    utilisation = signals.values.get("utilisation")
    if not group.predictive or threshold is None or utilisation is None or signals.rpm <= 0:
        return None
    ahead = now + 2 * group.evaluation_interval_s
    projected_rpm = trend_rpm(history, ahead)
    if projected_rpm is None:
        return None
    projected = utilisation * projected_rpm / signals.rpm
    if projected <= threshold.scale_out_above:
        return None
    return (
        f"predictive: requests per minute {signals.rpm:.0f} trending to {projected_rpm:.0f} in"
        f" {ahead - now:.0f} s, utilisation {utilisation:.3g} to {projected:.3g}"
        f" > {threshold.scale_out_above:g}"
    )


def _hold_reason(
    group: ScalingGroup,
    current: int,
    over: list[TriggerView],
    held: list[TriggerView],
    out_left: float,
    in_left: float,
) -> str:
    if held and current >= group.max_instances:
        return f"{held[0].name} over its threshold, at max_instances {group.max_instances}"
    if held:
        return f"{held[0].name} over its threshold, cooldown_out {out_left:.0f} s left"
    if over:
        first, sustain = over[0], group.sustain_s
        return f"{first.name} over its threshold for {first.over_for_s:.0f} s of sustain_s {sustain:g}"
    if current > group.min_instances:
        return f"within thresholds; scale in possible in {in_left:.0f} s if every trigger stays under"
    return "within thresholds"
