"""Instructions per request under cachegrind: deterministic where timings on a shared VM drift 10-20 %.

Two measurements, each nginx running as one process (master_process off) under valgrind, the backend a
separate plain nginx answering a static chat completion, and each count taken at 200 and 1,200 requests
(the difference over 1,000 requests is the per-request count, without start-up):

- the request path: plain nginx proxy_pass with upstream keepalive, against the gateway's rendered tree
  with everything on (client key, limit zones, Lua routing, the JSON log stream over a unix socket,
  instance headers, retries), for the same ~1 KB chat request;
- the split: the same tree with one part switched off at a time (the log stream, the client key, the
  limit zones, the instance/attempt headers), and two trivial Lua locations that read the body and hand
  the request over, one of them also scanning the body for its model (gw.body): each difference is what
  that part costs.

    .venv/bin/python -m scripts.bench.instructions      (needs valgrind: apt-get install valgrind)
    .venv/bin/python -m scripts.bench.instructions --usage     (only what usage accounting costs)
    .venv/bin/python -m scripts.bench.instructions --pools   (one pool, then the same behind 999 others)

LuaJIT seeds a random generator per process (string hashes, trace penalties), so counts move by a few
thousand between runs. --fixed-seed (with any of the above; needs a C compiler) answers the measured
nginx's getrandom with a fixed sequence (scripts/bench/fixed_seed.c, LD_PRELOAD): repeats then agree
within a few dozen instructions, so two versions of one piece can be compared. Counting (--usage) still
moves by up to ~5,000 between runs: work that happens now and then, not per request (a LuaJIT garbage
collection cycle, the usage flush timer every second), falls into one run more often than the other.
--many N (N > 200) makes the longer run N requests instead of 1,200, dividing that by (N - 200) instead.
Even with --fixed-seed, counting's figure moves by several thousand between runs with LuaJIT's JIT on
(which traces get compiled follows when the timers fire among the requests, i.e. how fast the machine
is). --jit-off turns the measured gateway's JIT off (jit.off() in its init_by_lua): every figure is then
far higher than nginx runs it, but repeatable, for an A/B of one change to the Lua request path.
--edit FILE.py applies FILE's `edit(files: dict[str, str]) -> dict[str, str]` to every gateway tree
measured (its files by name: "http.conf", "servers.conf", "lua/gw/gateway.lua", ...): an A/B of a change
to the rendered configuration or the Lua before it is made in the renderer (run with and without it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from control_plane.nginx_process import NginxProcess, write_files
from control_plane.registry.client_keys import ClientKey
from control_plane.registry.models import InstanceConfig, InstanceState, RoutingConfig
from control_plane.render.client_access import DEFAULT_CLASSES, ClientAccessPolicy
from control_plane.render.nginx import LUA_DIR, render
from control_plane.render.spec import ServerSettings, World, build_spec
from scripts.bench.load import chat_body
from scripts.bench.systems import STATIC_ANSWER
from tests.ports import free_port

FEW, MANY = 200, 1200
_many: list[int] = []  # --many N: the longer run's requests instead of MANY
KEY = "ishgw-instructions-bench-key-0123456789"
MODEL = "m"
LUA_MODULES = ServerSettings(prefix="/", run_dir="/").lua_modules
UNBOUND = 1_000_000  # a limit that never binds here (the most a key may have)
# Two trivial Lua hand-overs: read the body, then (SCAN only) find its model, then the pool location.
HAND_OVER = 'ngx.req.read_body(); ngx.exec("@b")'
SCAN = 'ngx.req.read_body(); require("gw.body").model(ngx.req.get_body_data()); ngx.exec("@b")'


def _conf(directory: Path, http: str) -> str:
    modules = "".join(f"load_module {module};\n" for module in LUA_MODULES)
    return (
        modules + f"pid {directory}/nginx.pid; error_log {directory}/error.log;\n"
        "events { worker_connections 256; }\n"
        f"http {{ access_log off; client_body_temp_path {directory}/tmp;\n{http}\n}}\n"
    )


# The static backend's streamed answer: an OpenAI chat stream that reports its usage (what a provider sends
# when asked with stream_options.include_usage: "usage":null in every chunk, then the usage-only chunk).
_CHUNK = (
    '{"id":"chatcmpl-static","object":"chat.completion.chunk","created":1700000000,"model":"static-model",'
    '"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":%s}],"usage":null}'
)
STATIC_STREAM = (
    "".join("data: " + _CHUNK % ("Hello from static! " * 2, "null") + "\n\n" for _ in range(6))
    + "data: "
    + _CHUNK % ("", '"stop"')
    + "\n\n"
    + 'data: {"id":"chatcmpl-static","object":"chat.completion.chunk","created":1700000000,'
    '"model":"static-model","choices":[],"usage":{"prompt_tokens":250,"completion_tokens":60,'
    '"total_tokens":310}}\n\ndata: [DONE]\n\n'
)


def static_backend_conf(directory: Path, port: int, stream_port: int | None = None) -> str:
    """The static chat answer on `port`; with `stream_port`, the static stream (text/event-stream) there."""
    answer = STATIC_ANSWER.replace("'", "\\'")
    stream = ""
    if stream_port is not None:
        events = STATIC_STREAM.replace("'", "\\'").replace("\n", "\\n")
        stream = (
            f"server {{ listen 127.0.0.1:{stream_port}; keepalive_requests 100000;\n"
            f"  location / {{ default_type text/event-stream; return 200 '{events}'; }} }}\n"
        )
    return _conf(
        directory,
        stream + f"server {{ listen 127.0.0.1:{port}; keepalive_requests 100000;\n"
        f"  location / {{ default_type application/json; return 200 '{answer}'; }} }}",
    )


def plain_proxy_conf(directory: Path, port: int, backend: int) -> str:
    return _conf(
        directory,
        f"upstream b {{ server 127.0.0.1:{backend}; keepalive 8; }}\n"
        f"server {{ listen 127.0.0.1:{port};\n"
        '  location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; } }',
    )


def lua_conf(directory: Path, port: int, backend: int, handler: str) -> str:
    return _conf(
        directory,
        f'lua_package_path "{LUA_DIR}/?.lua;;";\n'
        f"upstream b {{ server 127.0.0.1:{backend}; keepalive 8; }}\n"
        f"server {{ listen 127.0.0.1:{port}; client_body_buffer_size 16m; client_body_in_single_buffer on;\n"
        f"  location / {{ content_by_lua_block {{ {handler} }} }}\n"
        '  location @b { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; } }',
    )


@dataclasses.dataclass(frozen=True)
class Variant:
    """The gateway's tree with parts switched off, to split its cost."""

    log: bool = True
    key: bool = True
    limits: bool = True
    headers: bool = True
    usage: bool = False  # ISHGW_USAGE_ACCOUNTING
    stream: bool = False  # a streamed request ("stream": true), answered by the static stream
    empty_usage_phases: bool = False  # with usage: the counting's Lua phases there, their handlers empty


