"""nginx's CPU per request under load, user and kernel time apart: where the gateway's nginx spends what
plain nginx does not (instructions, scripts.bench.instructions, see only the user part).

One nginx worker (worker_processes 1, master on, as deployed) in front of the static backend of
scripts.bench.instructions (an nginx answering the 524-byte chat completion), loaded by wrk (one thread,
16 connections, the same ~1 KB chat request) for a bounded time after a 2 s warm-up, for each of:

- plain: nginx proxy_pass with upstream keepalive (the bench's plain nginx);
- gateway: the gateway's rendered tree as scripts.bench.instructions makes it (client key, limit zones,
  Lua routing, instance headers, the JSON log line) with usage accounting on (what deploys run with);
- gateway_no_log: the same tree without its access-log line.

The log stream goes to a receiver that reads as the controller's does (control_plane.health.logstream's
socket, drained in batches, resting between them as LogReceiver does rather than waiting on the socket).
A unix datagram in flight is charged to the sending socket, whose buffer (net.core.wmem_default) holds
~160 of nginx's lines: one worker at more than ~3,200 requests/s lost lines within a 50 ms rest, and
writes a warning per lost line to its error log (counted here as log_lost per request: the figures are
only comparable when it is 0).

Per request, of the worker alone: user and system CPU in microseconds (/proc/<pid>/stat), syscalls,
context switches and page faults (perf stat, when perf can trace the worker); --strace adds the syscalls
by name (strace -c: slow, its counts matter, not its times). Timings move with what else runs on the
machine (CPU time per request rises with cache and scheduler pressure); counts do not.

    .venv/bin/python -m scripts.bench.cpu [--seconds 6] [--connections 16] [--runs 2] [--strace]
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from scripts.bench import instructions
from scripts.bench.load import chat_body
from tests.ports import free_port

CLK_TCK = os.sysconf("SC_CLK_TCK")
WARM_UP_S = 2
SYSTEMS = ("plain", "gateway", "gateway_no_log")
PERF_EVENTS = ("raw_syscalls:sys_enter", "context-switches", "page-faults")

# The receiver: control_plane.health.logstream's socket and its reading rhythm (LogReceiver._run), in a
# process of its own, lines dropped. 0666: nginx's workers run as another user than a root bench.
RECEIVER = """
import os, sys, time
from control_plane.health import logstream
path = sys.argv[1]
sock = logstream.bind("unix:" + path)
os.chmod(path, 0o666)
rests = logstream.Rests()
while True:
    waiting = time.monotonic()
    sock.setblocking(True)
    sock.recv(logstream.MAX_DATAGRAM)
    began = time.monotonic()
    sock.setblocking(False)
    drained = 1
    try:
        for _ in range(logstream.MAX_BATCH):
            sock.recv(logstream.MAX_DATAGRAM)
            drained += 1
    except BlockingIOError:
        pass
    time.sleep(rests.after(began - waiting, drained, time.monotonic() - began))
"""


@dataclass(frozen=True)
class WorkerStat:
    utime: int  # clock ticks
    stime: int
    minflt: int


def parse_stat(text: str) -> WorkerStat:
    """/proc/<pid>/stat -> its user and system ticks and minor faults (proc(5): fields 10, 14, 15)."""
    fields = text[text.rindex(")") + 2 :].split()
    return WorkerStat(utime=int(fields[11]), stime=int(fields[12]), minflt=int(fields[7]))


def parse_perf_csv(text: str) -> dict[str, int]:
    """perf stat -x, output -> {event: count}; events perf could not count are left out."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].strip().isdigit():
            counts[parts[2]] = int(parts[0])
    return counts


def parse_strace(text: str) -> dict[str, int]:
    """strace -c's table -> {syscall: calls}."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        match = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?([a-z_0-9]+)$", line)
        if match and match.group(2) != "total":
            calls[match.group(2)] = int(match.group(1))
    return calls


def per_request(before: WorkerStat, after: WorkerStat, requests: int) -> dict[str, float]:
    """User and system microseconds and minor faults per request between two readings."""
    us = 1e6 / CLK_TCK / requests
    return {
        "user_us": round((after.utime - before.utime) * us, 1),
        "sys_us": round((after.stime - before.stime) * us, 1),
        "minflt": round((after.minflt - before.minflt) / requests, 3),
    }


def lost_lines(error_log: Path) -> int:
    """Access-log lines nginx could not send (its warning per line), so far."""
    try:
        return error_log.read_text(errors="replace").count("send() to syslog failed")
    except FileNotFoundError:
        return 0


def _wait_port(port: int, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {seconds} s")


class Processes:
    """What a measurement started, each in its own session, stopped together."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, command: list[str], cwd: str | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=cwd
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _plain_conf(directory: Path, port: int, backend: int) -> Path:
    conf = directory / "nginx.conf"
    conf.write_text(
        f"worker_processes 1; pid {directory}/nginx.pid; error_log {directory}/error.log warn;\n"
        "events { worker_connections 4096; }\n"
        f"http {{ access_log off; client_body_temp_path {directory}/tmp; proxy_temp_path {directory}/tmp;\n"
        f"  upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}\n"
        f"  server {{ listen 127.0.0.1:{port} reuseport backlog=4096;\n"
        '    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";'
        " proxy_buffering off; } } }\n"
    )
    return conf


