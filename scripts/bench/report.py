"""Targets (issue 5) and the markdown report built from the results document."""

from __future__ import annotations

import math
import statistics
from typing import Any

from scripts.bench.instructions import split_text

SYSTEMS = ("direct", "nginx", "gateway", "gateway_tls", "litellm")


def _get(data: Any, *path: Any) -> Any:
    for part in path:
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and -len(data) <= part < len(data):
            data = data[part]
        else:
            return None
    return data


def _num(value: Any) -> float | None:
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    return None


def fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    number = _num(value)
    if number is None:
        return "n/a"
    if abs(number) >= 1000:
        return f"{number:,.0f}{suffix}"
    return f"{number:.{digits}f}{suffix}"


def _diff(a: Any, b: Any) -> float | None:
    x, y = _num(a), _num(b)
    return None if x is None or y is None else x - y


def _ratio(a: Any, b: Any) -> float | None:
    x, y = _num(a), _num(b)
    return None if x is None or y is None or y == 0 else x / y


def standin_ratio(results: dict[str, Any], conc: str) -> float | None:
    """Gateway / plain nginx against the stand-in at ``conc``: the median of the pairs run in turn where
    there were more pairs than the table's, else the table's runs."""
    paired = _num(_get(results.get("standin_pairs") or {}, conc, "ratio"))
    dp = results.get("data_plane", {})
    return (
        paired
        if paired is not None
        else _ratio(_get(dp, "gateway", "rps", conc, "rps"), _get(dp, "nginx", "rps", conc, "rps"))
    )


def gateway_rps(results: dict[str, Any], conc: str) -> float | None:
    """The gateway's requests/s against the stand-in at ``conc``: the median of its runs in the pairs run in
    turn where there were more pairs than the table's (one slow run weighs no more than in the ratio to
    plain nginx), else the table's run."""
    runs = _get(results.get("standin_pairs") or {}, conc, "gateway_rps")
    if isinstance(runs, list) and len(runs) > 1:
        return _num(statistics.median(runs))  # as pair_ratio takes the ratios': two middle ones averaged
    return _num(_get(results.get("data_plane", {}), "gateway", "rps", conc, "rps"))


def pairs_clause(ratios: list[float], rows: str) -> str:
    """How a ratio of pairs was taken, for the report; nothing for a single pair."""
    if len(ratios) < 2:
        return ""
    shown = ", ".join(fmt(r, 3) + "x" for r in ratios)
    return f" (median of {len(ratios)} pairs run in turn: {shown}; {rows})"


