"""The benchmark driver (issue 5): run by scripts/bench.sh, or `python -m scripts.bench [--quick]`.

One run, one stand-in backend, one request body: direct, plain nginx, the gateway (TLS off and on) and
LiteLLM's proxy; then reliability under reloads and instance loss, then control-plane scale.
Writes bench/results/latest.json and latest.md and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from scripts.bench import controlplane, counting, dataplane, features, instructions, load, reliability, report
from scripts.bench.common import DUMMY_KEY, FULL, QUICK, Budget, Profile, log
from scripts.bench.machine import machine_info, sh, versions
from scripts.bench.procs import Group, Procs, Sampler, children_named
from scripts.bench.systems import (
    ROOT,
    Backend,
    GatewaySystem,
    LiteLLM,
    PlainNginx,
    Target,
)

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
            "git_commit": sh("git", "rev-parse", "--short=12", "HEAD") or "?",
            "git_dirty": bool(sh("git", "status", "--porcelain", "--untracked-files=no")),
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
        key, key_feature = self.register(gw)
        if key:
            self.gateway_key = key
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

    def register(self, gw: GatewaySystem) -> tuple[str | None, features.Feature]:
        """The bench's instances (two on the stand-in, two on the static backend) and a client key, live in
        ``gw``'s nginx: the key (None: this build has none) and how it was made."""
        assert self.backend is not None and self.nginx is not None
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
        gw.gw.wait_applied(timeout=20)
        gw.adopt_nginx()
        return key, key_feature

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

    # --- the whole run ---------------------------------------------------------------------------
    def instruction_counts(self) -> None:
        """Instructions per request under cachegrind (plain proxy, the gateway, and the split by part):
        deterministic, so a change to the request path shows here even when timings drift."""
        log("--- instructions per request (cachegrind)")
        try:
            with instructions.seeded(required=False) as fixed:
                self.results["instructions"] = instructions.measure()
            self.results["instructions_fixed_seed"] = fixed
            log(f"instructions: {self.results['instructions']}")
        except Exception as exc:  # reported, the run goes on
            self.note(f"instruction counts failed: {type(exc).__name__}: {exc}")

    def run(self) -> None:
        self.setup()
        self.instruction_counts()
        dataplane.data_plane(self)
        dataplane.standin_pairs(self)
        dataplane.static_backend(self)
        # Before the control-plane stage, which imports other registries into the gateway (its key goes).
        counting.counting_cost(self)
        for name, step, needs in (
            ("reload storm", reliability.reload_storm, self.p.storm_s + 20),
            ("kill one of three", reliability.kill_one, self.p.kill_s + 20),
            ("control plane", controlplane.control_plane, 30),
        ):
            if self.budget.left() < needs:
                self.note(f"{name} skipped: time budget ({self.budget.left():.0f} s left)")
                continue
            try:
                step(self)
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
