"""Routing that learns, the pure part: what the controller measured becomes nginx weights and tiers.

Inputs per instance of a pool (Observation): its latency and success over a recent window, its breaker
state, token prices, quality_score, a load signal. Output per instance (Choice): a weight (1-1000), a tier
(0 serves, 1 is nginx `backup`, None leaves the pool), a score and the reasons, as /admin/select shows
them. Hysteresis (moved) keeps noise from becoming reloads. No I/O, no clock, no global random state.
"""

from __future__ import annotations

import hashlib
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from control_plane.registry.models import BreakerState, InstanceConfig, Strategy

# Strategies whose weights come from measurements (recomputed every weights_interval_s, with hysteresis).
MEASURED = frozenset(
    {Strategy.LEAST_RESPONSE_TIME, Strategy.HEALTH_BASED, Strategy.PERFORMANCE_BASED, Strategy.ADAPTIVE}
)
# Strategies whose tiers come from configuration (prices, quality_score): no measurement, no hysteresis.
RANKED = frozenset({Strategy.COST_OPTIMIZED, Strategy.QUALITY_BASED})
LEARNED = MEASURED | RANKED

SCALE = 100  # the best instance's weight; the rest in proportion, at least 1
MAX_WEIGHT = 1000
HALF_OPEN_WEIGHT = 1  # a half-open instance's trickle against SCALE
MIN_EVIDENCE = 5  # requests in the window before a success rate or latency counts
SHARE_FLOOR = 0.05  # hysteresis: a share below this moves relative to this (small shares are noisy)
THOMPSON_DRAWS = 2000


@dataclass(frozen=True)
class Observation:
    """One instance of one pool, as measured over the window."""

    name: str
    requests: int = 0  # answered attempts in the window (successes and failures)
    successes: int = 0
    p50_ms: float | None = None  # median latency of successful attempts; None: too few
    breaker: BreakerState = BreakerState.CLOSED
    price: float = 0.0  # USD per 1,000 tokens, input and output averaged
    quality: float = 0.0
    load: float = 0.0  # 0 idle .. 1 saturated (queueing, cold model): less weight
    load_note: str = ""  # what the backend said (control_plane/routing/load.py)
    ms_per_token: float | None = None  # latency per output token where usage is known
    tokens_per_s: float | None = None

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.requests if self.requests >= MIN_EVIDENCE else None


@dataclass(frozen=True)
class Reward:
    """The adaptive strategy's reward: success, speed and price, weighted (routing document)."""

    success: float = 1.0
    latency: float = 1.0
    cost: float = 0.0


@dataclass(frozen=True)
class Choice:
    name: str
    weight: int
    tier: int | None  # 0: serves; 1: nginx backup; None: out of the pool (a worse tier)
    score: float
    reasons: tuple[str, ...]


def price_of(config: InstanceConfig) -> float:
    """USD per 1,000 tokens, prompt and completion rates averaged (each cost_per_1k_tokens when unset)."""
    both = config.cost_per_1k_tokens
    prompt = config.input_cost_per_1k_tokens
    completion = config.output_cost_per_1k_tokens
    return ((both if prompt is None else prompt) + (both if completion is None else completion)) / 2


def _weight(relative: float) -> int:
    return max(1, min(MAX_WEIGHT, round(SCALE * relative)))


def _evidence(o: Observation) -> list[str]:
    reasons = []
    if o.p50_ms is not None:
        reasons.append(f"p50 {o.p50_ms:.0f} ms over {o.requests} requests")
    else:
        reasons.append(f"{o.requests} requests measured: latency not yet known")
    if o.ms_per_token is not None:
        reasons.append(f"{o.ms_per_token:.1f} ms per output token")
    if o.tokens_per_s is not None:
        reasons.append(f"{o.tokens_per_s:.0f} output tokens/s")
    rate = o.success_rate
    if rate is not None:
        reasons.append(f"success {rate:.0%}")
    if o.load > 0:
        reasons.append(f"load {o.load:.0%}")
    if o.load_note:
        reasons.append(o.load_note)
    if o.breaker is BreakerState.HALF_OPEN:
        reasons.append("breaker half-open: a trickle")
    return reasons