def standin_sentence(results: dict[str, Any]) -> list[str]:
    """The stand-in's ratios from pairs run in turn, as report lines; none when only the table's ran."""
    paired = results.get("standin_pairs") or {}
    if not any(len(v.get("pair_ratios") or []) > 1 for v in paired.values()):
        return []
    parts = [
        f"c{conc} {fmt(v.get('ratio'), 3)}x"
        + pairs_clause(v.get("pair_ratios") or [], "the table's runs are the first pair")
        for conc, v in sorted(paired.items(), key=lambda kv: int(kv[0]))
    ]
    litellm = (
        " The gateway / LiteLLM ratios take the gateway's median run of these pairs."
        if any(len(v.get("gateway_rps") or []) > 1 for v in paired.values())
        else ""
    )
    return ["", f"Gateway / plain nginx against the stand-in: {'; '.join(parts)}.{litellm}"]


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    dp = results.get("data_plane", {})
    rel = results.get("reliability", {})
    cp = results.get("control_plane", {})
    rows: list[dict[str, Any]] = []

    def add(name: str, target: str, value: float | None, met: bool | None, shown: str) -> None:
        rows.append({"name": name, "target": target, "value": value, "measured": shown, "met": met})

    for conc in ("16", "64"):
        ratio = standin_ratio(results, conc)
        add(
            f"gateway rps / plain nginx rps, c{conc}, TLS off",
            ">= 0.85",
            ratio,
            None if ratio is None else ratio >= 0.85,
            fmt(ratio, 3) + "x",
        )
    added = _diff(_get(dp, "gateway", "latency_c1", "p50_ms"), _get(dp, "direct", "latency_c1", "p50_ms"))
    add(
        "p50 added latency over direct (c1)",
        "<= 0.15 ms",
        added,
        None if added is None else added <= 0.15,
        fmt(added, 3, " ms"),
    )
    ttfb = _diff(
        _get(dp, "gateway", "stream", "ttfb_ms", "p50"), _get(dp, "direct", "stream", "ttfb_ms", "p50")
    )
    add(
        "streaming TTFB added over direct (p50)",
        "<= 1 ms",
        ttfb,
        None if ttfb is None else ttfb <= 1.0,
        fmt(ttfb, 3, " ms"),
    )
    for conc in ("16", "64"):
        ratio = _ratio(gateway_rps(results, conc), _get(dp, "litellm", "rps", conc, "rps"))
        add(
            f"gateway rps / LiteLLM rps, c{conc}",
            ">= 50",
            ratio,
            None if ratio is None else ratio >= 50,
            fmt(ratio, 1) + "x",
        )
    static = _num(_get(results.get("static_backend") or {}, "ratio"))
    add(
        "gateway rps / plain nginx rps, static backend, c64",
        ">= 0.5",
        static,
        None if static is None else static >= 0.5,
        fmt(static, 3) + "x",
    )
    counts = results.get("instructions") or {}
    counted = _ratio(counts.get("gateway_usage"), counts.get("plain_proxy"))
    add(
        "instructions per request / plain nginx (usage accounting on, JSON answer)",
        "<= 2.5",
        counted,
        None if counted is None else counted <= 2.5,
        fmt(counted, 2) + "x",
    )
    thousand = next((s for s in cp.get("scaling", []) if s.get("instances") == 1000), None)
    reconcile = _num(_get(thousand, "median_ms")) if thousand else None
    add(
        "1,000 instances reconciled",
        "< 1000 ms",
        reconcile,
        None if reconcile is None else reconcile < 1000,
        fmt(reconcile, 0, " ms"),
    )
    live = _num(_get(cp, "api_to_live", "p95_ms"))
    timeouts = _get(cp, "api_to_live", "timeouts") or 0
    add(
        "admin API change live in nginx, p95",
        "< 2000 ms",
        live,
        None if live is None else live < 2000 and timeouts == 0,
        fmt(live, 0, " ms"),
    )
    sdk = _get(rel, "reload_storm", "sdk_retrying")
    failed = _num(_get(sdk, "failed"))
    add(
        "failed requests during reloads every 0.5 s (openai SDK, default retries)",
        "0",
        failed,
        None if failed is None else failed == 0,
        "n/a" if failed is None else f"{failed:.0f} of {_get(sdk, 'requests')}",
    )
    return rows


def instructions_sentence(results: dict[str, Any]) -> str:
    """The README's and the report's sentence on results["instructions"] (and how they were measured)."""
    counts, fixed_seed = results["instructions"], bool(results.get("instructions_fixed_seed"))
    ratio = _ratio(counts.get("gateway"), counts.get("plain_proxy"))
    counted = _ratio(counts.get("gateway_usage"), counts.get("plain_proxy"))
    how = (
        "nginx's getrandom fixed (`--fixed-seed`)" if fixed_seed else "deterministic but for LuaJIT's traces"
    )
    with_usage = (
        f", with it (JSON answer) {counts['gateway_usage']:,} ({fmt(counted, 2)}x)"
        if counts.get("gateway_usage")
        else ""
    )
    return (
        f"Instructions per request under cachegrind (`python -m scripts.bench.instructions`; {how}, "
        f"static backend, same 1 KB request): plain nginx proxy {counts['plain_proxy']:,}, the gateway "
        f"without usage accounting {counts['gateway']:,} ({fmt(ratio, 2)}x){with_usage}. A trivial Lua "
        f"hand-over (read the body, exec the pool location) costs {counts['lua_hand_over']:,}; the split: "
        f"{split_text(counts)}."
    )


COUNTING_KINDS = {"standin": "against the stand-in", "static": "against the static backend"}


