"""The benchmark driver (issue 5): run by scripts/bench.sh, or `python -m scripts.bench [--quick]`.

One run, one stand-in backend, one request body: direct, plain nginx, the gateway (TLS off and on) and
LiteLLM's proxy; then reliability under reloads and instance loss, then control-plane scale.
Writes bench/results/latest.json and latest.md and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import httpx

from scripts.bench import control, features, instructions, load, report
from scripts.bench.procs import Group, Procs, Sampler, children_named
from scripts.bench.systems import (
    ROOT,
    Backend,
    GatewaySystem,
    LiteLLM,
    PlainNginx,
    Target,
)

DUMMY_KEY = "sk-bench-client-0123456789"
SYSLOG_DROP = "send() to syslog failed"  # nginx could not hand a log line to the controller
NOISE_CORES = 0.25  # CPU taken by processes outside the benchmark above which a measurement is repeated
T = TypeVar("T")


@dataclass(frozen=True)
class Profile:
    mode: str
    warmup_s: float
    duration_s: float
    latency_s: float
    stream_samples: int
    static_s: float
    storm_s: float
    kill_s: float
    live_changes: int
    scale_reps: int
    sizes: tuple[tuple[int, int], ...]
    budget_s: float
    probe_window_s: float  # at least one probe interval (10 s by default)


SIZES = ((10, 10), (100, 50), (1000, 200))
LARGE = (10_000, 1_000)  # issue 17: the full run only, medians of 5
FULL = Profile("full", 2, 10, 10, 100, 6, 15, 12, 50, 5, (*SIZES, LARGE), 1020, 20)
QUICK = Profile("quick", 1, 2, 2, 15, 2, 4, 4, 10, 1, SIZES, 170, 10)
LITELLM_WARMUP_S = 6  # its first requests import modules lazily


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def log(message: str) -> None:
    print(f"{datetime.now().strftime('%H:%M:%S')} [bench] {message}", file=sys.stderr, flush=True)


def _sh(*cmd: str) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (proc.stdout + proc.stderr).strip()


def machine_info() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    os_name = "?"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "mem_gb": round(mem_kb / 2**20, 1),
        "os": os_name,
        "kernel": platform.release(),
    }


def versions() -> dict[str, str]:
    nginx = _sh("nginx", "-v").replace("nginx version: ", "")
    lua = _sh("dpkg-query", "-W", "-f=${Version}", "libnginx-mod-http-lua")
    wrk = _sh("dpkg-query", "-W", "-f=${Version}", "wrk")
    return {"nginx": nginx, "lua module": lua, "wrk": wrk, "python": platform.python_version()}


# ---------------------------------------------------------------------------------------- measuring


class Bench:
    def __init__(self, args: argparse.Namespace, profile: Profile) -> None:
        self.args = args
        self.p = profile
        self.budget = Budget(profile.budget_s)
        self.work = Path(tempfile.mkdtemp(prefix="ishgw-bench-", dir="/tmp"))
        pid_file = Path(args.pid_file) if args.pid_file else None
        self.procs = Procs(pid_file)
        self.sampler = Sampler()
        self.sampler.add(Group("client", lambda: children_named(os.getpid(), "wrk")))
        self.sampler.add(Group("driver", lambda: [os.getpid()], recursive=False))
        self.results: dict[str, Any] = {
            "meta": {},
            "features": [],
            "data_plane": {},
            "static_backend": {},
            "reliability": {},
            "control_plane": {},
            "targets": [],
            "notes": [],
        }
        self.backend: Backend | None = None
        self.nginx: PlainNginx | None = None
        self.gateway: GatewaySystem | None = None
        self.litellm: LiteLLM | None = None
        self.gateway_key: str = DUMMY_KEY
        self.gateway_env: dict[str, str] = {}
        self.scripts: dict[str, Path] = {}

    def note(self, text: str) -> None:
        log("note: " + text)
        self.results["notes"].append(text)

    # --- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        body = load.chat_body()
        self.results["meta"] = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "mode": self.p.mode,
            "git_commit": _sh("git", "rev-parse", "--short=12", "HEAD") or "?",
            "git_dirty": bool(_sh("git", "status", "--porcelain", "--untracked-files=no")),
            "machine": machine_info(),
            "versions": versions(),
            "params": {
                "backend_processes": self.args.backend_processes,
                "body_bytes": len(body),
                "duration_s": self.p.duration_s,
                "warmup_s": self.p.warmup_s,
                "latency_s": self.p.latency_s,
                "stream_samples": self.p.stream_samples,
                "chunk_delay_ms": self.args.chunk_delay_ms,
                "nginx_workers": "auto",
            },
        }
        log(f"work dir {self.work}")
        self.backend = Backend(
            self.procs, self.work, self.args.backend_processes, 50, self.args.chunk_delay_ms
        )
        backend = self.backend
        self.sampler.add(Group("backend", backend.pids))
        log(f"stand-in backend on :{backend.port} ({backend.processes} processes)")
        self.nginx = PlainNginx(self.procs, self.work, backend.port, "auto", static=True)
        log(f"plain nginx on :{self.nginx.port}, static backend :{self.nginx.static_port}")
        self.start_gateway()
        self.start_litellm()
        self.scripts["default"] = load.write_wrk_script(self.work / "post.lua", body, DUMMY_KEY)
        self.scripts["gateway"] = load.write_wrk_script(self.work / "post-gw.lua", body, self.gateway_key)
        self.scripts["litellm"] = load.write_wrk_script(
            self.work / "post-litellm.lua", body, LiteLLM.MASTER_KEY
        )
        static_body = load.chat_body(model="static-model")
        self.scripts["static"] = load.write_wrk_script(self.work / "static.lua", static_body, DUMMY_KEY)
        self.scripts["static-gw"] = load.write_wrk_script(
            self.work / "static-gw.lua", static_body, self.gateway_key
        )

    def start_gateway(self) -> None:
        assert self.backend is not None and self.nginx is not None
        from control_plane.settings import Settings

        env, notes = features.settings_env()
        self.gateway_env = env
        defaults = Settings.model_fields
        # production timing, not the test harness's faster reload interval
        env["ISHGW_RELOAD_MIN_INTERVAL_S"] = str(defaults["reload_min_interval_s"].default)
        env["ISHGW_NGINX_WORKER_PROCESSES"] = "auto"
        self.gateway = GatewaySystem(self.procs, env)
        gw = self.gateway
        self.sampler.add(Group("nginx-gw", gw.nginx_pids))
        self.sampler.add(Group("controller", gw.controller_pids))
        common = {"provider_type": "openai_compatible", "retry_count": 2, "max_rpm": 10**8, "max_tpm": 10**10}
        for name, port, model in (
            ("bench-a", self.backend.port, load.MODEL),
            ("bench-b", self.backend.port, load.MODEL),
            ("static-a", self.nginx.static_port, "static-model"),
            ("static-b", self.nginx.static_port, "static-model"),
        ):
            response = gw.gw.add_instance(
                name=name, api_base=f"http://127.0.0.1:{port}/v1", supported_models=[model], **common
            )
            if response.status_code != 201:
                raise RuntimeError(f"registering {name}: {response.status_code} {response.text}")
        key, key_feature = features.create_client_key(gw.gw.admin)
        if key:
            self.gateway_key = key
        gw.gw.wait_applied(timeout=20)
        gw.adopt_nginx()
        live = gw.live_text()
        evidence = features.live_features(live)
        values = features.rendered_values(live)
        feats: list[features.Feature] = []
        for name, present in evidence.items():
            how = "seen in the rendered nginx tree" if present else "not in the rendered nginx tree"
            if name.startswith("retries") and present:
                how = (
                    f"2 instances per model, retry_count 2: proxy_next_upstream "
                    f"{values.get('proxy_next_upstream', '?')}, "
                    f"tries {values.get('proxy_next_upstream_tries')}"
                )
            if name.startswith("TLS") and present:
                how = "self-signed RSA 2048 cert in $ISHGW_HOME/ssl, ISHGW_HTTPS_PORT set"
            feats.append(features.Feature(name, "on" if present else "not in this build", how))
        feats.append(key_feature)
        feats.append(
            features.Feature("instance max_rpm / max_tpm", "set high", "10^8 / 10^10 on every instance")
        )
        for text in notes:
            feats.append(features.Feature("setting", "on", text))
        unknown = features.unknown_settings()
        if unknown:
            feats.append(
                features.Feature("other boolean settings, off by default", "left off", ", ".join(unknown))
            )
        self.results["features"] = [f.to_dict() for f in feats]
        for f in feats:
            log(f"feature: {f.name}: {f.state} ({f.how})")
        log(f"gateway http :{gw.gw.http_port} https :{gw.https_port} admin :{gw.gw.admin_port}")

    def start_litellm(self) -> None:
        assert self.backend is not None
        if self.args.skip_litellm:
            self.note(f"LiteLLM proxy not measured: {self.args.skip_litellm}")
            return
        try:
            self.litellm = LiteLLM(
                self.procs,
                self.work,
                Path(self.args.litellm_venv),
                self.backend.url,
                load.MODEL,
                workers=self.args.litellm_workers,
                timeout=120,
            )
        except Exception as exc:
            self.note(f"LiteLLM proxy could not be started: {type(exc).__name__}: {str(exc)[-500:]}")
            self.litellm = None
            return
        self.sampler.add(Group("litellm", self.litellm.pids))
        self.results["meta"]["versions"]["litellm"] = self.litellm.version
        log(
            f"LiteLLM {self.litellm.version} on :{self.litellm.port} ({self.args.litellm_workers} workers), "
            f"ready after {self.litellm.startup_s} s"
        )

    def targets(self) -> list[tuple[Target, str]]:
        assert self.backend and self.nginx and self.gateway
        gw = self.gateway
        out = [
            (Target("direct", "direct", self.backend.url, DUMMY_KEY), "default"),
            (
                Target(
                    "nginx",
                    "plain nginx",
                    f"http://127.0.0.1:{self.nginx.port}",
                    DUMMY_KEY,
                    {"nginx": self.nginx.pids},
                ),
                "default",
            ),
            (
                Target(
                    "gateway",
                    "gateway",
                    gw.http_url,
                    self.gateway_key,
                    {"nginx": gw.nginx_pids, "controller": gw.controller_pids},
                ),
                "gateway",
            ),
            (
                Target(
                    "gateway_tls",
                    "gateway TLS",
                    gw.https_url,
                    self.gateway_key,
                    {"nginx": gw.nginx_pids, "controller": gw.controller_pids},
                ),
                "gateway",
            ),
        ]
        if self.litellm:
            out.append(
                (
                    Target(
                        "litellm",
                        "LiteLLM",
                        self.litellm.url,
                        LiteLLM.MASTER_KEY,
                        {"litellm": self.litellm.pids},
                    ),
                    "litellm",
                )
            )
        return out

    # --- data plane ------------------------------------------------------------------------------
    def check(self, target: Target, model: str = load.MODEL) -> None:
        body = load.chat_body(model=model)
        headers = {"Authorization": f"Bearer {target.api_key}", "Content-Type": "application/json"}
        with httpx.Client(verify=False, timeout=30) as client:
            response = client.post(target.chat_url, content=body, headers=headers)
        if response.status_code != 200 or "choices" not in response.text:
            raise RuntimeError(f"{target.label}: {response.status_code} {response.text[:300]}")

    @staticmethod
    def _cores(window: Any, group: str) -> float:
        use = window.result.get(group)
        return float(use.cpu_cores) if use is not None else 0.0

    def _usage(self, target: Target, window: Any) -> dict[str, Any]:
        usage: dict[str, Any] = {}
        for name, _ in target.watch.items():
            sampled = "nginx-gw" if name == "nginx" and target.key.startswith("gateway") else name
            if sampled in window.result:
                usage[name] = window.result[sampled].to_dict()
        for name in ("backend", "client"):
            if name in window.result:
                usage[name] = window.result[name].to_dict()
        return usage

    def measure_target(self, target: Target, script_key: str) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "label": target.label,
            "rps": {},
            "usage": {},
            "machine_busy": {},
            "others_cores": {},
        }
        gw = self.gateway if target.key.startswith("gateway") else None
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
                with self.sampler.window() as window:
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
            entry["usage"][name] = self._usage(target, window)
            entry["machine_busy"][name] = round(window.machine_busy, 3)
            entry["others_cores"][name] = round(window.others_cores, 2)
            if gw is not None:
                entry["log_stream_drops"][name] = drops
                entry["reloads_during"][name] = reloaded
            return result, window

        script = self.scripts[script_key]
        added_group = False
        if target.key == "nginx":
            self.sampler.add(Group("nginx", self.nginx.pids if self.nginx else list))
            added_group = True
        try:
            self.check(target)
            warmup = max(self.p.warmup_s, LITELLM_WARMUP_S if target.key == "litellm" else 0)
            load.run_wrk(target.chat_url, script, 16, 2, warmup)
            for conc in (16, 64):
                result, window = measured(
                    f"c{conc}",
                    functools.partial(load.run_wrk, target.chat_url, script, conc, 2, self.p.duration_s),
                )
                entry["rps"][str(conc)] = result.to_dict()
                log(
                    f"{target.label}: c{conc} {result.rps:,.0f} req/s, failed {result.failed}, "
                    f"backend {self._cores(window, 'backend'):.2f} "
                    f"cores, machine busy {window.machine_busy:.0%}, other processes "
                    f"{window.others_cores:.2f} cores"
                    + (f", log records dropped {entry['log_stream_drops'][f'c{conc}']}" if gw else "")
                )
            lat, _ = measured(
                "c1", functools.partial(load.run_wrk, target.chat_url, script, 1, 1, self.p.latency_s)
            )
            entry["latency_c1"] = lat.to_dict()
            log(f"{target.label}: c1 p50 {lat.p50_ms:.3f} p90 {lat.p90_ms:.3f} p99 {lat.p99_ms:.3f} ms")
            stream, _ = measured(
                "stream",
                functools.partial(
                    load.measure_stream, target.chat_url, target.api_key, self.p.stream_samples
                ),
            )
            entry["stream"] = stream.to_dict()
            self.check(target)  # wrk counts a 3xx as success: the target must still answer 200
            log(
                f"{target.label}: SSE TTFB p50 {stream.ttfb_ms.get('p50')} ms, TTLB p50 "
                f"{stream.ttlb_ms.get('p50')} ms, {stream.events_per_answer} events, failed {stream.failed}"
            )
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            self.note(f"{target.label}: measurement failed: {entry['error'][:400]}")
        finally:
            if added_group:
                self.sampler.remove("nginx")
        peaks: dict[str, float] = {}
        for phase_usage in entry["usage"].values():
            for group, use in phase_usage.items():
                peaks[group] = max(peaks.get(group, 0.0), float(use["peak_rss_mb"]))
        entry["peak_rss_mb"] = peaks
        return entry

    def data_plane(self) -> None:
        for target, script in self.targets():
            log(f"--- {target.label} ({target.chat_url})")
            self.results["data_plane"][target.key] = self.measure_target(target, script)

    def static_backend(self) -> None:
        """Supplement: the same comparison with a backend that costs almost nothing (nginx return 200)."""
        assert self.nginx and self.gateway
        if self.budget.left() < 25:
            self.note("static-backend supplement skipped: time budget")
            return
        gw = self.gateway
        rows: list[dict[str, Any]] = []
        cases = [
            ("static backend direct", f"http://127.0.0.1:{self.nginx.static_port}", "static", ()),
            (
                "plain nginx -> static",
                f"http://127.0.0.1:{self.nginx.static_proxy_port}",
                "static",
                ("nginx",),
            ),
            ("gateway -> static", gw.http_url, "static-gw", ("nginx-gw", "controller")),
        ]
        self.sampler.add(Group("nginx", self.nginx.pids))
        try:
            self.check(Target("gw-static", "gateway static", gw.http_url, self.gateway_key), "static-model")
            for label, base, script_key, groups in cases:
                url = base + "/v1/chat/completions"
                script = self.scripts[script_key]
                load.run_wrk(url, script, 64, 2, self.p.warmup_s)
                for _ in range(2):  # once more when other processes took the CPU (NOISE_CORES)
                    with self.sampler.window() as window:
                        result = load.run_wrk(url, script, 64, 2, self.p.static_s)
                    if window.others_cores <= NOISE_CORES:
                        break
                lat = load.run_wrk(url, script, 1, 1, max(2.0, self.p.static_s / 2))
                cpu = (
                    sum(window.result[g].cpu_cores for g in groups if g in window.result) if groups else None
                )
                rows.append(
                    {
                        "label": label,
                        "requests": result.requests,
                        "rps": result.rps,
                        "failed": result.failed,
                        "p50_ms": lat.p50_ms,
                        "cpu_cores": round(cpu, 3) if cpu is not None else None,
                        "machine_busy": round(window.machine_busy, 3),
                    }
                )
                log(
                    f"{label}: c64 {result.rps:,.0f} req/s (failed {result.failed}), "
                    f"c1 p50 {lat.p50_ms:.3f} ms"
                )
        except Exception as exc:
            self.note(f"static-backend supplement failed: {type(exc).__name__}: {exc}")
        finally:
            self.sampler.remove("nginx")
        ratio = None
        if len(rows) == 3 and rows[1]["rps"]:
            ratio = round(float(rows[2]["rps"]) / float(rows[1]["rps"]), 3)
        self.results["static_backend"] = {"rows": rows, "ratio": ratio}

    # --- reliability -----------------------------------------------------------------------------
    def _clients_during(
        self, seconds: float, model_script: Path, base: str, model: str = load.MODEL
    ) -> dict[str, Any]:
        """wrk (c16) and two openai SDK pools (retrying and not) at once for `seconds`."""
        out: dict[str, Any] = {}
        threads = []

        def run_wrk() -> None:
            out["wrk"] = load.run_wrk(base + "/v1/chat/completions", model_script, 16, 1, seconds).to_dict()

        def run_sdk(key: str, retries: int) -> None:
            out[key] = load.run_openai_sdk(
                base + "/v1", self.gateway_key, 4, seconds, retries, model
            ).to_dict()

        threads.append(threading.Thread(target=run_wrk))
        threads.append(threading.Thread(target=run_sdk, args=("sdk_raw", 0)))
        threads.append(threading.Thread(target=run_sdk, args=("sdk_retrying", 2)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 90)
        return out

    def reload_storm(self) -> None:
        assert self.gateway
        gw = self.gateway
        seconds = self.p.storm_s
        log(f"--- reloads every 0.5 s for {seconds:g} s under load (wrk c16 + openai SDK 2x4 threads)")
        stop = threading.Event()
        admin = httpx.Client(
            base_url=f"http://127.0.0.1:{gw.gw.admin_port}",
            headers={"X-Admin-API-Key": gw.gw.admin_key},
            timeout=30,
        )
        reloads: list[Any] = []

        def reload_once() -> bool:
            response = admin.post("/admin/reload")
            return response.status_code == 200 and bool(response.json().get("ok"))

        def storm() -> None:
            time.sleep(0.5)
            reloads.extend(load.repeat_every(0.5, reload_once, stop, limit=int(seconds * 2) + 4))

        thread = threading.Thread(target=storm)
        thread.start()
        try:
            out = self._clients_during(seconds, self.scripts["gateway"], gw.http_url)
        finally:
            stop.set()
            thread.join(60)
            admin.close()
        out["reloads"] = sum(1 for r in reloads if r is True)
        out["reload_errors"] = sum(1 for r in reloads if r is not True)
        gw.adopt_nginx()
        self.results["reliability"]["reload_storm"] = out
        log(
            f"reload storm: {out['reloads']} reloads; failed: "
            f"wrk {out['wrk']['failed']}/{out['wrk']['requests']}, "
            f"SDK raw {out['sdk_raw']['failed']}/{out['sdk_raw']['requests']}, SDK retrying "
            f"{out['sdk_retrying']['failed']}/{out['sdk_retrying']['requests']}"
        )

    def kill_one(self) -> None:
        assert self.gateway
        gw = self.gateway
        seconds = self.p.kill_s
        log(f"--- one of three instances killed under load ({seconds:g} s)")
        stubs = [Backend(self.procs, self.work, 1, 50, 0, name=f"kill{i}") for i in range(3)]
        try:
            for i, stub in enumerate(stubs):
                response = gw.gw.add_instance(
                    name=f"kill-{i}",
                    provider_type="openai_compatible",
                    api_base=f"{stub.url}/v1",
                    supported_models=["kill-model"],
                    retry_count=2,
                )
                if response.status_code != 201:
                    raise RuntimeError(f"kill-{i}: {response.status_code} {response.text}")
            gw.gw.wait_applied(timeout=20)
            gw.adopt_nginx()
            script = load.write_wrk_script(
                self.work / "kill.lua", load.chat_body(model="kill-model"), self.gateway_key
            )
            killer = threading.Timer(seconds / 3, stubs[1].kill)
            killer.start()
            try:
                out = self._clients_during(seconds, script, gw.http_url, "kill-model")
            finally:
                killer.cancel()
            out["killed_after_s"] = round(seconds / 3, 1)
            self.results["reliability"]["kill_one"] = out
            log(
                f"kill one: failed wrk {out['wrk']['failed']}/{out['wrk']['requests']}, SDK raw "
                f"{out['sdk_raw']['failed']}, SDK retrying {out['sdk_retrying']['failed']}"
            )
        except Exception as exc:
            self.results["reliability"]["kill_one"] = {"error": f"{type(exc).__name__}: {exc}"}
            self.note(f"kill-one scenario failed: {exc}")
        finally:
            for i in range(3):
                gw.gw.admin.delete(f"/admin/instances/kill-{i}")
            for stub in stubs:
                Procs.stop_group(stub.proc)

    # --- control plane ---------------------------------------------------------------------------
    def control_plane(self) -> None:
        """On a gateway of its own in production shape (HTTPS on, plain HTTP redirecting, every feature
        setting as above): API changes go live over HTTPS, and the rendered tree is the one production has."""
        assert self.gateway and self.backend
        self.gateway.stop()  # the data-plane gateway is done: its probes and reloads would only add noise
        env = {k: v for k, v in self.gateway_env.items() if k != "ISHGW_HTTP_REDIRECT"}
        gw = GatewaySystem(self.procs, env)
        self.gateway = gw
        try:
            self._control_plane(gw, env)
        finally:
            gw.adopt_nginx()

    def _control_plane(self, gw: GatewaySystem, env: dict[str, str]) -> None:
        assert self.backend
        key, _ = features.create_client_key(gw.gw.admin)
        log(f"control-plane gateway: https :{gw.https_port} (HTTP redirects), admin :{gw.gw.admin_port}")
        log(f"--- admin API change -> live, {self.p.live_changes} changes")
        live = control.api_change_to_live(
            gw,
            self.backend.url,
            self.p.live_changes,
            key or DUMMY_KEY,
            tls=True,
            max_seconds=max(15.0, self.budget.left() - 30),
        )
        self.results["control_plane"]["api_to_live"] = live.to_dict()
        summary = live.to_dict()
        log(
            f"API change -> live: p50 {summary['p50_ms']} ms, p95 {summary['p95_ms']} ms, "
            f"timeouts {live.timeouts}"
        )
        sizes = list(self.p.sizes)
        if self.budget.left() < 25:
            sizes = [s for s in sizes if s[0] < 1000]
            self.note("1,000-instance case skipped: time budget")
        if LARGE in sizes and self.budget.left() < 240:
            sizes.remove(LARGE)
            self.note("10,000-instance case skipped: time budget")
        log(f"--- reconcile time at {sizes}")
        from control_plane.app import server_settings
        from control_plane.settings import Settings

        # the controller's own settings (same environment), so the in-process render is the same tree
        pinned = {k.removeprefix("ISHGW_").lower(): v for k, v in env.items()}
        pinned.update(home=str(gw.gw.home), http_port=str(gw.gw.http_port), https_port=str(gw.https_port))
        server = server_settings(Settings.model_validate(pinned))
        scaling = control.reconcile_scaling(gw, self.backend.url, sizes, self.p.scale_reps, server)
        self.results["control_plane"]["scaling"] = [s.to_dict() for s in scaling]
        largest = max((s.instances for s in scaling if not s.error), default=0)
        if largest and self.budget.left() > 2 * self.p.probe_window_s + 10:
            log(f"--- probing {largest} idle instances: settle, then measure {self.p.probe_window_s:.0f} s")
            cost = control.probe_cost(gw, largest, self.p.probe_window_s)
            self.results["control_plane"]["probing"] = cost.to_dict()
            log(f"probing: {cost.probes} probes, controller {cost.controller_cores} cores")
        for s in scaling:
            log(
                f"{s.instances} instances / {s.pools} pools: reconcile {s.reconcile_ms} ms, "
                f"render {s.render_ms} ms, "
                f"nginx -t {s.nginx_t_ms} ms, {s.rendered_kb} KB, controller RSS {s.controller_rss_mb} MB"
                + (f", error {s.error}" if s.error else "")
            )

    # --- the whole run ---------------------------------------------------------------------------
    def instruction_counts(self) -> None:
        """Instructions per request under cachegrind (plain proxy, the gateway, and the split by part):
        deterministic, so a change to the request path shows here even when timings drift."""
        log("--- instructions per request (cachegrind)")
        try:
            self.results["instructions"] = instructions.measure()
            log(f"instructions: {self.results['instructions']}")
        except Exception as exc:  # reported, the run goes on
            self.note(f"instruction counts failed: {type(exc).__name__}: {exc}")

    def run(self) -> None:
        self.setup()
        self.instruction_counts()
        self.data_plane()
        self.static_backend()
        for name, step, needs in (
            ("reload storm", self.reload_storm, self.p.storm_s + 20),
            ("kill one of three", self.kill_one, self.p.kill_s + 20),
            ("control plane", self.control_plane, 30),
        ):
            if self.budget.left() < needs:
                self.note(f"{name} skipped: time budget ({self.budget.left():.0f} s left)")
                continue
            try:
                step()
            except Exception as exc:
                self.note(f"{name} failed: {type(exc).__name__}: {exc}")
                traceback.print_exc()
        if self.gateway is not None and any("failed" in n for n in self.results["notes"]):
            log("controller and nginx logs (tail):\n" + self.gateway.gw.logs()[-3000:])

    def backend_note(self) -> None:
        dp = self.results["data_plane"]
        busiest = (
            max(
                (float(report._get(e, "usage", "c64", "backend", "cpu_cores") or 0), k) for k, e in dp.items()
            )
            if dp
            else (0.0, "")
        )
        cores = os.cpu_count() or 1
        self.note(
            f"Stand-in backend load: up to {busiest[0]:.2f} of {cores} cores at c64 ({busiest[1]}). On a "
            f"{cores}-core machine the Python backend, wrk and the proxy share the CPUs, so requests/s are "
            "CPU-bound for every system; the ratios compare like with like (same backend, same run). The "
            "static-backend table shows the data plane without Python in the path."
        )

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        self.procs.stop_all()
        self.sampler.close()
        shutil.rmtree(self.work, ignore_errors=True)


def write_results(results: dict[str, Any], out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    results["targets"] = report.evaluate_targets(results)
    text = report.markdown(results)
    (out_dir / "latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out_dir / "latest.md").write_text(text)
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench.sh", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 3 minutes: shorter runs, fewer samples")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--backend-processes", type=int, default=3)
    parser.add_argument("--chunk-delay-ms", type=int, default=1, help="delay between the 50 SSE chunks")
    parser.add_argument("--litellm-venv", default=str(Path.home() / ".cache/ishgw-bench/litellm-venv"))
    parser.add_argument("--litellm-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-litellm", default="", metavar="REASON", help="do not measure LiteLLM")
    parser.add_argument(
        "--readme", action="store_true", help="put the figures into README.md's ## Performance section"
    )
    parser.add_argument("--pid-file", default=os.environ.get("ISHGW_BENCH_PIDFILE", ""))
    return parser.parse_args(argv)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = QUICK if args.quick else FULL
    if os.environ.get("ISHGW_BENCH_BUDGET_S"):
        profile = replace(profile, budget_s=float(os.environ["ISHGW_BENCH_BUDGET_S"]))
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    bench = Bench(args, profile)
    code = 0
    try:
        bench.run()
    except KeyboardInterrupt as exc:
        bench.note(f"interrupted ({exc}); results are partial")
        code = 130
    except Exception as exc:
        bench.note(f"run failed: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        code = 1
    finally:
        log("stopping everything the benchmark started")
        with contextlib.suppress(KeyboardInterrupt):
            bench.stop()
    if bench.results["data_plane"]:
        bench.backend_note()
    bench.results["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    out_dir = Path(args.out_dir)
    if code == 130:  # an interrupted run never replaces the last complete one
        bench.results["targets"] = report.evaluate_targets(bench.results)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "partial.json").write_text(json.dumps(bench.results, indent=2, default=str) + "\n")
        log(f"interrupted: partial results in {out_dir}/partial.json; latest.* left as they were")
        return code
    text = write_results(bench.results, out_dir)
    print(text)
    if args.readme:
        readme = ROOT / "README.md"
        if readme.exists() and report.update_readme(readme, bench.results):
            log("updated the figures in README.md (## Performance)")
        else:
            log("README.md has no bench markers in its ## Performance section: not touched")
    log(f"wrote {out_dir}/latest.json and latest.md in {bench.results['meta']['elapsed_s']} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