@contextlib.contextmanager
def _worker(
    root: Path, system: str, backend: int, log_server: str
) -> Iterator[tuple[int, int, dict[str, str], Path]]:
    """nginx for `system` (master and one worker): yields its port, its worker's pid, the request's
    headers and its error log."""
    port = free_port()
    directory = root / system
    if system == "plain":
        directory.mkdir()
        conf = _plain_conf(directory, port, backend)
        headers = {"Content-Type": "application/json"}
    else:
        variant = instructions.Variant(usage=True, log=system != "gateway_no_log")
        conf = instructions.gateway_tree(directory, port, backend, log_server, variant)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {instructions.KEY}"}
    prefix = conf.parent
    for sub in ("tmp", "logs"):
        (prefix / sub).mkdir(exist_ok=True)
    nginx = Processes()
    try:
        master = nginx.start(["nginx", "-p", f"{prefix}/", "-c", str(conf), "-g", "daemon off;"])
        _wait_port(port)
        children = subprocess.run(
            ["pgrep", "-P", str(master.pid)], capture_output=True, text=True, check=False
        )
        workers = [int(pid) for pid in children.stdout.split()]
        if len(workers) != 1:
            raise RuntimeError(f"expected one nginx worker, found {workers}")
        # Where the configuration writes it: the gateway's under the prefix its tree was rendered for.
        error_log = directory / "error.log" if system == "plain" else directory / "logs" / "error.log"
        yield port, workers[0], headers, error_log
    finally:
        nginx.stop()


def _wrk(script: Path, url: str, connections: int, seconds: int) -> int:
    """Requests wrk completed in `seconds` (non-2xx answers are an error: the measure would be wrong)."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 30).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors: {out}")
    match = re.search(r"REQUESTS (\d+)", out)
    if match is None:
        raise RuntimeError(f"no request count from wrk: {out}")
    return int(match.group(1))


def _perf_works() -> bool:
    if shutil.which("perf") is None:
        return False
    probe = subprocess.run(
        ["perf", "stat", "-x,", "-e", PERF_EVENTS[0], "--", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.returncode == 0 and "not supported" not in probe.stderr


def measure_one(
    root: Path, system: str, backend: int, log_server: str, connections: int, seconds: int, strace: bool
) -> dict[str, float]:
    """One system's figures per request (see the module's doc)."""
    with _worker(root, system, backend, log_server) as (port, worker, headers, error_log):
        script = root / f"{system}.lua"
        auth = "".join(f'wrk.headers["{name}"] = "{value}"\n' for name, value in headers.items())
        body = chat_body(model=instructions.MODEL).decode()
        script.write_text(
            f'wrk.method = "POST"\nwrk.body = [==[{body}]==]\n{auth}'
            'function done(s, l, r) io.write(string.format("REQUESTS %d\\n", s.requests)) end\n'
        )
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        _wrk(script, url, connections, WARM_UP_S)
        out = root / f"{system}.trace"
        tracer = None
        if strace:
            tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(worker), "-o", str(out)])
        elif _perf_works():
            command = ["perf", "stat", "-x,", "-e", ",".join(PERF_EVENTS), "-p", str(worker), "-o", str(out)]
            tracer = subprocess.Popen(command)
        time.sleep(0.5 if tracer else 0)  # the tracer attached
        stat = Path(f"/proc/{worker}/stat")
        before = parse_stat(stat.read_text())
        lost_before = lost_lines(error_log)
        started = time.monotonic()
        requests = _wrk(script, url, connections, seconds)
        elapsed = time.monotonic() - started
        after = parse_stat(stat.read_text())
        result: dict[str, float] = {"requests_per_s": round(requests / elapsed)}
        result.update(per_request(before, after, requests))
        result["log_lost"] = round((lost_lines(error_log) - lost_before) / requests, 3)
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=60)
            text = out.read_text()
            counts = parse_strace(text) if strace else parse_perf_csv(text)
            for name, count in sorted(counts.items()):
                result[name] = round(count / requests, 2)
        return result


def measure(
    connections: int = 16, seconds: int = 6, runs: int = 2, strace: bool = False
) -> list[dict[str, str | float]]:
    """SYSTEMS in turn, `runs` times: one row of figures per request each (measure_one)."""
    rows: list[dict[str, str | float]] = []
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="ishgw-cpu-") as tmp:
            root = Path(tmp)
            os.chmod(root, 0o755)  # the workers reach the log socket here
            socket_path = root / "log.sock"
            receiver = [sys.executable, "-c", RECEIVER, str(socket_path)]
            procs.start(receiver, cwd=str(Path.cwd()))
            deadline = time.monotonic() + 10
            while not socket_path.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            backend_port = free_port()
            backend = root / "backend"
            backend.mkdir()
            for sub in ("tmp", "logs"):
                (backend / sub).mkdir()
            (backend / "nginx.conf").write_text(instructions.static_backend_conf(backend, backend_port))
            procs.start(
                [
                    "nginx",
                    "-p",
                    f"{backend}/",
                    "-c",
                    str(backend / "nginx.conf"),
                    "-g",
                    "daemon off; master_process off;",
                ]
            )
            _wait_port(backend_port)
            for run in range(runs):
                for system in SYSTEMS:
                    directory = root / f"{run}"
                    directory.mkdir(exist_ok=True)
                    row = measure_one(
                        directory, system, backend_port, f"unix:{socket_path}", connections, seconds, strace
                    )
                    rows.append({"system": system, "run": run, **row})
    finally:
        procs.stop()
    return rows


def main() -> int:
    args = sys.argv[1:]

    def option(name: str, default: int) -> int:
        return int(args[args.index(name) + 1]) if name in args else default

    rows = measure(
        connections=option("--connections", 16),
        seconds=option("--seconds", 6),
        runs=option("--runs", 2),
        strace="--strace" in args,
    )
    for row in rows:
        print("  ".join(f"{key} {value}" for key, value in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
