"""The controller at scale over time (issue 17): `python -m scripts.bench.steady [--instances 10000]`.

Starts a stand-in backend and a gateway (probes on at the default interval, production reload interval),
imports `--instances` instances in one call, then for `--minutes`:
- bounded chat traffic through nginx (`--rps`, at most rps x seconds requests), so the log stream flows;
- every `--every` seconds the controller's RSS and its CPU over the interval (/proc/<pid>/stat, utime +
  stime);
- during the first two probe intervals after the import, the controller's CPU in each second (the
  spread: a thundering herd shows as a peak far above the mean); the probes completed over the whole
  run from two reads of ishgw_probes_total (a scrape of /metrics at 10,000 instances is itself costly);
then `--flips` health changes of one instance among them (its own stand-in told to fail, then to answer,
and an explicit check: POST /admin/instances/{name}/check), each timed from the check to nginx's /health
answering the new checksum. Prints the samples and a summary. Everything started is stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from scripts.bench import control
from scripts.bench.common import log
from scripts.bench.load import percentile
from scripts.bench.procs import CLK_TCK, Procs, read_stat, vm_status
from scripts.bench.systems import Backend, GatewaySystem

FLIP = "flip-0"


@dataclass
class Sample:
    at_s: float
    rss_mb: float
    cores: float
    requests: int

    def line(self) -> str:
        return (
            f"{self.at_s:7.0f} s  RSS {self.rss_mb:6.1f} MB  CPU {self.cores:5.3f} cores  "
            f"requests sent {self.requests}"
        )


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def rss_mb(pid: int) -> float:
    return round(vm_status(pid).get("VmRSS", 0) / 2**20, 1)


class Traffic:
    """Chat requests at about `rps` for at most `seconds`, spread over the models (bounded in count and
    time); counts what was sent and what failed."""

    def __init__(self, base: str, models: list[str], rps: float, seconds: float) -> None:
        self.base, self.models, self.rps, self.seconds = base, models, rps, seconds
        self.sent = self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        limit = int(self.rps * self.seconds)
        started = time.monotonic()
        with httpx.Client(base_url=self.base, timeout=10) as client:
            while self.sent < limit and not self.stop.is_set():
                if time.monotonic() - started > self.seconds:
                    break
                model = self.models[self.sent % len(self.models)]
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                try:
                    ok = client.post("/v1/chat/completions", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.sent += 1
                self.failed += not ok
                self.stop.wait(max(0.0, started + self.sent / self.rps - time.monotonic()))


def cpu_per_second(pid: int, seconds: float) -> list[float]:
    """The controller's CPU (cores) in each second for `seconds`, from /proc alone (a scrape of /metrics
    at 10,000 instances costs the controller more than what it would measure): probes fired at once show
    as a peak far above the mean."""
    per_second: list[float] = []
    last = read_stat(pid)
    tick = time.monotonic()
    for _ in range(int(seconds)):
        tick += 1.0
        time.sleep(max(0.0, tick - time.monotonic()))  # a sampling period, not a wait for a condition
        now = read_stat(pid)
        if last is None or now is None:
            raise RuntimeError("controller exited")
        per_second.append(round((now.ticks - last.ticks) / CLK_TCK, 2))
        last = now
    return per_second


def _health_checksum(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health", headers={"Connection": "close"})
        return str(json.loads(conn.getresponse().read()).get("checksum"))
    finally:
        conn.close()


def _until_checksum_changes(port: int, before: str, timeout_s: float) -> float | None:
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
            if _health_checksum(port) != before:
                return (time.perf_counter() - started) * 1000
        time.sleep(0.005)
    return None


def set_mode(stub_url: str, mode: str) -> None:
    """The stand-in's fault mode (POST /_control, tests/backends/stub_llm.py)."""
    httpx.post(f"{stub_url}/_control", json={"mode": mode}, timeout=5).raise_for_status()


def last_phases(system: GatewaySystem) -> dict[str, float]:
    """The split of the controller's last pass (/admin/status last_reload.phases_ms)."""
    body = system.gw.admin.get("/admin/status", params={"limit": 1}, timeout=60).json()
    last = body.get("last_reload") or {}
    phases = {k: float(v) for k, v in (last.get("phases_ms") or {}).items()}
    phases["incremental"] = 1.0 if last.get("incremental") else 0.0  # (its median says which most were)
    return phases


