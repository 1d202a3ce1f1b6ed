"""What usage accounting costs in requests/s: the bench's gateway (counting on, what deploys run with) against
a second gateway with ISHGW_USAGE_ACCOUNTING=false (same settings otherwise, same instances, a key of its
own, the same backends), each pair's two runs one after the other with the order alternating, at c64
against the stand-in and against the static backend. The instruction counts (scripts.bench.instructions)
say what counting adds to nginx's work; this says what it costs a client on this machine."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from scripts.bench import load
from scripts.bench.common import DUMMY_KEY, log
from scripts.bench.dataplane import check, pair_ratio, paired_run
from scripts.bench.systems import GatewaySystem, Target

if TYPE_CHECKING:
    from scripts.bench.main import Bench

COUNTING_PAIRS = {"full": 5, "quick": 1}
CONCURRENCY = 64
# What each pair is run against: the model the bench registered there.
KINDS = {"standin": load.MODEL, "static": "static-model"}
LABELS = ("on", "off")


def counting_cost(bench: Bench) -> None:
    """results["counting_cost"]: the runs' concurrency and seconds, and by kind (KINDS) the median of the
    pairs' on/off ratios, the ratios, and each side's median requests/s."""
    assert bench.gateway is not None
    pairs = COUNTING_PAIRS.get(bench.p.mode, 0)
    seconds = bench.p.static_s
    # Start-up, then each run, once more when other processes took the CPU (paired_run): the other
    # gateway's controller still reading the last run's log lines often does.
    needs = 30 + pairs * len(KINDS) * len(LABELS) * (2 * seconds + 2)
    if not pairs or bench.budget.left() < needs:
        bench.note(f"usage accounting's cost in requests/s not measured: time budget ({needs:.0f} s needed)")
        return
    log("--- usage accounting's cost: the gateway against a second one without counting")
    off: GatewaySystem | None = None
    runs: dict[str, dict[str, list[float]]] = {kind: {label: [] for label in LABELS} for kind in KINDS}
    try:
        off = GatewaySystem(bench.procs, {**bench.gateway_env, "ISHGW_USAGE_ACCOUNTING": "false"})
        off_key, _ = bench.register(off)
        gateways = {"on": (bench.gateway, bench.gateway_key), "off": (off, off_key or DUMMY_KEY)}
        urls: dict[tuple[str, str], str] = {}
        for label, (gw, key) in gateways.items():
            for kind, model in KINDS.items():
                script = f"counting-{label}-{kind}"
                body = load.chat_body(model=model)
                bench.scripts[script] = load.write_wrk_script(bench.work / f"{script}.lua", body, key)
                check(bench, Target(script, script, gw.http_url, key), model)
                urls[label, kind] = gw.http_url + "/v1/chat/completions"
                load.run_wrk(urls[label, kind], bench.scripts[script], CONCURRENCY, 2, bench.p.warmup_s)
        for n in range(pairs):
            order = LABELS if n % 2 == 0 else LABELS[::-1]
            for kind in KINDS:
                pair = {
                    label: paired_run(bench, urls[label, kind], f"counting-{label}-{kind}", (), CONCURRENCY)
                    for label in order
                }
                # An error answer costs less: a pair with failed requests is not like with like.
                if any(run["failed"] for run in pair.values()):
                    bench.note(f"usage accounting's cost, {kind} pair {n + 1}: failed requests, not counted")
                    continue
                for label, run in pair.items():
                    runs[kind][label].append(float(run["rps"]))
                log(
                    f"counting {kind} c{CONCURRENCY}, pair {n + 1}: on {pair['on']['rps']:,.0f}, "
                    f"off {pair['off']['rps']:,.0f} req/s"
                )
    except Exception as exc:  # reported, the run goes on
        bench.note(f"usage accounting's cost failed: {type(exc).__name__}: {exc}")
    finally:
        if off is not None:
            off.stop()
    bench.results["counting_cost"] = {
        "concurrency": CONCURRENCY,
        "seconds": seconds,
        "kinds": {kind: cost(found["on"], found["off"]) for kind, found in runs.items() if found["on"]},
    }


def cost(on: list[float], off: list[float]) -> dict[str, Any]:
    """Pairs' requests/s with counting on and off (in pair order) -> the median on/off ratio, the ratios,
    each side's median."""
    ratio, ratios = pair_ratio(list(zip(off, on, strict=True)))
    return {
        "ratio": ratio,
        "pair_ratios": ratios,
        "on_rps": statistics.median(on),
        "off_rps": statistics.median(off),
    }