FULL = Variant()
VARIANTS = {
    "gateway_no_log": Variant(log=False),
    "gateway_no_key": Variant(key=False),
    "gateway_no_limits": Variant(limits=False),
    "gateway_no_headers": Variant(headers=False),
}
# What counting costs: the same tree with usage accounting on, for the JSON answer and for the stream.
USAGE_VARIANTS = {
    "gateway_usage": Variant(usage=True),
    "gateway_stream": Variant(stream=True),
    "gateway_stream_usage": Variant(stream=True, usage=True),
}
# The floor of counting in Lua phases: the same directives with empty handlers (--usage --phases).
PHASE_VARIANTS = {
    "gateway_usage_phases": Variant(usage=True, empty_usage_phases=True),
}
_COUNTING_CALL = re.compile(r'(_by_lua_block \{) gw_gateway\.count\w*\("\w+"\) \}')


_jit_off: list[bool] = []  # --jit-off: the measured gateway's LuaJIT runs without its JIT
_edits: list[Callable[[dict[str, str]], dict[str, str]]] = []  # --edit FILE.py: its edit(files)


def load_edit(path: Path) -> Callable[[dict[str, str]], dict[str, str]]:
    """The edit(files) function of a Python file (--edit)."""
    namespace: dict[str, object] = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    edit = namespace.get("edit")
    if not callable(edit):
        raise RuntimeError(f"{path} defines no edit(files)")
    return edit


def _without_jit(files: dict[str, str]) -> dict[str, str]:
    """The tree's files with jit.off() first in its init_by_lua (the master's VM, which workers inherit)."""
    out = {
        name: text.replace("init_by_lua_block {", "init_by_lua_block { jit.off();", 1)
        for name, text in files.items()
    }
    if out == files:
        raise RuntimeError("no init_by_lua_block found in the rendered tree")
    return out


def _empty_usage_phases(files: dict[str, str]) -> dict[str, str]:
    """The tree's files with the counting's handlers (gw.gateway.counting, count, counted) left empty."""
    out = {name: _COUNTING_CALL.sub(r"\1 }", text) for name, text in files.items()}
    if out == files:
        raise RuntimeError("no counting handler found in the rendered tree")
    return out


