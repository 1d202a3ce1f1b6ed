"""render(spec) -> {relative path: text}. Pure: templates only render, helpers live here."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jinja2

from control_plane.health.logstream import LOG_FIELDS, LogField
from control_plane.registry import validators
from control_plane.render.client_access import LIMITED_STATUS
from control_plane.render.lua_data import data_files
from control_plane.render.quoting import lua_string, nginx_map_regex, nginx_quote
from control_plane.render.spec import CHECKSUM_PLACEHOLDER, GatewaySpec, Pool

NGINX_DIR = Path(__file__).resolve().parents[2] / "nginx"
LUA_DIR = NGINX_DIR / "lua"
# Files holding credentials: provider keys (shims.conf), the JWT HS256 secret and client key hashes
# (clients.json).
SECRET_FILES = frozenset({"shims.conf", "clients.json"})
TEMPLATES = (
    "nginx.conf",
    "http.conf",
    "edge.conf",
    "pools.conf",
    "shims.conf",
    "servers.conf",
)


@dataclass(frozen=True)
class RenderedTree:
    files: dict[str, str]
    checksum: str


def _bracket_ipv6(value: object) -> str:
    """A host as a URL authority writes it: an IPv6 address in brackets."""
    text = str(value)
    return f"[{text}]" if ":" in text else text


def _comment(value: object) -> str:
    """Safe inside a '#' comment: one line, no control characters."""
    return re.sub(r"[\x00-\x1f\x7f]", "?", str(value))


LOG_FIELDS_PER_LINE = 4

# Every pool's servers live in one shared-memory zone (several upstream groups may share one zone): 1,000
# zones of their own made `nginx -t` and every reload create 1,000 mappings, about a quarter of its CPU
# at 10,000 instances. What nginx 1.22's slab takes (measured: the smallest zone `nginx -t` accepts for a
# given fleet): 770-930 bytes a server (its peer, sockaddr, name and address string; the most for the
# longest address, a unix socket path at the kernel's limit, with a backup server per upstream), about 170
# an upstream, 35 KiB for one upstream of one server. The budget below has 40 % or more headroom over
# that (tests/integration/test_upstream_zone.py holds nginx to it), and the size goes in powers of two:
# a health change (one server more or less) renders the same size.
ZONE_NAME = "gw_pools"
ZONE_BYTES_PER_SERVER = 1280
ZONE_BYTES_PER_UPSTREAM = 512
ZONE_BYTES_BASE = 64 * 1024
ZONE_MIN_MB = 1


def zone_budget(servers: int, upstreams: int) -> int:
    """The bytes the shared upstream zone must hold ``servers`` in ``upstreams`` groups, with headroom."""
    return ZONE_BYTES_BASE + servers * ZONE_BYTES_PER_SERVER + upstreams * ZONE_BYTES_PER_UPSTREAM


def zone_size_mb(servers: int, upstreams: int) -> int:
    """The shared upstream zone's size in MiB: the smallest power of two (at least ZONE_MIN_MB) that holds
    zone_budget. nginx never reuses an upstream zone across a reload (it builds them anew each time), so
    a size that changes costs nothing more than one that does not; the steps keep it (and the rendered
    tree) the same across passes that change the fleet a little."""
    size = ZONE_MIN_MB
    while size * 2**20 < zone_budget(servers, upstreams):
        size *= 2
    return size


def upstream_zone(spec: GatewaySpec) -> str:
    """The zone directive's arguments for every rendered pool: its name and size (pools.conf.j2)."""
    pools = [pool for pool in spec.pools if pool.members]
    size = zone_size_mb(sum(len(pool.members) for pool in pools), len(pools))
    return f"{ZONE_NAME} {size}m"