def counting_sentence(results: dict[str, Any]) -> str | None:
    """The README's and the report's sentence on results["counting_cost"] (scripts.bench.counting); None
    when it was not measured."""
    measured = results.get("counting_cost") or {}
    kinds = measured.get("kinds") or {}
    parts = []
    for kind, label in COUNTING_KINDS.items():
        found = kinds.get(kind) or {}
        if found.get("ratio") is None:
            continue
        ratios = found.get("pair_ratios") or []
        shown = ", ".join(fmt(r, 3) + "x" for r in ratios)
        how = f"median of {len(ratios)} pairs: {shown}; median " if len(ratios) > 1 else "one pair; "
        parts.append(
            f"{label} {fmt(found['ratio'], 3)}x ({how}requests/s {fmt(found.get('on_rps'), 0)} with "
            f"counting, {fmt(found.get('off_rps'), 0)} without)"
        )
    if not parts:
        return None
    return (
        "Usage accounting's cost in requests/s: the gateway with counting / a second gateway without it "
        "(`ISHGW_USAGE_ACCOUNTING=false`, same instances), pairs run in turn at "
        f"c{measured.get('concurrency')}, {fmt(measured.get('seconds'), 0)} s each, the order alternating: "
        f"{'; '.join(parts)}."
    )


def cost_lines(results: dict[str, Any]) -> list[str]:
    """The report's and the README's paragraphs on what a request costs: its instructions, and counting's
    cost in requests/s; each only where it was measured."""
    out: list[str] = []
    if results.get("instructions"):
        out += ["", instructions_sentence(results)]
    counting = counting_sentence(results)
    if counting:
        out += ["", counting]
    return out


SPLIT = ("gather", "build_spec", "render", "checksum", "write", "nginx_t", "reload", "live")