def _speed_scores(observations: Sequence[Observation], per_token: bool = True) -> dict[str, float]:
    """best speed / own speed, 0-1; an instance not measured yet counts as the median of those measured
    (1.0 when none is), so it gets traffic to be measured with. Speed is the latency per output token
    when every measured instance has one (per_token; long answers then do not look slow), else the median
    latency: the two are never compared with each other."""
    latency = {o.name: ms for o in observations if (ms := o.p50_ms) is not None and ms > 0}
    tokens = {o.name: ms for o in observations if (ms := o.ms_per_token) is not None and ms > 0}
    known: dict[str, float] = tokens if per_token and tokens and set(latency) <= set(tokens) else latency
    if not known:
        return {o.name: 1.0 for o in observations}
    best, middle = min(known.values()), statistics.median(known.values())
    return {o.name: best / known.get(o.name, middle) for o in observations}


def _finish(
    observations: Sequence[Observation], scores: Mapping[str, float], power: float, extra: Mapping[str, str]
) -> tuple[Choice, ...]:
    """Weights proportional to score**power (the best gets SCALE), less for load; half-open: a trickle."""
    best = max(scores.values(), default=0.0) or 1.0
    choices = []
    for o in observations:
        relative = (scores[o.name] / best) ** power * (1.0 - 0.5 * o.load)
        reasons = [*_evidence(o), *([extra[o.name]] if o.name in extra else [])]
        weight = HALF_OPEN_WEIGHT if o.breaker is BreakerState.HALF_OPEN else _weight(relative)
        choices.append(Choice(o.name, weight, 0, round(scores[o.name], 4), tuple(reasons)))
    return tuple(choices)


def least_response_time(observations: Sequence[Observation]) -> tuple[Choice, ...]:
    """Weight ~ (fastest / own latency)^2: 50, 150, 400 ms -> 100, 11, 2; latency per output token where
    the answers report usage (see _speed_scores)."""
    return _finish(observations, _speed_scores(observations), 2.0, {})


def health_based(observations: Sequence[Observation]) -> tuple[Choice, ...]:
    """Weight ~ success rate^4 over the window (95 % -> 81, 50 % -> 6); unmeasured counts as healthy."""
    scores = {o.name: (rate if (rate := o.success_rate) is not None else 1.0) for o in observations}
    return _finish(observations, scores, 4.0, {})


def performance_based(observations: Sequence[Observation]) -> tuple[Choice, ...]:
    """Latency and throughput together: (latency score x relative tokens/s x success)^2. Latency here is
    the median time to a whole answer, what a client waits; tokens/s (where the answers report usage)
    is how fast the instance generates, so an instance whose long answers are slow in proportion loses
    on latency only, and one that is slow per token loses on both."""
    speed = _speed_scores(observations, per_token=False)
    rates = {o.name: o.tokens_per_s for o in observations if o.tokens_per_s}
    top = max(rates.values(), default=0.0)
    scores = {}
    for o in observations:
        throughput = rates[o.name] / top if o.name in rates and top else 1.0
        success = rate if (rate := o.success_rate) is not None else 1.0
        scores[o.name] = speed[o.name] * throughput * success
    return _finish(observations, scores, 2.0, {})


def reward_of(o: Observation, speed: float, cheapest: float, reward: Reward) -> float:
    """0-1: weighted mean of success rate, speed score and price score (cheapest / own price), less for
    load."""
    total = reward.success + reward.latency + reward.cost
    if total <= 0:
        return 0.5
    success = rate if (rate := o.success_rate) is not None else 1.0
    price = cheapest / o.price if o.price > 0 else 1.0
    mean = (reward.success * success + reward.latency * speed + reward.cost * price) / total
    return mean * (1.0 - 0.5 * o.load)


def explore(wins: Mapping[str, int], explore_share: float) -> dict[str, float]:
    """Shares from Thompson wins: (1 - explore_share) by the chance of being best, and explore_share spread
    evenly over all but the likeliest best, so at least explore_share of traffic keeps exploring."""
    total = sum(wins.values()) or 1
    if len(wins) < 2:
        return {name: 1.0 for name in wins}
    top = max(wins, key=lambda n: (wins[n], n))
    floor = explore_share / (len(wins) - 1)
    return {n: (1 - explore_share) * wins[n] / total + (0.0 if n == top else floor) for n in wins}