@cache
def log_format_lines(counting: bool, fields: tuple[LogField, ...] = LOG_FIELDS) -> tuple[str, ...]:
    """log_format gw_log's line, a JSON array of strings, from the one table of its fields
    (health/logstream.py LOG_FIELDS): nginx strings of a few fields each, which nginx joins; each variable
    written as ${name}. The fields that only usage counting fills (the last ones) are left out of a tree
    that does not count."""
    fields = tuple(f for f in fields if counting or not f.counted)
    variables = tuple(f.variable for f in fields)
    pieces = [f'"${{{f.variable}}}"' for f in fields]
    lines = []
    for start in range(0, len(pieces), LOG_FIELDS_PER_LINE):
        text = ",".join(pieces[start : start + LOG_FIELDS_PER_LINE])
        first, last = start == 0, start + LOG_FIELDS_PER_LINE >= len(pieces)
        lines.append(("[" if first else "") + text + ("]" if last else ","))
    return tuple(nginx_quote(line, variables) for line in lines)


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(NGINX_DIR / "templates")),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["q"] = nginx_quote
    env.filters["comment"] = _comment
    env.filters["bracket_ipv6"] = _bracket_ipv6
    env.filters["lua_string"] = lua_string
    # The rules the templates match values by, defined once in Python (registry/validators.py).
    env.globals["model_regex"] = nginx_map_regex(validators.MODEL_PATTERN, "model")
    env.globals["log_format_lines"] = log_format_lines
    env.globals["limited_status"] = LIMITED_STATUS
    return env


@cache
def lua_code() -> dict[str, str]:
    """The request path's Lua modules (nginx/lua/gw/*.lua), as files of the tree: the checksum covers the
    code nginx runs, and a tree is complete in itself. Specs and test drivers stay out."""
    return {f"lua/gw/{path.name}": path.read_text() for path in sorted((LUA_DIR / "gw").glob("*.lua"))}


def upstream_block(pool: Pool, zone: str) -> str:
    """One pool's upstream block in pools.conf (nginx/templates/upstream.j2)."""
    return _environment().get_template("upstream.j2").render(pool=pool, upstream_zone=zone)


class BlockMemo:
    """The upstream blocks of the last render, by pool object: a pass that updated the previous spec
    (render/update.py) holds the previous pass's Pool object for every pool it did not rebuild, so only
    the rebuilt pools' blocks are rendered again (at 10,000 instances the upstream blocks were half of a
    render). Identity, not equality: comparing 1,000 pools' members would cost what it saves. Holds only
    the blocks of the last render (each entry keeps its pool alive, so an id is never reused meanwhile)."""

    def __init__(self) -> None:
        self._blocks: dict[int, tuple[Pool, str, str]] = {}
        self._next: dict[int, tuple[Pool, str, str]] = {}
        self.rendered = 0  # blocks rendered (not taken from the memo) in the last render

    def begin(self) -> None:
        """A render starts (one that failed midway left its blocks unkept)."""
        self.rendered, self._next = 0, {}

    def block(self, pool: Pool, zone: str) -> str:
        entry = self._blocks.get(id(pool))
        if entry is None or entry[0] is not pool or entry[1] != zone:
            entry = (pool, zone, upstream_block(pool, zone))
            self.rendered += 1
        self._next[id(pool)] = entry
        return entry[2]

    def done(self) -> None:
        """The render is over: keep its blocks, drop the rest."""
        self._blocks, self._next = self._next, {}


def render(spec: GatewaySpec) -> RenderedTree:
    return finish_tree(render_files(spec))


def render_files(spec: GatewaySpec, memo: BlockMemo | None = None) -> dict[str, str]:
    """Every file of the tree, the checksum still a placeholder; with ``memo``, the upstream blocks of
    pools unchanged since its last render are taken from it."""
    env = _environment()
    zone = upstream_zone(spec)
    blocks = memo or BlockMemo()
    blocks.begin()
    context = {
        "spec": spec,
        "s": spec.server,
        "upstream_block": lambda pool: blocks.block(pool, zone),
    }
    files = {f"{name}": env.get_template(f"{name}.j2").render(context) for name in TEMPLATES}
    blocks.done()
    files.update(lua_code())
    files.update(data_files(spec))
    return files


def finish_tree(files: dict[str, str]) -> RenderedTree:
    """The tree's checksum, filled in where the files name it."""
    checksum = tree_checksum(files)
    return RenderedTree(
        files={k: v.replace(CHECKSUM_PLACEHOLDER, checksum) for k, v in files.items()},
        checksum=checksum,
    )


def tree_checksum(files: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].encode() + b"\0")
    return digest.hexdigest()[:16]
