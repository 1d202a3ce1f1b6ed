"""Control-plane figures, driven through the admin API of a running gateway: reconcile time at
10 / 100 / 1,000 / 10,000 instances (with the pass's split: gather, build spec, render, checksum, write,
nginx -t, reload, live), rendered size, controller RSS, API change -> live, and what probing costs."""

from __future__ import annotations

import http.client
import json
import ssl
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from control_plane.registry.models import InstanceConfig, InstanceState, RoutingConfig
from control_plane.render.nginx import render
from control_plane.render.spec import World, build_spec
from scripts.bench.load import percentile
from scripts.bench.procs import CLK_TCK, read_stat, vm_status
from scripts.bench.systems import GatewaySystem

SETTLE_ROUNDS = 4  # probe rounds before probing's cost is measured (probe_cost)
RELOAD_GAP_S = 0.6  # > reload_min_interval_s (0.5), so no measurement includes the reload rate limit


def instances(
    count: int, pools: int, backend_url: str, weight: int = 1, prefix: str = "cp"
) -> list[dict[str, Any]]:
    return [
        {
            "name": f"{prefix}-{i:04d}",
            "provider_type": "openai_compatible",
            "api_base": f"{backend_url}/v1",
            "supported_models": [f"{prefix}-model-{i % pools:03d}"],
            "weight": weight,
            "retry_count": 2,
            "max_rpm": 10**8,
        }
        for i in range(count)
    ]


@dataclass
class ScaleResult:
    instances: int
    pools: int
    reconcile_ms: list[float] = field(default_factory=list)  # forced reconcile after the change (admin API)
    phases: list[dict[str, float]] = field(default_factory=list)  # each of those passes' phases_ms
    loop_reconcile_ms: float | None = None  # the loop's own pass, when /admin/status showed it
    import_ms: float = 0.0
    render_ms: float = 0.0  # in-process build_spec + render
    nginx_t_ms: float = 0.0
    rendered_kb: float = 0.0
    rendered_files: int = 0
    upstreams: int = 0
    controller_rss_mb: float = 0.0
    controller_hwm_mb: float = 0.0
    error: str | None = None

    @property
    def median_ms(self) -> float | None:
        return round(statistics.median(self.reconcile_ms), 1) if self.reconcile_ms else None

    @property
    def phase_medians(self) -> dict[str, float]:
        """Per phase of the pass (in the controller's order), the median over the repetitions."""
        names = list(dict.fromkeys(name for phases in self.phases for name in phases))
        return {name: round(statistics.median(p.get(name, 0.0) for p in self.phases), 1) for name in names}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["median_ms"] = self.median_ms
        data["phase_medians_ms"] = self.phase_medians
        return data


def _wait_gap(since: float) -> None:
    time.sleep(max(0.0, since + RELOAD_GAP_S - time.monotonic()))


def in_process_render(docs: list[dict[str, Any]], server: Any) -> tuple[float, int, int]:
    """build_spec + render of the same registry, in this process: (ms, bytes, files)."""
    configs = [InstanceConfig.model_validate(d) for d in docs]
    world = World(
        instances=tuple((c, InstanceState()) for c in configs),
        routing=RoutingConfig(),
        now=datetime.now(UTC),
        generation=1,
        addresses={"127.0.0.1": ("127.0.0.1",)},
        secrets={},
    )
    best = float("inf")
    size = files = 0
    for _ in range(3):
        started = time.perf_counter()
        tree = render(build_spec(world, server))
        best = min(best, (time.perf_counter() - started) * 1000)
        size = sum(len(t.encode()) for t in tree.files.values())
        files = len(tree.files)
    return round(best, 1), size, files


def nginx_t_ms(system: GatewaySystem) -> float:
    prefix = system.gw.home / "nginx"
    conf = system.live_dir() / "nginx.conf"
    started = time.perf_counter()
    subprocess.run(
        ["nginx", "-p", f"{prefix}/", "-t", "-q", "-c", str(conf)], capture_output=True, check=False
    )
    return round((time.perf_counter() - started) * 1000, 1)


