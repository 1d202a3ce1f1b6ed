"""desired = build_spec(world): the whole data plane as a plain value. Pure: no I/O, no clock."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

from control_plane import providers
from control_plane.providers import ApiFamily, Endpoint, Kind
from control_plane.registry import validators as v
from control_plane.registry.models import (
    BreakerState,
    HealthStatus,
    InstanceConfig,
    InstanceState,
    OperatorStatus,
    ProviderType,
    RoutingConfig,
    Strategy,
    config_fingerprint,
)
from control_plane.render.client_access import (
    ClientAccessPolicy,
    ClientAccessSpec,
    JwtKeys,
    build_client_access,
)
from control_plane.routing import weights as lw
from control_plane.routing.discovery import served_models
from control_plane.usage.model import rates_of

if TYPE_CHECKING:
    from control_plane.registry.client_keys import ClientKey

# Strategies under which nginx accepts `backup` servers (the next priority tier).
BACKUP_CAPABLE = frozenset({Strategy.ROUND_ROBIN, Strategy.WEIGHTED, Strategy.LEAST_CONNECTIONS}) | lw.LEARNED
DEFAULT_PORTS = {"http": 80, "https": 443}
# Replaced in every rendered file by the tree's checksum (render/nginx.py), which also names the
# directory the tree is written to under <prefix>/GENERATIONS_DIR (nginx_process.py).
CHECKSUM_PLACEHOLDER = "@@CHECKSUM@@"
GENERATIONS_DIR = "generations"
# X-ISHGW-Instance's and X-ISHGW-Model's allow-lists (edge.conf.j2): PCRE's and Python's "$" alike also
# match before a final newline.
_INSTANCE_HEADER = re.compile(rf"^(?P<instance>{v.NAME_PATTERN})$")
_MODEL_HEADER = re.compile(rf"^(?P<model>{v.MODEL_PATTERN})$")
# Source values an nginx map reads as its own parameters, quoted or not.
_MAP_PARAMETERS = frozenset({"default", "hostnames", "include", "volatile"})


@dataclass(frozen=True)
class Member:
    instance: str
    address: str  # "host:port" or "unix:/path"
    weight: int
    max_conns: int
    backup: bool = False
    fail_timeout_s: int = 10


MAX_429_LEVELS = 3  # rate-limited instances per request whose Retry-After is kept (see levels_429)


@dataclass(frozen=True, order=True)
class ProxyProfile:
    """The proxy settings pools share. One named location per profile serves every pool with it
    (proxy_pass http://$gw_upstream), so a pool costs the configuration only its upstream block."""

    family: ApiFamily
    kind: Kind
    tries: int
    read_timeout_s: int
    total_timeout_s: int
    # X-ISHGW-Model to the pool: only an Azure instance's shim reads it (its deployment by model); a
    # header costs every request ~800 instructions, and other providers have no use for it.
    model_header: bool = False

    @property
    def name(self) -> str:
        name = f"x_{self.family}_{self.kind}_{self.tries}_{self.read_timeout_s}_{self.total_timeout_s}"
        return name + "_m" if self.model_header else name

    @property
    def levels_429(self) -> int:
        """How many 429s in one request keep their own Retry-After. nginx exposes only the last attempt's
        headers, so a 429 is not retried in place but handed (error_page) to the next of this many
        twin locations, which logs it before retrying the pool; past the last, 429s are retried in place."""
        return min(self.tries, MAX_429_LEVELS + 1) - 1


@dataclass(frozen=True)
class Pool:
    name: str
    family: ApiFamily
    kind: Kind
    model: str
    strategy: Strategy
    members: tuple[Member, ...]
    tries: int
    read_timeout_s: int
    total_timeout_s: int
    excluded: tuple[tuple[str, str], ...] = ()
    # Learned strategies: each available instance's weight, tier, score and reasons (/admin/select).
    choices: tuple[lw.Choice, ...] = ()
    model_header: bool = False  # a member is an Azure instance (ProxyProfile.model_header)

    @property
    def available(self) -> bool:
        return bool(self.members)

    @property
    def profile(self) -> ProxyProfile:
        return ProxyProfile(
            self.family, self.kind, self.tries, self.read_timeout_s, self.total_timeout_s, self.model_header
        )


@dataclass(frozen=True)
class ShimRoute:
    client_path: str
    upstream_path: str  # may contain $gw_dep_<id> for Azure


@dataclass(frozen=True)
class Shim:
    """A per-instance internal server: adds credentials, TLS and path mapping."""

    instance: str
    id: str
    socket: str
    scheme: str
    servers: tuple[str, ...]
    host_header: str
    tls_name: str
    headers: tuple[tuple[str, str], ...]
    routes: tuple[ShimRoute, ...]
    deployments: tuple[tuple[str, str], ...]
    read_timeout_s: int
    maps_deployments: bool = False

    @property
    def upstream(self) -> str:
        """Its upstream block's name."""
        return f"x_{self.id}"


@dataclass(frozen=True)
class World:
    """Everything build_spec reads. Effects (DB, DNS, secret files, clock) fill it in beforehand."""

    instances: tuple[tuple[InstanceConfig, InstanceState], ...]
    routing: RoutingConfig
    now: datetime
    generation: int = 0
    # host -> resolved addresses; a host missing here did not resolve.
    addresses: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # instance name -> secret value (references already resolved); missing: unresolvable reference.
    secrets: Mapping[str, str] = field(default_factory=dict)
    # instance name -> why its api_key cannot be used (never a fragment of the secret).
    secret_problems: Mapping[str, str] = field(default_factory=dict)
    # sha256 of the certificate in use: a renewed certificate changes the checksum, hence a reload.
    tls_fingerprint: str = ""
    # Client API keys (hashes only) and JWT verification keys read from the configured files.
    client_keys: tuple[ClientKey, ...] = ()
    jwt: JwtKeys | None = None
    # model -> the weights a measured strategy applies (control_plane/routing/service.py, with hysteresis).
    learned: Mapping[str, tuple[lw.Choice, ...]] = field(default_factory=dict)
    # When the reading of the states it holds began (world.py): a later pass reads only the states written
    # since (less a margin). Not an input of the spec.
    states_read_at: datetime | None = None


USAGE_SOCKET = "usage.sock"


@dataclass(frozen=True)
class ServerSettings:
    """The parts of Settings the rendered tree depends on."""

    prefix: str
    run_dir: str
    listen_address: str = "0.0.0.0"
    http_port: int = 8080
    https_port: int = 0
    tls_cert: str | None = None
    tls_key: str | None = None
    nginx_user: str | None = None
    nginx_group: str | None = None  # with nginx_user: the workers' group (the unix sockets' directory's)
    worker_processes: str = "auto"
    client_max_body_size_mb: int = 16
    expose_instance_headers: bool = True
    status_allow: tuple[str, ...] = ()
    # Debian's libnginx-mod-http-ndk and libnginx-mod-http-lua, in the order nginx must load them.
    lua_modules: tuple[str, ...] = (
        "/usr/lib/nginx/modules/ndk_http_module.so",
        "/usr/lib/nginx/modules/ngx_http_lua_module.so",
    )
    lua_shm_usage_mb: int = 16
    lua_shm_state_mb: int = 4
    usage_accounting: bool = False  # ISHGW_USAGE_ACCOUNTING: the pool locations count token usage
    stream_usage: bool = True  # ISHGW_STREAM_USAGE: OpenAI streams are asked for their usage
    upstream_ca_file: str = "/etc/ssl/certs/ca-certificates.crt"
    worker_rlimit_nofile: int = 65535
    log_server: str | None = None  # the controller's syslog receiver: "unix:/path" or "127.0.0.1:port" (UDP)
    # With HTTPS on, plain HTTP redirects (but for ACME and /health). Resolved per reconcile from
    # redirect_mode ("auto": only with a certificate clients can verify) by control_plane.certs.
    http_redirect: bool = False
    redirect_mode: str = "auto"
    domains: tuple[str, ...] = ()  # ISHGW_DOMAIN: where the redirect may send a client
    access: ClientAccessPolicy = field(default_factory=ClientAccessPolicy)  # client auth, limits, IP filters
    acme_webroot: str | None = None
    # Issuer chain for OCSP stapling; set per reconcile (control_plane.certs) only when stapling can work.
    tls_trusted_certificate: str | None = None

    @property
    def tree_dir(self) -> str:
        """Where the rendered tree lives once written (control_plane.nginx_process: generations/<checksum>;
        the checksum placeholder is filled in by render)."""
        return f"{self.prefix.rstrip('/')}/{GENERATIONS_DIR}/{CHECKSUM_PLACEHOLDER}"

    @property
    def usage_socket(self) -> str:
        """The unix socket of the usage counters' drain (servers.conf): the controller alone reaches it."""
        return str(Path(self.run_dir) / USAGE_SOCKET)

    @property
    def log_target(self) -> str:
        """The access_log destination of the log stream (log_server must be set)."""
        return f"syslog:server={self.log_server},tag=ishgw,nohostname"


@dataclass(frozen=True)
class GatewaySpec:
    server: ServerSettings
    pools: tuple[Pool, ...]
    shims: tuple[Shim, ...]
    endpoints: tuple[Endpoint, ...]
    aliases: tuple[tuple[str, str], ...]
    fallbacks: tuple[tuple[str, tuple[str, ...]], ...]
    session_header: str
    generation: int
    excluded: tuple[tuple[str, str], ...]
    tls_fingerprint: str = ""
    access: ClientAccessSpec = field(default_factory=ClientAccessSpec)
    # (instance, USD per 1,000 prompt tokens, per 1,000 completion tokens) of every priced instance: what a
    # key's budget is charged in nginx (gw.limits), as the registry charges the drained usage.
    prices: tuple[tuple[str, float, float], ...] = ()

    def profiles(self) -> list[ProxyProfile]:
        """The distinct proxy profiles of the pools that have members, in a stable order."""
        return sorted({pool.profile for pool in self.pools if pool.members})

    def home_profile(self, endpoint: Endpoint) -> ProxyProfile | None:
        """The proxy profile an endpoint's own location proxies with (servers.conf): the one most of the
        endpoint's available pools have (ties: the first in profiles' order), or None when it has none. The
        router (gw.gateway.route, rewrite phase) lets a request to such a pool go on in that location;
        any other goes to its profile's named location (ngx.exec, a second pass through the phases)."""
        return self._home_profiles.get((endpoint.family, endpoint.kind))

    @cached_property
    def _home_profiles(self) -> dict[tuple[ApiFamily, Kind], ProxyProfile]:
        counts: dict[tuple[ApiFamily, Kind], Counter[ProxyProfile]] = {}
        for pool in self.pools:
            if pool.members:
                counts.setdefault((pool.family, pool.kind), Counter())[pool.profile] += 1
        return {key: min(c, key=lambda profile: (-c[profile], profile)) for key, c in counts.items()}

    def strips_stream_usage(self, profile: ProxyProfile) -> bool:
        """Whether the profile's pools get OpenAI streams the router asked for their usage
        (stream_options.include_usage; routes.json's stream_usage endpoints are OpenAI chat kinds): such a
        request goes to the profile's twin location, the only one with a header filter (the usage chunk is
        taken back out, so the answer loses its Content-Length); every other answer is counted without one."""
        server = self.server
        openai_chat = profile.family == "openai" and profile.kind == "chat"
        return server.usage_accounting and server.stream_usage and openai_chat

    def address_names(self) -> dict[str, str]:
        """Upstream address -> instance name, for naming the instance that answered: the first of the pools'
        members there. An address whose pools name different instances (pool_keyed_addresses) also has a
        key per pool, "<pool>|<address>", naming that pool's (logstream.pool_keyed keys an attempt so)."""
        names: dict[str, str] = {}
        by_pool = self._names_by_pool
        for address, pools in by_pool.items():
            names[address] = next(iter(pools.values()))
        for address in self._keyed_addresses:
            for pool, name in by_pool[address].items():
                names[f"{pool}|{address}"] = name
        return names

    # Worked out once per spec, read by several per pass (the health and routing services' address_names,
    # the health service's pool_keyed_addresses, nginx's instance maps): shared, never to be changed.
    @cached_property
    def _names_by_pool(self) -> dict[str, dict[str, str]]:
        """Upstream address -> {pool: the first of its members there}, in pool order."""
        by_pool: dict[str, dict[str, str]] = {}
        for pool in self.pools:
            for member in pool.members:
                by_pool.setdefault(member.address, {}).setdefault(pool.name, member.instance)
        return by_pool

    @cached_property
    def _keyed_addresses(self) -> frozenset[str]:
        """The addresses of _names_by_pool whose pools name different instances (pool_keyed_addresses)."""
        return frozenset(a for a, pools in self._names_by_pool.items() if len(set(pools.values())) > 1)

    def pool_keyed_addresses(self) -> frozenset[str]:
        """Addresses whose pools name different instances: one server registered once per model. nginx
        knows an answer's instance by its address alone, so these are looked up with the pool that
        answered as well (address_names, instance_header_names). Two instances at one address in the
        same pools are one server answering the same models: the first is named for both."""
        return self._keyed_addresses

    def shared_addresses(self) -> dict[str, tuple[str, ...]]:
        """Upstream addresses more than one instance has -> those instances, by name (/admin/status)."""
        seen: dict[str, set[str]] = {}
        for pool in self.pools:
            for member in pool.members:
                seen.setdefault(member.address, set()).add(member.instance)
        return {address: tuple(sorted(names)) for address, names in sorted(seen.items()) if len(names) > 1}

    def model_header_names(self) -> dict[str, str]:
        """Model -> the name as X-ISHGW-Model carries it (what the allow-list regex captures), for the
        pools' models ($gw_model only ever holds one). nginx map strings match ignoring case, so names
        that differ only by case are left to the regex, as are the map's parameter names."""
        models = {pool.model for pool in self.pools}
        folded: dict[str, int] = {}
        for model in models:
            folded[model.lower()] = folded.get(model.lower(), 0) + 1
        names: dict[str, str] = {}
        for model in models:
            match = _MODEL_HEADER.match(model)
            if match and folded[model.lower()] == 1 and model.lower() not in _MAP_PARAMETERS:
                names[model] = match.group("model")
        return names

    def instance_header_names(self) -> InstanceHeaderNames:
        """The instance names as X-ISHGW-Instance carries them (what the header's allow-list regex, PCRE as
        nginx ran it per request, captures; names it refuses are left out), as nginx's maps look them up."""
        names_by_pool, keyed = self._names_by_pool, self._keyed_addresses
        by_address = {
            address: header
            for address, pools in names_by_pool.items()
            if address not in keyed and (header := _instance_header(next(iter(pools.values())))) is not None
        }
        by_pool = {
            f"{pool}|{address}": header
            for address in keyed
            for pool, name in names_by_pool[address].items()
            if (header := _instance_header(name)) is not None
        }
        return InstanceHeaderNames(by_address, tuple(sorted(keyed)), by_pool)

    def upstream_addresses(self) -> list[str]:
        """Every pool member's address, once, sorted."""
        return sorted(self._names_by_pool)


def short_id(text: str, length: int = 12) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# A pool's upstream name: "p_" and a prefix of its hash, 12 to 27 hex digits long (12 and the hash's last
# digit). nginx finds the upstream of `proxy_pass http://$gw_upstream` by a linear search of every upstream
# block that compares a name's length before its bytes (ngx_http_upstream_init_request): with names of one
# length it compared the bytes of all 1,000 pools per request, now those of about 1 in 16. (Longer names
# would spread wider, but every byte of the name costs the request ~70 instructions elsewhere.)
def pool_name(family: ApiFamily, kind: Kind, model: str) -> str:
    digest = hashlib.sha256(f"{family}|{kind}|{model}".encode()).hexdigest()
    return f"p_{digest[: 12 + int(digest[-1], 16)]}"


def shim_id(instance: str) -> str:
    return short_id(f"shim|{instance}", 10)


def exclusion_reason(config: InstanceConfig, state: InstanceState, world: World) -> str | None:
    """Why an instance takes no traffic now, or None when it is available."""
    if not config.enabled:
        return "disabled"
    if state.status is OperatorStatus.DRAINING:
        return "draining"
    if state.status is OperatorStatus.MAINTENANCE:
        return "maintenance"
    if config.api_key and config.name not in world.secrets:
        return world.secret_problems.get(config.name, "api_key reference could not be resolved")
    if state.health_status is HealthStatus.UNHEALTHY:
        since = f" since {state.unhealthy_since.isoformat()}" if state.unhealthy_since else ""
        return f"unhealthy{since}"
    if state.quarantined_reason and state.quarantine_config == config_fingerprint(config):
        return state.quarantined_reason
    if state.breaker_state is BreakerState.OPEN:
        until = f" until {state.breaker_open_until.isoformat()}" if state.breaker_open_until else ""
        return f"breaker open{until}"
    if state.rate_limited_until is not None and state.rate_limited_until > world.now:
        return f"rate-limited until {state.rate_limited_until.isoformat()}"
    if state.rate_budget_until is not None and state.rate_budget_until > world.now:
        return "rate_limit_budget"
    base = providers.base_url(config)
    if base is None:
        return "no api_base configured"
    host = providers.base_parts(base).host
    if not world.addresses.get(host):
        return f"host {host} did not resolve"
    return None


def _host_port(base: str) -> tuple[str, int]:
    parts = providers.base_parts(base)
    return parts.host, parts.port or DEFAULT_PORTS[parts.scheme]


def _join(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _member_address(config: InstanceConfig, world: World, run_dir: str, direct: bool) -> str:
    if direct:
        host, port = _host_port(providers.base_url(config) or "")
        return _join(world.addresses[host][0], port)
    return f"unix:{Path(run_dir) / ('i_' + shim_id(config.name) + '.sock')}"


def build_shim(config: InstanceConfig, world: World, run_dir: str) -> Shim:
    base = providers.base_url(config) or ""
    parts = urlsplit(base)
    host, port = _host_port(base)
    sid = shim_id(config.name)
    is_azure = config.provider_type is ProviderType.AZURE
    routes = tuple(
        ShimRoute(e.path, providers.upstream_path(config, e, "${gw_dep_" + sid + "}" if is_azure else None))
        for e in providers.endpoints_for(config)
    )
    host_header = host if parts.port is None else f"{host}:{port}"
    return Shim(
        instance=config.name,
        id=sid,
        socket=str(Path(run_dir) / f"i_{sid}.sock"),
        scheme=parts.scheme,
        servers=tuple(_join(a, port) for a in world.addresses[host]),
        host_header=host_header,
        tls_name=host,
        headers=tuple(sorted(providers.auth_headers(config, world.secrets.get(config.name)).items())),
        routes=routes,
        deployments=tuple(sorted(config.model_deployments.items())),
        read_timeout_s=max(1, round(config.timeout_seconds)),
        maps_deployments=is_azure,
    )


HALF_OPEN_SCALE = 10  # healthy members' weights are scaled up so a half-open one gets a trickle


def _tiered_members(
    candidates: list[tuple[InstanceConfig, str]], strategy: Strategy, half_open: frozenset[str] = frozenset()
) -> tuple[Member, ...]:
    """Best priority tier serves; the next tier becomes nginx `backup` where the strategy allows it.
    A half-open instance (breaker probing recovery) gets weight 1 against healthy members' scaled weights."""
    tiers = sorted({c.priority for c, _ in candidates})
    if not tiers:
        return ()
    use_backup = strategy in BACKUP_CAPABLE and len(tiers) > 1
    members: list[Member] = []
    scale = HALF_OPEN_SCALE if half_open & {c.name for c, _ in candidates} else 1
    for config, address in sorted(candidates, key=lambda c: c[0].name):
        if config.priority == tiers[0] or (use_backup and config.priority == tiers[1]):
            weight = 1 if strategy is Strategy.ROUND_ROBIN else config.weight
            members.append(
                Member(
                    instance=config.name,
                    address=address,
                    weight=1 if config.name in half_open else weight * scale,
                    max_conns=config.max_concurrent_requests,
                    backup=config.priority != tiers[0],
                    # nginx's own passive check rests a failed server this long: no longer than the
                    # breaker's cool-down, so the breaker keeps seeing the instance's answers.
                    fail_timeout_s=max(1, min(10, round(config.health.breaker_cooldown_s))),
                )
            )
    return tuple(members)


def observation_of(config: InstanceConfig, state: InstanceState) -> lw.Observation:
    """What configuration and state alone say about an instance (measurements: routing/service.py)."""
    return lw.Observation(
        name=config.name,
        breaker=state.breaker_state,
        price=lw.price_of(config),
        quality=config.quality_score,
    )


def _ranked_members(
    candidates: list[tuple[InstanceConfig, str]], choices: tuple[lw.Choice, ...]
) -> tuple[Member, ...]:
    """cost_optimized / quality_based: the choices' tiers in place of priorities (tier 1: backup)."""
    by_name = {c.name: c for c in choices}
    members = []
    for config, address in sorted(candidates, key=lambda c: c[0].name):
        choice = by_name[config.name]
        if choice.tier is not None:
            members.append(
                Member(
                    instance=config.name,
                    address=address,
                    weight=choice.weight,
                    max_conns=config.max_concurrent_requests,
                    backup=choice.tier > 0,
                    fail_timeout_s=max(1, min(10, round(config.health.breaker_cooldown_s))),
                )
            )
    return tuple(members)


def _learned(
    world: World,
    strategy: Strategy,
    model: str,
    candidates: list[tuple[InstanceConfig, str]],
    members: tuple[Member, ...],
    half_open: frozenset[str],
    states: Callable[[], Mapping[str, InstanceState]],
) -> tuple[tuple[Member, ...], tuple[lw.Choice, ...]]:
    """A learned strategy's members: tiers by price or quality, or the measured weights last applied (an
    instance not measured yet gets the best weight, so it is measured soon; a half-open one a trickle).
    ``states`` gives every instance's state by name (worked out once a pass, when a pool needs it)."""
    if strategy in lw.RANKED:
        state_of = states()
        choices = lw.ranked(strategy, [observation_of(c, state_of[c.name]) for c, _ in candidates])
        return _ranked_members(candidates, choices), choices
    applied = {c.name: c for c in world.learned.get(model, ())}
    if strategy not in lw.MEASURED or not applied:
        return members, ()

    def weight(member: Member) -> int:
        if member.instance in half_open:
            return lw.HALF_OPEN_WEIGHT
        choice = applied.get(member.instance)
        return choice.weight if choice else lw.SCALE

    weighted = tuple(m if m.backup else replace(m, weight=weight(m)) for m in members)
    serving = {m.instance for m in weighted if not m.backup}
    return weighted, tuple(c for c in applied.values() if c.name in serving)


PoolKey = tuple[ApiFamily, Kind, str]  # (API family, endpoint kind, model): one pool each


@dataclass(frozen=True)
class InstanceFacts:
    """What one build worked out about an instance, kept so that the next pass can update the spec for a
    few changed states (render/update.py) instead of building it again for the whole fleet."""

    reason: str | None  # why it takes no traffic; None: available
    breaker: BreakerState
    served: tuple[str, ...]  # the models it serves (configured, then discovered)
    pools: tuple[PoolKey, ...]  # the pools it is configured in, available or not
    longest: float  # the longest read timeout of those pools (their available members')
    address: str | None  # its upstream address (direct or its shim's socket) when available


def _instance_header(name: str) -> str | None:
    """The name as X-ISHGW-Instance carries it (what its allow-list captures), or None: refused."""
    match = _INSTANCE_HEADER.match(name)
    return None if match is None else match["instance"]


class InstanceHeaderNames(NamedTuple):
    """X-ISHGW-Instance's names for nginx's maps (http.conf.j2)."""

    by_address: dict[str, str]  # an address one instance has -> its name
    shared: tuple[str, ...]  # addresses whose pools name different instances: by "<pool>|<address>"
    by_pool: dict[str, str]  # "<pool>|<address>" -> the name, for those addresses


@dataclass(frozen=True)
class SpecBuild:
    """A spec with what its build worked out on the way: the input of render/update.py's update_spec."""

    world: World
    server: ServerSettings
    spec: GatewaySpec
    facts: Mapping[str, InstanceFacts]
    serving: Mapping[PoolKey, tuple[InstanceConfig, ...]]  # every configured instance per pool, in order
    pool_timeouts: Mapping[PoolKey, float]
    half_open: frozenset[str]
    # Instances out only until a time (rate limits): the clock alone may put them back.
    timed: frozenset[str]


def is_timed(state: InstanceState, now: datetime) -> bool:
    """Whether the clock alone may change the instance's availability (exclusion_reason's time checks)."""
    return (state.rate_limited_until is not None and state.rate_limited_until > now) or (
        state.rate_budget_until is not None and state.rate_budget_until > now
    )


def pool_timeout(configs: Iterable[InstanceConfig], facts: Mapping[str, InstanceFacts]) -> float:
    """A pool's read timeout: its slowest available member's (0 when none is available)."""
    return max((c.timeout_seconds for c in configs if facts[c.name].reason is None), default=0.0)


def instance_address(
    config: InstanceConfig, world: World, run_dir: str, longest: float
) -> tuple[str, Shim | None]:
    """An available instance's upstream address, and its shim unless nginx reaches it directly: an
    instance with a shorter timeout than a pool it is in goes through a shim, whose own timeout cuts it
    off so the pool retries elsewhere in time."""
    endpoints = providers.endpoints_for(config)
    direct = config.timeout_seconds >= longest and providers.is_direct(config, endpoints)
    address = _member_address(config, world, run_dir, direct)
    return address, None if direct else build_shim(config, world, run_dir)


def build_pool(
    world: World,
    key: PoolKey,
    configs: Iterable[InstanceConfig],
    facts: Mapping[str, InstanceFacts],
    half_open: frozenset[str],
    states: Callable[[], Mapping[str, InstanceState]],
) -> Pool:
    family, kind, model = key
    configs = list(configs)
    strategy = world.routing.strategies.get(model, world.routing.default_strategy)
    candidates = [(c, address) for c in configs if (address := facts[c.name].address) is not None]
    members = _tiered_members(candidates, strategy, half_open)
    members, choices = _learned(world, strategy, model, candidates, members, half_open, states)
    in_pool = {m.instance for m in members}
    worse = "worse tier" if strategy in lw.RANKED else "lower priority tier"
    reasons = ((c.name, facts[c.name].reason) for c in configs if c.name not in in_pool)
    pool_excluded = tuple((name, worse if reason is None else reason) for name, reason in reasons)
    chosen = [c for c in configs if c.name in in_pool] or configs
    return Pool(
        name=pool_name(family, kind, model),
        family=family,
        kind=kind,
        model=model,
        strategy=strategy,
        members=members,
        tries=max(1, min(len(members), 1 + max(c.retry_count for c in chosen))) if members else 1,
        read_timeout_s=max(1, round(max(c.timeout_seconds for c in chosen))),
        total_timeout_s=max(1, round(max(c.timeout_seconds * (1 + c.retry_count) for c in chosen))),
        excluded=pool_excluded,
        choices=choices,
        model_header=any(c.provider_type is ProviderType.AZURE for c in configs if c.name in in_pool),
    )


def same_configs(before: World | None, world: World) -> bool:
    """Whether ``world`` holds the very configuration objects of ``before``, in the same order: a pass that
    read only the instances' states (a health verdict). What follows from the configurations alone need
    not be worked out again (the pass's observers: reconciler.observers). Identity, not equality: the
    store hands back the same object for an unchanged row, and comparing 10,000 configurations would cost
    what it saves."""
    if before is None or len(before.instances) != len(world.instances):
        return False
    return all(a[0] is b[0] for a, b in zip(before.instances, world.instances, strict=True))


def state_lookup(world: World) -> Callable[[], Mapping[str, InstanceState]]:
    """Every instance's state by name, worked out on the first call only."""
    cache: list[Mapping[str, InstanceState]] = []

    def states() -> Mapping[str, InstanceState]:
        if not cache:
            cache.append({c.name: st for c, st in world.instances})
        return cache[0]

    return states


def build_spec(world: World, server: ServerSettings) -> GatewaySpec:
    return build_indexed(world, server).spec


def build_indexed(world: World, server: ServerSettings) -> SpecBuild:
    """The spec of ``world``, with what was worked out per instance and pool on the way."""
    reasons = {config.name: exclusion_reason(config, state, world) for config, state in world.instances}
    half_open = frozenset(c.name for c, st in world.instances if st.breaker_state is BreakerState.HALF_OPEN)

    # (family, kind, model) -> every configured instance (by name: several endpoints share a key),
    # available or not, for its configured and discovered models. Each instance's endpoints are worked
    # out once per pass.
    served: dict[str, tuple[str, ...]] = {}
    keys_of: dict[str, list[PoolKey]] = {}
    serving_by_name: dict[PoolKey, dict[str, InstanceConfig]] = {}
    for config, state in world.instances:
        served[config.name] = models = tuple(served_models(config, state))
        keys_of[config.name] = keys = []
        for family, kind in {(e.family, e.kind) for e in providers.endpoints_for(config)}:
            for model in models:
                by_name = serving_by_name.setdefault((family, kind, model), {})
                if config.name not in by_name:
                    by_name[config.name] = config
                    keys.append((family, kind, model))
    serving = {key: tuple(configs.values()) for key, configs in serving_by_name.items()}

    # A pool has one read timeout (its slowest available member's).
    timeouts: dict[PoolKey, float] = {}
    for key, configs in serving.items():
        timeouts[key] = max((c.timeout_seconds for c in configs if reasons[c.name] is None), default=0.0)

    facts: dict[str, InstanceFacts] = {}
    shims: list[Shim] = []
    for config, state in world.instances:
        name = config.name
        longest = max((timeouts[k] for k in keys_of[name]), default=0.0)
        address = None
        if reasons[name] is None:
            address, shim = instance_address(config, world, server.run_dir, longest)
            if shim is not None:
                shims.append(shim)
        facts[name] = InstanceFacts(
            reason=reasons[name],
            breaker=state.breaker_state,
            served=served[name],
            pools=tuple(keys_of[name]),
            longest=longest,
            address=address,
        )

    states = state_lookup(world)
    pools = tuple(
        build_pool(world, key, configs, facts, half_open, states) for key, configs in sorted(serving.items())
    )
    spec = GatewaySpec(
        server=server,
        pools=pools,
        shims=tuple(sorted(shims, key=lambda s: s.instance)),
        endpoints=providers.ENDPOINTS,
        aliases=tuple(sorted(world.routing.model_aliases.items())),
        fallbacks=tuple(sorted((m, tuple(chain)) for m, chain in world.routing.fallbacks.items())),
        session_header=world.routing.session_header,
        generation=world.generation,
        excluded=tuple(sorted((n, r) for n, r in reasons.items() if r is not None)),
        tls_fingerprint=world.tls_fingerprint,
        access=build_client_access(server.access, world.client_keys, world.jwt, providers.ENDPOINTS),
        prices=instance_prices(c for c, _ in world.instances),
    )
    return SpecBuild(
        world=world,
        server=server,
        spec=spec,
        facts=facts,
        serving=serving,
        pool_timeouts=timeouts,
        half_open=half_open,
        timed=frozenset(c.name for c, st in world.instances if is_timed(st, world.now)),
    )


def instance_prices(configs: Iterable[InstanceConfig]) -> tuple[tuple[str, float, float], ...]:
    out = []
    for config in configs:
        rates = rates_of(config)
        if rates.prompt or rates.completion:
            out.append((config.name, rates.prompt, rates.completion))
    return tuple(sorted(out))