def reconcile_split(scaling: list[dict[str, Any]]) -> list[str]:
    """Where a reconcile's time goes (the controller's phases_ms, medians over the repetitions)."""
    rows = [s for s in scaling if s.get("phase_medians_ms")]
    if not rows:
        return []
    out = [
        "",
        "Reconcile split (ms, medians; `phases_ms` of the same passes):",
        "",
        "| instances / pools | gather | build spec | render | checksum | write | nginx -t | reload | live |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        phases = s["phase_medians_ms"]
        cells = " | ".join(fmt(phases.get(name), 0) for name in SPLIT)
        out.append(f"| {s['instances']:,} / {s['pools']} | {cells} |")
    return out


def probing_sentence(probing: dict[str, Any]) -> str:
    return (
        f"Active probes: {probing['instances']:,} idle instances, each probed every 10 s (default "
        f"interval): {probing['probes']:,} probes in {fmt(probing.get('seconds'), 0)} s "
        f"({fmt(probing.get('probes_per_s'), 0)}/s, after as long to settle); the controller used "
        f"{fmt(probing.get('controller_cores'), 2)} of a core meanwhile (/proc, utime + stime)."
    )


def _mark(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "**missed**")


def _usage(entry: Any, phase: str, groups: tuple[str, ...]) -> tuple[float | None, float | None]:
    cpu = rss = None
    for group in groups:
        use = _get(entry, "usage", phase, group)
        if use:
            cpu = (cpu or 0.0) + float(use["cpu_cores"])
        peak = _get(entry, "peak_rss_mb", group)
        if peak is not None:
            rss = (rss or 0.0) + float(peak)
    return cpu, rss


GATEWAY_GROUPS: dict[str, tuple[str, ...]] = {
    "direct": (),
    "nginx": ("nginx",),
    "gateway": ("nginx", "controller"),
    "gateway_tls": ("nginx", "controller"),
    "litellm": ("litellm",),
}


def rps_cell(run: Any) -> str:
    """Requests/s, flagged when more than 1% of the requests failed (the figure then means little)."""
    if not isinstance(run, dict):
        return "n/a"
    text = fmt(run.get("rps"), 0)
    total, failed = run.get("requests") or 0, run.get("failed") or 0
    if total and failed / total > 0.01:
        text += f" ({100 * failed / total:.0f}% failed)"
    return text


def data_plane_table(results: dict[str, Any]) -> list[str]:
    dp = results.get("data_plane", {})
    systems = [s for s in SYSTEMS if s in dp]
    head = "| | " + " | ".join(dp[s].get("label", s) for s in systems) + " |"
    lines = [head, "|---" * (len(systems) + 1) + "|"]

    def row(title: str, values: list[str]) -> None:
        lines.append(f"| {title} | " + " | ".join(values) + " |")

    def each(fn: Any) -> list[str]:
        out = []
        for s in systems:
            if dp[s].get("error") and not dp[s].get("rps"):
                out.append("failed")
            else:
                out.append(fn(dp[s]))
        return out

    direct = dp.get("direct", {})
    row("requests/s, c16 (wrk -t2)", each(lambda e: rps_cell(_get(e, "rps", "16"))))
    row("requests/s, c64 (wrk -t2)", each(lambda e: rps_cell(_get(e, "rps", "64"))))
    row(
        "failed requests in those runs",
        each(lambda e: fmt((_get(e, "rps", "16", "failed") or 0) + (_get(e, "rps", "64", "failed") or 0), 0)),
    )
    row(
        "latency p50 / p90 / p99, c1 (ms)",
        each(lambda e: " / ".join(fmt(_get(e, "latency_c1", k), 3) for k in ("p50_ms", "p90_ms", "p99_ms"))),
    )
    row(
        "added p50 over direct (ms)",
        each(lambda e: fmt(_diff(_get(e, "latency_c1", "p50_ms"), _get(direct, "latency_c1", "p50_ms")), 3)),
    )
    row(
        "SSE 50 chunks: TTFB p50 / p90 (ms)",
        each(lambda e: " / ".join(fmt(_get(e, "stream", "ttfb_ms", k), 3) for k in ("p50", "p90"))),
    )
    row(
        "SSE: added TTFB p50 over direct (ms)",
        each(
            lambda e: fmt(
                _diff(_get(e, "stream", "ttfb_ms", "p50"), _get(direct, "stream", "ttfb_ms", "p50")), 3
            )
        ),
    )
    row("SSE: time to last byte p50 (ms)", each(lambda e: fmt(_get(e, "stream", "ttlb_ms", "p50"), 2)))
    for s in systems:
        dp[s].setdefault("_groups", GATEWAY_GROUPS.get(s, ()))
    row(
        "proxy processes' CPU at c64 (cores; gateway: nginx + controller)",
        each(lambda e: fmt(_usage(e, "c64", e["_groups"])[0], 2) if e["_groups"] else "-"),
    )
    row(
        "proxy processes' peak RSS (MB)",
        each(lambda e: fmt(_usage(e, "c64", e["_groups"])[1], 1) if e["_groups"] else "-"),
    )
    row(
        "controller CPU at c64 (cores)",
        each(
            lambda e: (
                fmt(_get(e, "usage", "c64", "controller", "cpu_cores"), 2)
                if "controller" in e["_groups"]
                else "-"
            )
        ),
    )
    row(
        "backend CPU at c16 / c64 (cores)",
        each(
            lambda e: " / ".join(fmt(_get(e, "usage", p, "backend", "cpu_cores"), 2) for p in ("c16", "c64"))
        ),
    )
    row("wrk CPU at c64 (cores)", each(lambda e: fmt(_get(e, "usage", "c64", "client", "cpu_cores"), 2)))
    row(
        "machine busy at c64",
        each(lambda e: fmt(100 * (_get(e, "machine_busy", "c64") or float("nan")), 0, "%")),
    )
    row("other processes' CPU at c64 (cores)", each(lambda e: fmt(_get(e, "others_cores", "c64"), 2)))

    def drops(e: Any) -> str:
        per = e.get("log_stream_drops")
        if per is None:
            return "-"
        sent = sum(int(_get(e, "rps", c, "requests") or 0) for c in ("16", "64"))
        lost = int(per.get("c16", 0)) + int(per.get("c64", 0))
        return f"{lost:,} of {sent:,}"

    row("access-log records nginx could not send (c16 + c64)", each(drops))
    for s in systems:
        dp[s].pop("_groups", None)
    return lines


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    machine = meta.get("machine", {})
    params = meta.get("params", {})
    out: list[str] = [
        f"### Benchmark: {meta.get('date', '?')} ({meta.get('mode', '?')} run)",
        "",
        f"Machine: {machine.get('cpu_model', '?')}, {machine.get('cores', '?')} cores, "
        f"{machine.get('mem_gb', '?')} GB, {machine.get('os', '?')}, kernel {machine.get('kernel', '?')}. "
        f"Commit {meta.get('git_commit', '?')}{' (dirty tree)' if meta.get('git_dirty') else ''}. "
        f"{'; '.join(f'{k} {v}' for k, v in (meta.get('versions') or {}).items())}.",
        "",
        f"Same stand-in backend for all ({params.get('backend_processes')} processes, "
        f"tests/backends/stub_llm.py), same {params.get('body_bytes')} B chat request "
        f"(POST /v1/chat/completions, ~300 B answer), all on 127.0.0.1. Throughput: wrk -t2, "
        f"{params.get('duration_s')} s per run after a {params.get('warmup_s')} s warm-up. Latency: "
        f"wrk -t1 -c1 for {params.get('latency_s')} s, percentiles from wrk's histogram. SSE: "
        f"{params.get('stream_samples')} sequential streamed requests on one keep-alive connection, raw "
        f"socket client, 50 chunks {params.get('chunk_delay_ms')} ms apart; TTFB = first response byte.",
        "",
    ]
    out += data_plane_table(results)
    out += standin_sentence(results)
    static = results.get("static_backend") or {}
    if static.get("rows"):
        out += ["", "Data plane without Python in the path (a static nginx `return 200` backend, c64):", ""]
        out += ["| | requests/s c64 | p50 c1 (ms) | proxy CPU (cores) |", "|---|---|---|---|"]
        for row in static["rows"]:
            out.append(
                f"| {row['label']} | {rps_cell(row)} | {fmt(row.get('p50_ms'), 3)} | "
                f"{fmt(row.get('cpu_cores'), 2) if row.get('cpu_cores') is not None else '-'} |"
            )
        if static.get("ratio") is not None:
            how = pairs_clause(static.get("pair_ratios") or [], "the rows above are each side's median run")
            out.append(f"\nGateway / plain nginx with the static backend: {fmt(static['ratio'], 3)}x{how}.")
        if static.get("gateway_requests"):
            out.append(
                f"Access-log records the gateway's nginx could not send in those runs: "
                f"{static.get('log_stream_drops', 0):,} of {static['gateway_requests']:,}."
            )
    out += cost_lines(results)
    out += ["", "Targets (issues 5 and 11):", "", "| target | wanted | measured | |", "|---|---|---|---|"]
    for t in results.get("targets", []):
        out.append(f"| {t['name']} | {t['target']} | {t['measured']} | {_mark(t['met'])} |")
    cp = results.get("control_plane", {})
    if cp.get("scaling"):
        out += [
            "",
            "Control plane (reconcile = render + nginx -t + swap + HUP + wait until nginx serves it; "
            "through the admin API: import, then POST /admin/reload, its `duration_ms`):",
            "",
            "| instances / pools | reconcile ms (median) | of which render (in-process) | nginx -t | "
            "rendered tree | controller RSS |",
            "|---|---|---|---|---|---|",
        ]
        for s in cp["scaling"]:
            if s.get("error") and not s.get("reconcile_ms"):
                out.append(f"| {s['instances']} / {s['pools']} | failed: {s['error']} | | | | |")
                continue
            out.append(
                f"| {s['instances']:,} / {s['pools']} | {fmt(s.get('median_ms'), 0)} | "
                f"{fmt(s.get('render_ms'), 0)} ms | {fmt(s.get('nginx_t_ms'), 0)} ms | "
                f"{fmt(s.get('rendered_kb'), 0)} KB in {s.get('rendered_files')} files | "
                f"{fmt(s.get('controller_rss_mb'), 0)} MB |"
            )
        out += reconcile_split(cp["scaling"])
    probing = cp.get("probing")
    if probing and not probing.get("error"):
        out.append(f"\n{probing_sentence(probing)}")
    live = cp.get("api_to_live")
    if live:
        out.append(
            f"\nAdmin API change -> live (POST an instance for a new model, poll /v1/models on fresh "
            f"connections every 5 ms; {len(live.get('samples_ms', []))} changes, "
            f"{live.get('spacing_s')} s apart): p50 {fmt(live.get('p50_ms'), 0)} ms, "
            f"p95 {fmt(live.get('p95_ms'), 0)} ms, max {fmt(live.get('max_ms'), 0)} ms, "
            f"timeouts {live.get('timeouts')}."
        )
    rel = results.get("reliability", {})
    if rel:
        out += [
            "",
            "Reliability under load:",
            "",
            "| scenario | client | requests | failed |",
            "|---|---|---|---|",
        ]
        for key, title in (("reload_storm", "reload every 0.5 s"), ("kill_one", "1 of 3 instances killed")):
            scenario = rel.get(key) or {}
            if scenario.get("error"):
                out.append(f"| {title} | - | - | error: {scenario['error']} |")
            for ckey, client in (
                ("wrk", "wrk (no retries)"),
                ("sdk_raw", "openai SDK, max_retries=0"),
                ("sdk_retrying", "openai SDK, default retries"),
            ):
                c = scenario.get(ckey)
                if c:
                    detail = {k: v for k, v in (c.get("errors") or {}).items() if v}
                    extra = f" ({', '.join(f'{k} {v}' for k, v in detail.items())})" if detail else ""
                    out.append(f"| {title} | {client} | {c.get('requests')} | {c.get('failed')}{extra} |")
            if scenario.get("reloads") is not None:
                out.append(
                    f"| {title} | (admin reloads done) | {scenario['reloads']} | "
                    f"{scenario.get('reload_errors', 0)} |"
                )
    feats = results.get("features") or []
    if feats:
        out += ["", "Gateway features during the runs:", ""]
        out += [f"- {f['name']}: **{f['state']}** ({f['how']})" for f in feats]
    again = {
        k: e.get("remeasured") for k, e in (results.get("data_plane") or {}).items() if e.get("remeasured")
    }
    if again:
        out += [
            "",
            "Measured twice because other processes took more than 0.25 cores during the first try (the less "
            "disturbed try is kept): " + "; ".join(f"{k} {sorted(v)}" for k, v in again.items()) + ".",
        ]
    notes = results.get("notes") or []
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


README_BEGIN = "<!-- bench:begin (written by scripts/bench.sh --readme) -->"
README_END = "<!-- bench:end -->"


def readme_block(results: dict[str, Any]) -> str:
    """The figures the README shows: the data-plane table, the targets, control plane and reloads in brief."""
    meta = results.get("meta", {})
    machine = meta.get("machine", {})
    command = "scripts/bench.sh" + (" --quick" if meta.get("mode") == "quick" else "")
    out = [
        README_BEGIN,
        f"Last run: {meta.get('date', '?')}, `{command}`, {machine.get('cpu_model', '?')} "
        f"({machine.get('cores', '?')} cores), {machine.get('os', '?')}, commit {meta.get('git_commit', '?')}"
        f"{' + local changes' if meta.get('git_dirty') else ''}. Full report: `bench/results/latest.md`.",
        "",
    ]
    out += data_plane_table(results)
    out += standin_sentence(results)
    out += ["", "| target (issues 5 and 11) | wanted | measured | |", "|---|---|---|---|"]
    for t in results.get("targets", []):
        out.append(f"| {t['name']} | {t['target']} | {t['measured']} | {_mark(t['met'])} |")
    cp = results.get("control_plane", {})
    scaling = cp.get("scaling") or []
    if scaling:
        parts = [
            f"{s['instances']:,} instances / {s['pools']} pools {fmt(s.get('median_ms'), 0)} ms "
            f"({fmt(s.get('rendered_kb'), 0)} KB rendered)"
            for s in scaling
            if s.get("reconcile_ms")
        ]
        thousand: dict[str, Any] = next((s for s in scaling if s.get("instances") == 1000), {})
        out += [
            "",
            "Reconcile (render + `nginx -t` + swap + reload + live): " + "; ".join(parts) + ". "
            f"Controller RSS with 1,000 instances: {fmt(thousand.get('controller_rss_mb'), 0)} MB.",
        ]
    probing = cp.get("probing")
    if probing and not probing.get("error"):
        out += ["", probing_sentence(probing)]
    out += cost_lines(results)
    storm = (results.get("reliability") or {}).get("reload_storm") or {}
    if storm.get("wrk"):
        wrk, raw, sdk = storm["wrk"], storm["sdk_raw"], storm["sdk_retrying"]
        out.append("")
        out.append(
            f"Reload every 0.5 s under load: wrk (no retries) {wrk['failed']} failed of "
            f"{wrk['requests']:,}; openai SDK without retries {raw['failed']} of {raw['requests']:,}; "
            f"with its default retries {sdk['failed']} of {sdk['requests']:,}."
        )
    out.append(README_END)
    return "\n".join(out)


def update_readme(path: Any, results: dict[str, Any]) -> bool:
    """Replace the block between the markers inside README's "## Performance" section; nothing else."""
    text = path.read_text()
    section = text.find("\n## Performance")
    if section < 0:
        return False
    end = text.find("\n## ", section + 1)
    end = len(text) if end < 0 else end
    begin = text.find(README_BEGIN, section, end)
    stop = text.find(README_END, section, end)
    if begin < 0 or stop < 0:
        return False
    path.write_text(text[:begin] + readme_block(results) + text[stop + len(README_END) :])
    return True