def reconcile_scaling(
    system: GatewaySystem, backend_url: str, sizes: list[tuple[int, int]], reps: int, server: Any
) -> list[ScaleResult]:
    admin = system.gw.admin
    results: list[ScaleResult] = []
    last_reload = time.monotonic()
    for count, pools in sizes:
        result = ScaleResult(instances=count, pools=pools)
        results.append(result)
        try:
            for rep in range(reps):
                docs = instances(count, pools, backend_url, weight=1 + (rep % 2))
                _wait_gap(last_reload)
                started = time.perf_counter()
                response = admin.post(
                    "/admin/config/import?mode=replace",
                    json={"version": 1, "instances": docs},
                    timeout=120,
                )
                response.raise_for_status()
                result.import_ms = round((time.perf_counter() - started) * 1000, 1)
                # The import answers once its own pass reloaded nginx (read your writes): the forced pass
                # below waits RELOAD_GAP_S after it, or its time would include the reload rate limit.
                _wait_gap(time.monotonic())
                # A forced pass of the same registry: the answer is that pass's own timing.
                answer = admin.post("/admin/reload", timeout=120)
                last_reload = time.monotonic()
                body = answer.json()
                if answer.status_code != 200 or not body.get("ok"):
                    raise RuntimeError(f"reload failed: {answer.status_code} {body}")
                result.reconcile_ms.append(float(body["duration_ms"]))
                result.phases.append({k: float(v) for k, v in (body.get("phases_ms") or {}).items()})
            status = system.gw.status()
            loop = status.get("last_reload") or {}
            if loop.get("changed"):
                result.loop_reconcile_ms = float(loop["duration_ms"])
            live = system.live_dir()
            text = system.live_text()
            result.rendered_kb = round(sum(p.stat().st_size for p in live.glob("*") if p.is_file()) / 1024, 1)
            result.rendered_files = sum(1 for p in live.glob("*") if p.is_file())
            result.upstreams = text.count("\nupstream ")
            result.nginx_t_ms = nginx_t_ms(system)
            result.render_ms, _, _ = in_process_render(docs, server)
            pids = system.controller_pids()
            if pids:
                vm = vm_status(pids[0])
                result.controller_rss_mb = round(vm.get("VmRSS", 0) / 2**20, 1)
                result.controller_hwm_mb = round(vm.get("VmHWM", 0) / 2**20, 1)
        except Exception as exc:  # reported, the run goes on
            result.error = f"{type(exc).__name__}: {exc}"
    return results


@dataclass
class ProbeCost:
    """The controller's CPU while it probes a registry of idle instances (no data-plane traffic), and
    how many probes it completed in that window (ishgw_probes_total)."""

    instances: int
    seconds: float
    probes: int
    controller_cores: float
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["probes_per_s"] = round(self.probes / self.seconds, 1) if self.seconds else None
        return data