def _policy(variant: Variant) -> ClientAccessPolicy:
    if not variant.limits:
        return ClientAccessPolicy(
            auth_required=variant.key,
            ip_rpm=0,
            conn_per_key=0,
            conn_per_ip=0,
            classes=tuple(dataclasses.replace(c, rpm=0) for c in DEFAULT_CLASSES),
        )
    return ClientAccessPolicy(
        auth_required=variant.key,
        ip_rpm=UNBOUND,
        ip_burst=UNBOUND,
        key_burst=UNBOUND,
        classes=tuple(dataclasses.replace(c, rpm=UNBOUND, burst=UNBOUND) for c in DEFAULT_CLASSES),
    )


def gateway_tree(
    prefix: Path, port: int, backend: int, log_server: str, variant: Variant = FULL, other_pools: int = 0
) -> Path:
    """The gateway's rendered tree, written where the controller would write it under `prefix`: two
    instances of MODEL on the backend, one client key, limits high enough never to bind, the log stream to
    `log_server` ("unix:/path", as the controller's default). `other_pools`: as many more models, one
    instance each, whose upstream blocks come before MODEL's (what a variable proxy_pass searches through,
    per request, to find the pool by name). Returns its nginx.conf."""
    models = [*(f"a-{n:04d}" for n in range(other_pools)), MODEL, MODEL]
    configs = [
        InstanceConfig(
            name=f"i{n}",
            provider_type="openai_compatible",
            api_base=f"http://127.0.0.1:{backend}/v1",
            supported_models=[model],
            retry_count=2,
            max_rpm=UNBOUND,
        )
        for n, model in enumerate(models)
    ]
    now = datetime.now(UTC)
    key = ClientKey(
        id="key_00000000000000b1",
        name="bench",
        key_hash=hashlib.sha256(KEY.encode()).hexdigest(),
        key_prefix=KEY[:10],
        key_last4=KEY[-4:],
        rpm_limit=UNBOUND if variant.limits else 0,
        created_at=now,
        updated_at=now,
    )
    world = World(
        instances=tuple((c, InstanceState()) for c in configs),
        routing=RoutingConfig(),
        now=now,
        addresses={"127.0.0.1": ("127.0.0.1",)},
        client_keys=(key,) if variant.key else (),
    )
    server = ServerSettings(
        prefix=str(prefix),
        run_dir=str(prefix),
        listen_address="127.0.0.1",
        http_port=port,
        worker_processes="1",
        log_server=log_server if variant.log else None,
        expose_instance_headers=variant.headers,
        access=_policy(variant),
        usage_accounting=variant.usage,
    )
    tree = render(build_spec(world, server))
    files = _empty_usage_phases(tree.files) if variant.empty_usage_phases else tree.files
    if _jit_off:
        files = _without_jit(files)
    for edit in _edits:
        edited = edit(dict(files))
        if edited == files:
            raise RuntimeError("--edit changed nothing in the rendered tree")
        files = edited
    nginx_process = NginxProcess(prefix)
    nginx_process.prepare()
    directory = nginx_process.generations / tree.checksum
    directory.mkdir(mode=0o700)
    write_files(directory, files)
    return directory / "nginx.conf"


def _wait_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nginx did not listen on {port} within {seconds} s")


def _stop(proc: subprocess.Popen[bytes], port: int) -> None:
    """Fast shutdown. Under valgrind the signal only takes effect once nginx's event wait returns, so a
    connection wakes it (a graceful stop would wait out nginx's keep-alive connections)."""
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        with socket.socket() as s:
            s.connect_ex(("127.0.0.1", port))
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
    if proc.poll() is None:
        proc.kill()
        raise RuntimeError("nginx did not stop")


# The measured nginx's LD_PRELOAD (--fixed-seed: fixed_seed.c built by fixed_seed()), or none.
_preload: list[str] = []


def fixed_seed(directory: Path) -> None:
    """Build fixed_seed.c into `directory` and preload it into every nginx measured from now on."""
    library = directory / "fixed_seed.so"
    source = Path(__file__).with_name("fixed_seed.c")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(library), str(source), "-ldl"], check=True)
    _preload[:] = [str(library)]


