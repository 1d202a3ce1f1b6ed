"""The data-plane stage: requests/s, latency and streaming per target (direct, plain nginx, the gateway
with TLS off and on, LiteLLM), then the static-backend supplement."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from scripts.bench import load, report
from scripts.bench.common import LITELLM_WARMUP_S, NOISE_CORES, SYSLOG_DROP, T, log
from scripts.bench.procs import Group
from scripts.bench.systems import Target

if TYPE_CHECKING:
    from scripts.bench.main import Bench


def check(bench: Bench, target: Target, model: str = load.MODEL) -> None:
    body = load.chat_body(model=model)
    headers = {"Authorization": f"Bearer {target.api_key}", "Content-Type": "application/json"}
    with httpx.Client(verify=False, timeout=30) as client:
        response = client.post(target.chat_url, content=body, headers=headers)
    if response.status_code != 200 or "choices" not in response.text:
        raise RuntimeError(f"{target.label}: {response.status_code} {response.text[:300]}")


def _cores(window: Any, group: str) -> float:
    use = window.result.get(group)
    return float(use.cpu_cores) if use is not None else 0.0


def _usage(bench: Bench, target: Target, window: Any) -> dict[str, Any]:
    usage: dict[str, Any] = {}
    for name, _ in target.watch.items():
        sampled = "nginx-gw" if name == "nginx" and target.key.startswith("gateway") else name
        if sampled in window.result:
            usage[name] = window.result[sampled].to_dict()
    for name in ("backend", "client"):
        if name in window.result:
            usage[name] = window.result[name].to_dict()
    return usage


def measure_target(bench: Bench, target: Target, script_key: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "label": target.label,
        "rps": {},
        "usage": {},
        "machine_busy": {},
        "others_cores": {},
    }
    gw = bench.gateway if target.key.startswith("gateway") else None
    if gw is not None:
        entry["log_stream_drops"] = {}
        entry["reloads_during"] = {}

    entry["remeasured"] = {}

    def measured(name: str, run: Callable[[], T]) -> tuple[T, Any]:
        """Run one measurement in a sampler window; when other processes on the machine took more
        than NOISE_CORES during it, run it once more and keep the less disturbed of the two."""
        best: tuple[T, Any, int, int] | None = None
        for attempt in range(2):
            if gw is not None:
                gw.error_log_count(SYSLOG_DROP)
                reloads = gw.reloads()
            with bench.sampler.window() as window:
                result = run()
            drops = gw.error_log_count(SYSLOG_DROP) if gw is not None else 0
            reloaded = gw.reloads() - reloads if gw is not None else 0
            if best is None or window.others_cores < best[1].others_cores:
                best = (result, window, drops, reloaded)
            if window.others_cores <= NOISE_CORES:
                break
            if attempt == 0:
                log(f"{target.label} {name}: other processes took {window.others_cores:.2f} cores: again")
                entry["remeasured"][name] = round(window.others_cores, 2)
        assert best is not None
        result, window, drops, reloaded = best
        entry["usage"][name] = _usage(bench, target, window)
        entry["machine_busy"][name] = round(window.machine_busy, 3)
        entry["others_cores"][name] = round(window.others_cores, 2)
        if gw is not None:
            entry["log_stream_drops"][name] = drops
            entry["reloads_during"][name] = reloaded
        return result, window

    script = bench.scripts[script_key]
    added_group = False
    if target.key == "nginx":
        bench.sampler.add(Group("nginx", bench.nginx.pids if bench.nginx else list))
        added_group = True
    try:
        check(bench, target)
        warmup = max(bench.p.warmup_s, LITELLM_WARMUP_S if target.key == "litellm" else 0)
        load.run_wrk(target.chat_url, script, 16, 2, warmup)
        for conc in (16, 64):
            result, window = measured(
                f"c{conc}",
                functools.partial(load.run_wrk, target.chat_url, script, conc, 2, bench.p.duration_s),
            )
            entry["rps"][str(conc)] = result.to_dict()
            log(
                f"{target.label}: c{conc} {result.rps:,.0f} req/s, failed {result.failed}, "
                f"backend {_cores(window, 'backend'):.2f} "
                f"cores, machine busy {window.machine_busy:.0%}, other processes "
                f"{window.others_cores:.2f} cores"
                + (f", log records dropped {entry['log_stream_drops'][f'c{conc}']}" if gw else "")
            )
        lat, _ = measured(
            "c1", functools.partial(load.run_wrk, target.chat_url, script, 1, 1, bench.p.latency_s)
        )
        entry["latency_c1"] = lat.to_dict()
        log(f"{target.label}: c1 p50 {lat.p50_ms:.3f} p90 {lat.p90_ms:.3f} p99 {lat.p99_ms:.3f} ms")
        stream, _ = measured(
            "stream",
            functools.partial(load.measure_stream, target.chat_url, target.api_key, bench.p.stream_samples),
        )
        entry["stream"] = stream.to_dict()
        check(bench, target)  # wrk counts a 3xx as success: the target must still answer 200
        log(
            f"{target.label}: SSE TTFB p50 {stream.ttfb_ms.get('p50')} ms, TTLB p50 "
            f"{stream.ttlb_ms.get('p50')} ms, {stream.events_per_answer} events, failed {stream.failed}"
        )
    except Exception as exc:
        entry["error"] = f"{type(exc).__name__}: {exc}"
        bench.note(f"{target.label}: measurement failed: {entry['error'][:400]}")
    finally:
        if added_group:
            bench.sampler.remove("nginx")
    peaks: dict[str, float] = {}
    for phase_usage in entry["usage"].values():
        for group, use in phase_usage.items():
            peaks[group] = max(peaks.get(group, 0.0), float(use["peak_rss_mb"]))
    entry["peak_rss_mb"] = peaks
    return entry


def data_plane(bench: Bench) -> None:
    for target, script in bench.targets():
        log(f"--- {target.label} ({target.chat_url})")
        bench.results["data_plane"][target.key] = measure_target(bench, target, script)


# The static rows' ratio swings most between runs (plain nginx against the static backend went from 22k to
# 33k requests/s from one run to the next): plain nginx and the gateway are measured in turn, pair by pair,
# and the ratio is the median of the pairs' ratios.
STATIC_PAIRS = {"full": 3, "quick": 1}


def paired_run(
    bench: Bench,
    url: str,
    script_key: str,
    groups: tuple[str, ...],
    conc: int = 64,
    seconds: float | None = None,
) -> dict[str, Any]:
    """One wrk run of a pair (once more when other processes took the CPU): the static backend's at c64
    for its seconds (Profile.static_s) by default."""
    script = bench.scripts[script_key]
    for _ in range(2):
        with bench.sampler.window() as window:
            result = load.run_wrk(url, script, conc, 2, bench.p.static_s if seconds is None else seconds)
        if window.others_cores <= NOISE_CORES:
            break
    cpu = sum(window.result[g].cpu_cores for g in groups if g in window.result) if groups else None
    return {
        "requests": result.requests,
        "rps": result.rps,
        "failed": result.failed,
        "cpu_cores": round(cpu, 3) if cpu is not None else None,
        "machine_busy": round(window.machine_busy, 3),
    }


def pair_ratio(pairs: list[tuple[float, float]]) -> tuple[float | None, list[float]]:
    """The median of the (plain, gateway) pairs' gateway/plain ratios, and the ratios."""
    ratios = sorted(round(gateway / plain, 3) for plain, gateway in pairs if plain > 0)
    if not ratios:
        return None, []
    mid = len(ratios) // 2
    median = ratios[mid] if len(ratios) % 2 else round((ratios[mid - 1] + ratios[mid]) / 2, 3)
    return median, ratios


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda run: float(run["rps"]))[len(runs) // 2]


def static_backend(bench: Bench) -> None:
    """Supplement: the same comparison with a backend that costs almost nothing (nginx return 200)."""
    assert bench.nginx and bench.gateway
    if bench.budget.left() < 25:
        bench.note("static-backend supplement skipped: time budget")
        return
    gw = bench.gateway
    rows: list[dict[str, Any]] = []
    cases = [
        (
            "static backend direct",
            f"http://127.0.0.1:{bench.nginx.static_port}/v1/chat/completions",
            "static",
            (),
        ),
        (
            "plain nginx -> static",
            f"http://127.0.0.1:{bench.nginx.static_proxy_port}/v1/chat/completions",
            "static",
            ("nginx",),
        ),
        ("gateway -> static", gw.http_url + "/v1/chat/completions", "static-gw", ("nginx-gw", "controller")),
    ]
    pairs: list[tuple[float, float]] = []
    drops = 0  # access-log lines the gateway's nginx could not send in its runs
    plain_runs: list[dict[str, Any]] = []
    gateway_runs: list[dict[str, Any]] = []
    bench.sampler.add(Group("nginx", bench.nginx.pids))
    try:
        check(bench, Target("gw-static", "gateway static", gw.http_url, bench.gateway_key), "static-model")
        for _, url, script_key, _ in cases:
            load.run_wrk(url, bench.scripts[script_key], 64, 2, bench.p.warmup_s)
        direct = paired_run(bench, *cases[0][1:])
        for _ in range(STATIC_PAIRS.get(bench.p.mode, 1)):
            plain_runs.append(paired_run(bench, *cases[1][1:]))
            gw.error_log_count(SYSLOG_DROP)
            gateway_runs.append(paired_run(bench, *cases[2][1:]))
            drops += gw.error_log_count(SYSLOG_DROP)
            pairs.append((float(plain_runs[-1]["rps"]), float(gateway_runs[-1]["rps"])))
            log(f"static backend c64: plain nginx {pairs[-1][0]:,.0f}, gateway {pairs[-1][1]:,.0f} req/s")
        for (label, url, script_key, _), run in zip(
            cases, (direct, _median_run(plain_runs), _median_run(gateway_runs)), strict=True
        ):
            lat = load.run_wrk(url, bench.scripts[script_key], 1, 1, max(2.0, bench.p.static_s / 2))
            rows.append({"label": label, **run, "p50_ms": lat.p50_ms})
            log(f"{label}: c64 {run['rps']:,.0f} req/s (failed {run['failed']}), c1 p50 {lat.p50_ms:.3f} ms")
    except Exception as exc:
        bench.note(f"static-backend supplement failed: {type(exc).__name__}: {exc}")
    finally:
        bench.sampler.remove("nginx")
    ratio, ratios = pair_ratio(pairs) if len(rows) == 3 else (None, [])
    bench.results["static_backend"] = {
        "rows": rows,
        "ratio": ratio,
        "pair_ratios": ratios,
        "log_stream_drops": drops,
        "gateway_requests": sum(int(run["requests"]) for run in gateway_runs),
    }


# The stand-in's ratios move too (0.77x-0.83x at c16 between two runs of one tree): the table's plain nginx
# and gateway runs are the first pair, these more pairs are run in turn after the table, and the targets take
# the median of the pairs' ratios at each concurrency.
STANDIN_PAIRS = {"full": 2, "quick": 0}


def table_pairs(dp: dict[str, Any]) -> tuple[dict[str, list[tuple[float, float]]], bool, list[str]]:
    """The table's (plain nginx, gateway) runs against the stand-in as the first pair at c16 and c64: the
    pairs (none at a concurrency where either run had failed requests: an error answer costs less), whether
    both systems were measured at both, and the concurrencies whose pair failed."""
    pairs: dict[str, list[tuple[float, float]]] = {}
    tabled, failed = True, []
    for conc in ("16", "64"):
        first = [float(report._get(dp, k, "rps", conc, "rps") or 0) for k in ("nginx", "gateway")]
        measured = all(first)
        tabled = tabled and measured
        if measured and any(report._get(dp, k, "rps", conc, "failed") for k in ("nginx", "gateway")):
            failed.append(conc)
            pairs[conc] = []
        else:
            pairs[conc] = [(first[0], first[1])] if measured else []
    return pairs, tabled, failed


def standin_pairs(bench: Bench) -> None:
    """More (plain nginx, gateway) pairs against the stand-in at c16 and c64, each pair's two runs one after
    the other; results["standin_pairs"][conc]: the median ratio, the pairs' ratios (the table's first) and
    the gateway's requests/s in each pair (sorted: the LiteLLM comparison takes their median)."""
    pairs, tabled, failed = table_pairs(bench.results["data_plane"])
    for conc in failed:
        bench.note(f"stand-in c{conc}, pair 1 (the table's runs): failed requests, not counted")
    runs = {target.key: (target.chat_url, script) for target, script in bench.targets()}
    extra = STANDIN_PAIRS.get(bench.p.mode, 0) if tabled else 0
    for n in range(extra):
        if bench.budget.left() < 4 * bench.p.duration_s + 60:
            bench.note(f"stand-in pairs: {n} of {extra} more run (time budget)")
            break
        for conc in pairs:
            plain, gateway = (
                paired_run(bench, *runs[key], (), int(conc), bench.p.duration_s)
                for key in ("nginx", "gateway")
            )
            log(
                f"stand-in c{conc}, pair {n + 2}: plain nginx {plain['rps']:,.0f}, "
                f"gateway {gateway['rps']:,.0f} req/s"
            )
            if plain["failed"] or gateway["failed"]:  # not like with like: an error answer costs less
                bench.note(
                    f"stand-in c{conc}, pair {n + 2}: failed requests (plain {plain['failed']}, "
                    f"gateway {gateway['failed']}): not counted"
                )
                continue
            pairs[conc].append((float(plain["rps"]), float(gateway["rps"])))
    bench.results["standin_pairs"] = {
        conc: {
            **dict(zip(("ratio", "pair_ratios"), pair_ratio(found), strict=True)),
            "gateway_rps": sorted(gateway for _, gateway in found),
        }
        for conc, found in pairs.items()
        if found
    }