def adaptive(
    observations: Sequence[Observation], explore_share: float, reward: Reward, seed: str = ""
) -> tuple[Choice, ...]:
    """Thompson sampling: each instance's reward as Beta(1 + n r, 1 + n (1 - r)); its share of traffic is
    the chance it is the best, (1 - explore_share) of it, plus explore_share spread over the others (see
    explore), so every instance keeps being measured. The draws are seeded by the inputs: the same window,
    the same weights."""
    if not observations:
        return ()
    speed = _speed_scores(observations)
    priced = [o.price for o in observations if o.price > 0]
    cheapest = min(priced, default=0.0)
    rewards = {o.name: reward_of(o, speed[o.name], cheapest, reward) for o in observations}
    rng = random.Random(hashlib.sha256(repr((seed, sorted(rewards.items()))).encode()).digest())
    wins = dict.fromkeys(rewards, 0)
    for _ in range(THOMPSON_DRAWS):
        draws = {
            o.name: rng.betavariate(1 + o.requests * rewards[o.name], 1 + o.requests * (1 - rewards[o.name]))
            for o in observations
        }
        wins[max(draws, key=lambda n: (draws[n], n))] += 1
    shares = explore(wins, explore_share)
    extra = {
        name: f"reward {rewards[name]:.2f}, best in {wins[name] / THOMPSON_DRAWS:.0%} of draws"
        for name in wins
    }
    choices = []
    for o in observations:
        weight = (
            HALF_OPEN_WEIGHT
            if o.breaker is BreakerState.HALF_OPEN
            else max(1, round(MAX_WEIGHT * shares[o.name]))
        )
        choices.append(Choice(o.name, weight, 0, round(rewards[o.name], 4), (*_evidence(o), extra[o.name])))
    return tuple(choices)


def ranked(strategy: Strategy, observations: Sequence[Observation]) -> tuple[Choice, ...]:
    """cost_optimized: the cheapest price tier serves, the next is backup, the rest leave the pool;
    quality_based: the same by highest quality_score. Only available instances are passed in, so an
    unhealthy cheap instance never serves. Within a tier: equal weights (half-open: a trickle)."""
    if strategy is Strategy.COST_OPTIMIZED:
        key = {o.name: o.price for o in observations}
        label = {o.name: f"cost {o.price:g} $/1k" for o in observations}
    else:
        key = {o.name: -o.quality for o in observations}
        label = {o.name: f"quality {o.quality:g}" for o in observations}
    levels = sorted(set(key.values()))
    choices = []
    for o in observations:
        level = levels.index(key[o.name])
        tier = level if level < 2 else None
        what = ("best tier", "backup tier")[level] if tier is not None else "worse tier: out of the pool"
        weight = HALF_OPEN_WEIGHT if o.breaker is BreakerState.HALF_OPEN else SCALE
        score = -key[o.name] if strategy is Strategy.COST_OPTIMIZED else o.quality
        choices.append(Choice(o.name, weight, tier, score, (f"{label[o.name]}: {what}", *_evidence(o))))
    return tuple(choices)


def decide(
    strategy: Strategy,
    observations: Sequence[Observation],
    explore_share: float = 0.05,
    reward: Reward | None = None,
    seed: str = "",
) -> tuple[Choice, ...]:
    """The weights and tiers a learned strategy gives the pool's available instances."""
    match strategy:
        case Strategy.LEAST_RESPONSE_TIME:
            return least_response_time(observations)
        case Strategy.HEALTH_BASED:
            return health_based(observations)
        case Strategy.PERFORMANCE_BASED:
            return performance_based(observations)
        case Strategy.ADAPTIVE:
            return adaptive(observations, explore_share, reward or Reward(), seed)
        case Strategy.COST_OPTIMIZED | Strategy.QUALITY_BASED:
            return ranked(strategy, observations)
    raise ValueError(f"{strategy} is not a learned strategy")


def shares(choices: Sequence[Choice]) -> dict[str, float]:
    """Expected share of traffic (0-1) while every instance answers: weights within tier 0."""
    serving = [c for c in choices if c.tier == 0]
    total = sum(c.weight for c in serving)
    return {c.name: (c.weight / total if c.tier == 0 and total else 0.0) for c in choices}


def moved(old: Sequence[Choice] | None, new: Sequence[Choice], min_change: float) -> bool:
    """Whether the new weights differ enough to apply: another set of instances or tiers, or some share of
    traffic moving by more than min_change of itself (shares under SHARE_FLOOR count as SHARE_FLOOR)."""
    if old is None:
        return True
    if {(c.name, c.tier) for c in old} != {(c.name, c.tier) for c in new}:
        return True
    before, after = shares(old), shares(new)
    return any(abs(after[n] - before[n]) > min_change * max(before[n], SHARE_FLOOR) for n in after)