def phase_summary(passes: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per phase (in the controller's order): median and p95 over the passes."""
    names = list(dict.fromkeys(name for phases in passes for name in phases))
    return {
        name: {
            "p50": round(percentile([p.get(name, 0.0) for p in passes], 50), 1),
            "p95": round(percentile([p.get(name, 0.0) for p in passes], 95), 1),
        }
        for name in names
    }


def flips(
    system: GatewaySystem,
    stub_url: str,
    count: int,
    timeout_s: float = 15.0,
    passes: list[dict[str, float]] | None = None,
) -> list[float | None]:
    """`count` health changes of FLIP (down, up, down, ...): the stand-in fails (or answers), an explicit
    check records the verdict, and the time from that check to nginx serving a new checksum is taken.
    Each change waits RELOAD_GAP_S after the previous one went live (the reload rate limit). The split of
    each change's pass is appended to ``passes`` when given."""
    admin, port = system.gw.admin, system.gw.http_port
    samples: list[float | None] = []
    last_live = time.monotonic()
    for i in range(count):
        down = i % 2 == 0
        set_mode(stub_url, "fail" if down else "ok")
        time.sleep(max(0.0, last_live + control.RELOAD_GAP_S - time.monotonic()))
        before = _health_checksum(port)
        started = time.perf_counter()
        response = admin.post(f"/admin/instances/{FLIP}/check", timeout=120)
        if response.status_code != 200:
            raise RuntimeError(f"check -> {response.status_code}: {response.text}")
        waited = _until_checksum_changes(port, before, timeout_s)
        samples.append(None if waited is None else (time.perf_counter() - started) * 1000)
        last_live = time.monotonic()
        if passes is not None and waited is not None:
            passes.append(last_phases(system))
    return samples


@contextlib.contextmanager
def gateway(work: Path, backends: int, keep: bool = False) -> Iterator[tuple[Procs, Backend, GatewaySystem]]:
    procs = Procs(None)
    system: GatewaySystem | None = None
    try:
        backend = Backend(procs, work, backends, 1, 0, name="steady")
        env = {"ISHGW_RELOAD_MIN_INTERVAL_S": "0.5", "ISHGW_NGINX_WORKER_PROCESSES": "2"}
        system = GatewaySystem(procs, env)
        yield procs, backend, system
    finally:
        if system is not None:
            system.stop(keep)
            if keep:
                log(f"kept the controller's home (controller.log, registry): {system.gw.home}")
        procs.stop_all()


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ishgw-steady-", dir="/tmp"))
    result: dict[str, Any] = {"instances": args.instances, "pools": args.pools, "load_average": {}}
    try:
        with gateway(work, args.backend_processes, args.keep) as (procs, backend, system):
            flip_stub = Backend(procs, work, 1, 1, 0, name="flip")
            docs = control.instances(args.instances - 2, args.pools, backend.url)
            for doc in docs:
                doc["discover_models"] = False
            models = sorted({d["supported_models"][0] for d in docs})  # the traffic's, not the flip's
            flip = {"provider_type": "openai_compatible", "supported_models": ["flip-model"]}
            docs.append({**flip, "name": "flip-1", "api_base": f"{backend.url}/v1", "discover_models": False})
            docs.append(
                {
                    **flip,
                    "name": FLIP,
                    "api_base": f"{flip_stub.url}/v1",
                    "discover_models": False,
                    # Only the explicit checks change its verdict: a scheduled probe racing the check
                    # would make the change live before the time is taken (a check that changes nothing).
                    "health": {"rise": 1, "fall": 1, "probe_interval_s": 3600},
                }
            )
            started = time.perf_counter()
            response = system.gw.admin.post(
                "/admin/config/import?mode=replace", json={"version": 1, "instances": docs}, timeout=300
            )
            response.raise_for_status()
            log(f"imported {len(docs)} instances in {time.perf_counter() - started:.1f} s")
            system.gw.wait_applied(timeout=120)
            system.adopt_nginx()
            (pid,) = system.controller_pids()
            spread_s = 2 * 10.0  # two default probe intervals
            log(f"controller CPU per second over the first {spread_s:.0f} s (load average {load_average()})")
            per_second = cpu_per_second(pid, spread_s)
            result["cpu_per_second"] = {
                "cores": per_second,
                "first_interval_max": max(per_second[:10]),
                "first_interval_mean": round(statistics.mean(per_second[:10]), 3),
                "second_interval_max": max(per_second[10:]),
                "second_interval_mean": round(statistics.mean(per_second[10:]), 3),
            }
            log(f"cores per second: {per_second}")
            traffic = Traffic(system.http_url, models, args.rps, args.minutes * 60)
            traffic.thread.start()
            samples: list[Sample] = []
            begin = time.monotonic()
            stat, first_probed, first_at = read_stat(pid), control.probes_total(system), time.monotonic()
            try:
                while time.monotonic() - begin < args.minutes * 60:
                    time.sleep(args.every)  # a sampling period, not a wait for a condition
                    now_stat = read_stat(pid)
                    if stat is None or now_stat is None:
                        raise RuntimeError("controller exited")
                    seconds = args.every
                    sample = Sample(
                        at_s=round(time.monotonic() - begin),
                        rss_mb=rss_mb(pid),
                        cores=round((now_stat.ticks - stat.ticks) / CLK_TCK / seconds, 3),
                        requests=traffic.sent,
                    )
                    stat = now_stat
                    samples.append(sample)
                    log(sample.line() + f"  (load average {load_average()})")
            finally:
                traffic.stop.set()
                traffic.thread.join(15)
            result["samples"] = [vars(s) for s in samples]
            result["probes_per_s"] = round(
                (control.probes_total(system) - first_probed) / (time.monotonic() - first_at), 1
            )
            result["requests"] = {"sent": traffic.sent, "failed": traffic.failed}
            if args.flips:
                log(f"--- {args.flips} health changes of {FLIP} (load average {load_average()})")
                passes: list[dict[str, float]] = []
                try:
                    ms = flips(system, flip_stub.url, args.flips, passes=passes)
                except (httpx.HTTPError, RuntimeError) as exc:  # reported beside what was measured
                    result["flips"] = {"error": f"{type(exc).__name__}: {exc}"}
                else:
                    done = [m for m in ms if m is not None]
                    result["flips"] = {
                        "samples_ms": [round(m, 1) for m in done],
                        "timeouts": len(ms) - len(done),
                        "p50_ms": round(percentile(done, 50), 1) if done else None,
                        "p95_ms": round(percentile(done, 95), 1) if done else None,
                        "max_ms": round(max(done), 1) if done else None,
                        "phases_ms": phase_summary(passes),
                    }
                log(f"health change -> live: {result['flips']}")
            result["load_average"]["end"] = load_average()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def summary(result: dict[str, Any]) -> str:
    lines = [f"{result['instances']} instances / {result['pools']} pools"]
    spread = result.get("cpu_per_second")
    if spread:
        lines.append(
            f"controller CPU per second, first interval after import: max {spread['first_interval_max']}, "
            f"mean {spread['first_interval_mean']}; second: max {spread['second_interval_max']}, "
            f"mean {spread['second_interval_mean']}"
        )
    for s in result.get("samples", []):
        lines.append(Sample(**s).line())
    samples = result.get("samples", [])
    if samples:
        cores = [s["cores"] for s in samples]
        lines.append(
            f"RSS first {samples[0]['rss_mb']} MB, last {samples[-1]['rss_mb']} MB, max "
            f"{max(s['rss_mb'] for s in samples)} MB; CPU median {statistics.median(cores):.3f} cores, "
            f"max {max(cores):.3f}"
        )
    if "probes_per_s" in result:
        lines.append(f"probes completed: {result['probes_per_s']}/s over the sampled minutes")
    if "requests" in result:
        lines.append(f"requests: {result['requests']}")
    if "flips" in result and "error" in result["flips"]:
        lines.append(f"health change -> live: {result['flips']['error']}")
    elif "flips" in result:
        f = result["flips"]
        lines.append(
            f"health change -> live: p50 {f['p50_ms']} ms, p95 {f['p95_ms']} ms, max {f['max_ms']} ms, "
            f"timeouts {f['timeouts']}"
        )
        split = ", ".join(f"{k} {v['p50']}/{v['p95']}" for k, v in f.get("phases_ms", {}).items())
        lines.append(f"its passes' split (ms, p50/p95): {split}")
    lines.append(f"load average at the end: {result['load_average'].get('end')}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench.steady", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--pools", type=int, default=1_000)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--every", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--rps", type=float, default=20.0, help="chat requests per second through nginx")
    parser.add_argument("--flips", type=int, default=20, help="health changes of one instance to time")
    parser.add_argument("--backend-processes", type=int, default=1)
    parser.add_argument("--out", default="", help="also write the result as JSON here")
    parser.add_argument(
        "--keep", action="store_true", help="keep the controller's home (its log, the registry) after the run"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