def probes_total(system: GatewaySystem) -> float:
    """The sum of ishgw_probes_total over every instance and outcome, from the controller's /metrics."""
    text = system.gw.admin.get("/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("ishgw_probes_total{")
    )


def probe_cost(system: GatewaySystem, instances: int, seconds: float) -> ProbeCost:
    """Controller CPU over `seconds` (at least one probe interval) with `instances` registered, after as
    long again to settle: new instances are probed within a second of their import, and their first
    verdicts (healthy after `rise` probes) cost reconciles that are not the price of probing."""
    result = ProbeCost(instances=instances, seconds=seconds, probes=0, controller_cores=0.0)
    pids = system.controller_pids()
    if not pids:
        result.error = "controller not running"
        return result
    # Instances never probed before (imported with probes off) get their first verdicts in the first
    # rounds, written in batches (about 40 s of writes at 10,000): SETTLE_ROUNDS rounds of probes first.
    first = probes_total(system)
    deadline = time.monotonic() + 180
    while probes_total(system) - first < SETTLE_ROUNDS * instances and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(seconds)  # settling, as above
    before, probed = read_stat(pids[0]), probes_total(system)
    started = time.monotonic()
    time.sleep(seconds)  # a measuring window, not a wait for a condition
    after, elapsed = read_stat(pids[0]), time.monotonic() - started
    result.probes = round(probes_total(system) - probed)
    if before is None or after is None:
        result.error = "controller exited"
        return result
    result.seconds = round(elapsed, 1)
    result.controller_cores = round((after.ticks - before.ticks) / CLK_TCK / elapsed, 3)
    return result


class NotAllowed(RuntimeError):
    """The gateway refused the poll itself (auth): waiting longer cannot help."""


def _models_listed(port: int, model: str, api_key: str, tls: bool) -> bool:
    conn: http.client.HTTPConnection
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        headers = {"Connection": "close", "Authorization": f"Bearer {api_key}"}
        conn.request("GET", "/v1/models", headers=headers)
        response = conn.getresponse()
        body = response.read()
        if response.status in (401, 403):
            raise NotAllowed(f"GET /v1/models -> {response.status}: {body[:200]!r}")
        data = json.loads(body or b"{}")
        return any(item.get("id") == model for item in data.get("data", []))
    finally:
        conn.close()


@dataclass
class LiveResult:
    changes: int
    samples_ms: list[float]
    timeouts: int
    spacing_s: float

    def to_dict(self) -> dict[str, Any]:
        ms = self.samples_ms
        return {
            "changes": self.changes,
            "timeouts": self.timeouts,
            "spacing_s": self.spacing_s,
            "p50_ms": round(percentile(ms, 50), 1) if ms else None,
            "p95_ms": round(percentile(ms, 95), 1) if ms else None,
            "max_ms": round(max(ms), 1) if ms else None,
            "samples_ms": [round(x, 1) for x in ms],
        }


def api_change_to_live(
    system: GatewaySystem,
    backend_url: str,
    changes: int,
    api_key: str,
    tls: bool = False,
    timeout_s: float = 10.0,
    max_seconds: float = 120.0,
) -> LiveResult:
    """POST an instance for a new model; poll the gateway's /v1/models (fresh connection, every 5 ms;
    over HTTPS when `tls`)
    until the model is listed. Changes are spaced by RELOAD_GAP_S after the previous one went live."""
    admin = system.gw.admin
    samples: list[float] = []
    timeouts = 0
    stamp = int(time.time()) % 100000
    last_live = time.monotonic()
    deadline = time.monotonic() + max_seconds
    for i in range(changes):
        if time.monotonic() > deadline:
            break
        _wait_gap(last_live)
        model = f"live-{stamp}-{i:03d}"
        config = {
            "name": f"live-{stamp}-{i:03d}",
            "provider_type": "openai_compatible",
            "api_base": f"{backend_url}/v1",
            "supported_models": [model],
        }
        started = time.perf_counter()
        response = admin.post("/admin/instances", json=config)
        if response.status_code != 201:
            raise RuntimeError(f"POST /admin/instances -> {response.status_code}: {response.text}")
        until = time.monotonic() + timeout_s
        seen = False
        while time.monotonic() < until:
            try:
                port = system.https_port if tls else system.gw.http_port
                if _models_listed(port, model, api_key, tls):
                    seen = True
                    break
            except (OSError, ValueError, http.client.HTTPException):
                pass
            time.sleep(0.005)
        last_live = time.monotonic()
        if seen:
            samples.append((time.perf_counter() - started) * 1000)
        else:
            timeouts += 1
    return LiveResult(changes=changes, samples_ms=samples, timeouts=timeouts, spacing_s=RELOAD_GAP_S)