@contextlib.contextmanager
def seeded(required: bool = True) -> Iterator[bool]:
    """Every nginx measured inside with getrandom answered by a fixed sequence (fixed_seed), so that runs
    agree within a few dozen instructions (but for LuaJIT's traces: see --jit-off). Yields whether it is;
    without a C compiler that is an error when ``required``, else it yields False."""
    if shutil.which("cc") is None:
        if required:
            raise RuntimeError("--fixed-seed needs a C compiler (cc)")
        yield False
        return
    with tempfile.TemporaryDirectory(prefix="ishgw-seed-") as tmp:
        fixed_seed(Path(tmp))
        try:
            yield True
        finally:
            _preload[:] = []


@contextlib.contextmanager
def nginx(conf: Path, port: int, valgrind_out: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """nginx in the foreground as one process (under cachegrind when valgrind_out is given)."""
    prefix = conf.parent
    (prefix / "tmp").mkdir(exist_ok=True)
    (prefix / "logs").mkdir(exist_ok=True)
    command = ["nginx", "-p", f"{prefix}/", "-c", str(conf), "-g", "daemon off; master_process off;"]
    env = None
    if valgrind_out is not None:
        cachegrind = ["--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={valgrind_out}"]
        command = ["valgrind", *cachegrind, *command]
        if _preload:
            env = {**os.environ, "LD_PRELOAD": ":".join(_preload)}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        _wait_port(port, proc)
        yield proc
    finally:
        _stop(proc, port)


def instructions(
    conf: Path, port: int, path: str, body: bytes, headers: dict[str, str], requests: int
) -> int:
    """Instructions nginx executed from start to exit, having served `requests` POSTs on one connection."""
    out = conf.parent / "cachegrind.out"
    with nginx(conf, port, out):
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(requests):
            client.request("POST", path, body=body, headers=headers)
            response = client.getresponse()
            response.read()
            if response.status != 200:
                log = conf.parent / "error.log"
                raise RuntimeError(
                    f"HTTP {response.status}: {log.read_text()[-500:] if log.exists() else ''}"
                )
        client.close()
    match = re.search(r"^summary: (\d+)", out.read_text(), re.M)
    if match is None:
        raise RuntimeError("no cachegrind summary")
    return int(match.group(1))


def per_request(conf: Path, port: int, path: str, body: bytes, headers: dict[str, str]) -> int:
    requests = _many[0] if _many else MANY
    many = instructions(conf, port, path, body, headers, requests)
    return (many - instructions(conf, port, path, body, headers, FEW)) // (requests - FEW)


@contextlib.contextmanager
def log_sink(directory: Path) -> Iterator[str]:
    """A unix datagram socket like the controller's log stream, drained by a thread (and the lines
    dropped): nginx never finds it full, so no error path runs. Yields its access_log address."""
    path = directory / "log.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                sock.recv(65535)

    reader = threading.Thread(target=drain, name="log-sink", daemon=True)
    reader.start()
    try:
        yield f"unix:{path}"
    finally:
        stop.set()
        reader.join()
        sock.close()


def measure(only_usage: bool = False, phases: bool = False) -> dict[str, int]:
    """Instructions per request: plain_proxy, gateway (the request path), the VARIANTS, lua_hand_over and
    lua_scan, the USAGE_VARIANTS; and the split: log_line, identity, limits, instance_headers, body_scan,
    usage_json and usage_stream (what counting adds). only_usage: the gateway and the USAGE_VARIANTS;
    phases: also the PHASE_VARIANTS (usage_phases: the counting's Lua phases with empty handlers)."""
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind is not installed (apt-get install valgrind)")
    counts: dict[str, int] = {}
    json_headers = {"Content-Type": "application/json"}
    path = "/v1/chat/completions"
    with (
        tempfile.TemporaryDirectory(prefix="ishgw-instructions-") as tmp,
        log_sink(Path(tmp)) as log_server,
    ):
        root = Path(tmp)
        backend_port, stream_port = free_port(), free_port()
        backend = root / "backend" / "nginx.conf"
        backend.parent.mkdir()
        backend.write_text(static_backend_conf(backend.parent, backend_port, stream_port))
        with nginx(backend, backend_port):
            port = free_port()
            keyed = {**json_headers, "Authorization": f"Bearer {KEY}"}
            body = chat_body(model=MODEL)
            measured = {"gateway": FULL, **USAGE_VARIANTS, **(PHASE_VARIANTS if phases else {})}
            for name, variant in measured.items():
                upstream = stream_port if variant.stream else backend_port
                conf = gateway_tree(root / name, port, upstream, log_server, variant)
                sent = chat_body(stream=True, model=MODEL) if variant.stream else body
                counts[name] = per_request(conf, port, path, sent, keyed)
            counts["usage_json"] = counts["gateway_usage"] - counts["gateway"]
            counts["usage_stream"] = counts["gateway_stream_usage"] - counts["gateway_stream"]
            if phases:
                counts["usage_phases"] = counts["gateway_usage_phases"] - counts["gateway"]
            if only_usage:
                return counts
            plain = root / "plain" / "nginx.conf"
            plain.parent.mkdir()
            plain.write_text(plain_proxy_conf(plain.parent, port, backend_port))
            counts["plain_proxy"] = per_request(plain, port, path, body, json_headers)

            for name, variant in VARIANTS.items():
                conf = gateway_tree(root / name, port, backend_port, log_server, variant)
                counts[name] = per_request(conf, port, path, body, keyed if variant.key else json_headers)

            for name, handler in {"lua_hand_over": HAND_OVER, "lua_scan": SCAN}.items():
                directory = root / name
                directory.mkdir()
                (directory / "nginx.conf").write_text(lua_conf(directory, port, backend_port, handler))
                counts[name] = per_request(directory / "nginx.conf", port, "/", body, json_headers)
    full = counts["gateway"]
    counts["log_line"] = full - counts["gateway_no_log"]
    counts["identity"] = full - counts["gateway_no_key"]
    counts["limits"] = full - counts["gateway_no_limits"]
    counts["instance_headers"] = full - counts["gateway_no_headers"]
    counts["body_scan"] = counts["lua_scan"] - counts["lua_hand_over"]
    return counts


SPLIT = (
    ("body_scan", "the body's model scan (gw.body)"),
    ("identity", "client identity (key lookup, verdict, variables)"),
    ("limits", "limit zones"),
    ("log_line", "the JSON log line"),
    ("instance_headers", "X-ISHGW-Instance/-Attempts"),
    ("usage_json", "usage accounting, JSON answer"),
    ("usage_stream", "usage accounting, SSE stream"),
)


def pool_search(other_pools: int = 999) -> dict[str, int]:
    """Instructions per request of the full gateway with MODEL's pool alone and behind `other_pools`
    upstream blocks: what nginx's search of its upstreams by the variable proxy_pass's name costs."""
    counts: dict[str, int] = {}
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    with (
        tempfile.TemporaryDirectory(prefix="ishgw-instructions-") as tmp,
        log_sink(Path(tmp)) as log_server,
    ):
        root = Path(tmp)
        backend_port = free_port()
        backend = root / "backend" / "nginx.conf"
        backend.parent.mkdir()
        backend.write_text(static_backend_conf(backend.parent, backend_port))
        with nginx(backend, backend_port):
            port = free_port()
            for others in (0, other_pools):
                conf = gateway_tree(root / f"pools{others}", port, backend_port, log_server, FULL, others)
                counts[f"pools_{others + 1}"] = per_request(
                    conf, port, "/v1/chat/completions", chat_body(model=MODEL), headers
                )
    return counts


def split_text(c: dict[str, int]) -> str:
    return "; ".join(f"{label} {c[name]:,}" for name, label in SPLIT if name in c)


def main() -> int:
    args = sys.argv[1:]
    _jit_off[:] = [True] if "--jit-off" in args else []
    _edits[:] = [load_edit(Path(args[args.index("--edit") + 1]))] if "--edit" in args else []
    if "--many" in args:
        _many[:] = [max(FEW + 1, int(args[args.index("--many") + 1]))]
    with seeded() if "--fixed-seed" in args else contextlib.nullcontext(False):
        return _run(args)


def _run(args: list[str]) -> int:
    if "--usage" in args:
        phases = "--phases" in args
        c = measure(only_usage=True, phases=phases)
        empty = f"; the counting's phases with empty handlers +{c['usage_phases']:,}" if phases else ""
        print(
            f"instructions per request: gateway {c['gateway']:,}, with usage accounting "
            f"{c['gateway_usage']:,} (+{c['usage_json']:,}); streamed {c['gateway_stream']:,}, with usage "
            f"accounting {c['gateway_stream_usage']:,} (+{c['usage_stream']:,}){empty}"
        )
        return 0
    if "--pools" in args:  # issue 17: the variable proxy_pass's search through 1,000 upstreams
        p = pool_search()
        print(f"instructions per request: 1 pool {p['pools_1']:,}; behind 999 others {p['pools_1000']:,}")
        return 0
    c = measure()
    ratio = c["gateway"] / c["plain_proxy"]
    print(
        f"instructions per request: plain nginx proxy {c['plain_proxy']:,}; gateway {c['gateway']:,} "
        f"({ratio:.2f}x). Lua hand-over alone (read body, exec): {c['lua_hand_over']:,}. "
        f"Split: {split_text(c)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
