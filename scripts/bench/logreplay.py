"""The controller's CPU per access-log record, offline: `python -m scripts.bench.logreplay`.

nginx sends one datagram per request (control_plane/health/logstream.py); at a few thousand requests/s
reading them was most of the controller's CPU, on the cores nginx and the backends use. This replays
`--records` datagrams of the bench's shape (chat completions of 3 instances with max_rpm and max_tpm set,
one attempt each, a 200 with its tokens) through the receiver's batch path into the health service as the
app wires it (tracker, recent traffic, Prometheus series, metrics, the routing weights' windows), in
batches of `--batch` as one drain of the socket hands them over, and prints the CPU per record (process
time, so other processes on the machine weigh less than in wall time): the median of `--runs` runs, each
on fresh services, with the spread. Also the parse alone. No socket, no nginx: only the controller's
Python. `--profile` prints cProfile's top functions of one more run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry

from control_plane.health import logstream
from control_plane.health.service import HealthService
from control_plane.metrics import GatewayMetrics
from control_plane.nginx_process import NginxProcess
from control_plane.reconciler import Reconciler
from control_plane.registry.models import InstanceConfig, InstanceState, RoutingConfig
from control_plane.registry.store import Store
from control_plane.render.spec import ServerSettings, World, build_spec
from control_plane.routing.service import WeightsService
from control_plane.world import RegistryWorld

INSTANCES = 3
RATE = 3000.0  # records per second of log time (the bench's c16 rate)
PORT = 9000


def datagrams(count: int, pool: str, start: float) -> list[bytes]:
    return [
        logstream.format_line(
            msec=f"{start + i / RATE:.3f}",
            request_id="0123456789abcdef0123456789abcdef",
            pool=pool,
            model="m",
            status="200",
            request_time="0.004",
            upstream_addr=f"127.0.0.1:{PORT + i % INSTANCES}",
            upstream_status="200",
            upstream_response_time="0.003",
            client_id="key_0123456789abcdef",
            upstream_header_time="0.003",
            sent_http_content_type="application/json",
            tokens="12 34",
        )
        for i in range(count)
    ]


def services(workdir: Path) -> tuple[HealthService, str]:
    """The health service with the weights' observer, following a world of INSTANCES instances; the pool."""
    store = Store("sqlite://")
    metrics = GatewayMetrics(CollectorRegistry())
    server = ServerSettings(prefix=str(workdir / "nginx"), run_dir=str(workdir / "run"))
    reconciler = Reconciler(RegistryWorld(store), NginxProcess(workdir / "nginx"), server, metrics)
    health = HealthService(store, reconciler, "127.0.0.1:1", probes_enabled=False, metrics=metrics)
    weights = WeightsService(reconciler, metrics)
    health.log_observers.append(weights.on_logs)
    configs = [
        InstanceConfig(
            name=f"i{i}",
            provider_type="openai_compatible",
            api_base=f"http://127.0.0.1:{PORT + i}",
            supported_models=["m"],
            max_rpm=10**8,
            max_tpm=10**10,
        )
        for i in range(INSTANCES)
    ]
    world = World(
        instances=tuple((c, InstanceState()) for c in configs),
        routing=RoutingConfig(),
        now=datetime.now(UTC),
        addresses={"127.0.0.1": ("127.0.0.1",)},
    )
    spec = build_spec(world, server)
    for observer in reconciler.observers:
        observer(world, spec)
    return health, spec.pools[0].name


def replay(health: HealthService, grams: Sequence[bytes], batch: int) -> float:
    """CPU seconds to hand ``grams`` to the service in batches of ``batch``."""
    receiver = logstream.LogReceiver(None, health.on_logs)  # type: ignore[arg-type]  # no socket: handle_all
    started = time.process_time()
    for first in range(0, len(grams), batch):
        receiver.handle_all(grams[first : first + batch])
    return time.process_time() - started


def timed(run: Callable[[], float], runs: int, count: int) -> tuple[float, float, float]:
    """(median, min, max) microseconds per record over ``runs`` runs."""
    per_record = sorted(run() * 1e6 / count for _ in range(runs))
    return statistics.median(per_record), per_record[0], per_record[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=30_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=150, help="records per drain (150: ~3,000/s in 50 ms)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)

    async def body() -> None:  # the services expect a running event loop (their asyncio objects)
        with tempfile.TemporaryDirectory(prefix="ishgw-logreplay-") as tmp:
            workdir = Path(tmp)
            _, pool = services(workdir)
            grams = datagrams(args.records, pool, time.time())

            def one() -> float:
                health, _ = services(workdir)
                spent = replay(health, grams, args.batch)
                assert health.records == args.records, health.records
                return spent

            def parse() -> float:
                started = time.process_time()
                for gram in grams:
                    logstream.parse_datagram(gram)
                return time.process_time() - started

            one()  # warm-up
            median, low, high = timed(one, args.runs, args.records)
            print(
                f"{args.records} records x {args.runs} runs, batches of {args.batch}: "
                f"{median:.1f} us/record CPU (min {low:.1f}, max {high:.1f})"
            )
            median, low, high = timed(parse, args.runs, args.records)
            print(f"parse alone: {median:.1f} us/record (min {low:.1f}, max {high:.1f})")
            if args.profile:
                health, _ = services(workdir)
                profile = cProfile.Profile()
                profile.runcall(replay, health, grams, args.batch)
                pstats.Stats(profile).sort_stats("tottime").print_stats(30)

    asyncio.run(body())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
