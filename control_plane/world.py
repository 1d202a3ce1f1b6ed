"""Effects that fill in a World: registry reads, secret references, DNS. build_spec stays pure.

RegistryWorld is the reconciler's WorldSource in production (control_plane/reconciler.py)."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from control_plane import jwt_keys, providers, secret_refs
from control_plane.registry.client_keys import ClientKeyStore
from control_plane.registry.models import InstanceConfig
from control_plane.registry.store import Store
from control_plane.registry.usage import UsageStore
from control_plane.render.client_access import JwtFiles, JwtKeys
from control_plane.render.spec import GatewaySpec, World
from control_plane.secret_refs import SecretPolicy
from control_plane.usage.limits import write_budget_seed

T = TypeVar("T")


def secrets_of(configs: list[InstanceConfig], policy: SecretPolicy) -> tuple[dict[str, str], dict[str, str]]:
    """instance -> secret, and instance -> why its reference cannot be used (never a secret fragment)."""
    resolved, problems = {}, {}
    for config in configs:
        if config.api_key:
            secret, problem = secret_refs.resolve(config.api_key, policy)
            if secret is not None:
                resolved[config.name] = secret
            else:
                problems[config.name] = problem or "api_key could not be resolved"
    return resolved, problems


async def resolve_host(host: str, timeout: float = 3.0) -> tuple[str, ...]:
    """IPv4 first, stable order; empty when the name does not resolve in time."""
    try:
        ipaddress.ip_address(host)
        return (host,)
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), timeout=timeout)
    except (OSError, TimeoutError):
        return ()
    addresses = sorted({str(info[4][0]) for info in infos}, key=lambda a: (":" in a, a))
    return tuple(addresses)


DNS_TTL_S = 30.0


class HostAddresses:
    """The instances' DNS answers, each kept ``ttl_s`` (a name that did not resolve too): a pass repeats
    no lookup younger than that, so a name whose lookup times out costs its timeout once a TTL, not in
    every pass (every configuration write, every waited admin call). Hosts no instance uses are forgotten."""

    def __init__(
        self,
        ttl_s: float = DNS_TTL_S,
        lookup: Callable[[str], Awaitable[tuple[str, ...]]] = resolve_host,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self.lookup, self.clock = ttl_s, lookup, clock
        self._answers: dict[str, tuple[float, tuple[str, ...]]] = {}  # host -> (looked up at, addresses)

    async def resolve(self, configs: list[InstanceConfig]) -> dict[str, tuple[str, ...]]:
        hosts = sorted({providers.base_host(c) for c in configs} - {""})
        now = self.clock()
        due = [h for h in hosts if (a := self._answers.get(h)) is None or now - a[0] >= self.ttl_s]
        results = await asyncio.gather(*(self.lookup(h) for h in due))
        answers = {h: self._answers[h] for h in hosts if h in self._answers}
        answers.update((h, (now, r)) for h, r in zip(due, results, strict=True))
        self._answers = answers
        return {h: addresses for h, (_, addresses) in answers.items() if addresses}


def file_fingerprint(path: str | None) -> str:
    if not path:
        return ""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return ""


@dataclass(frozen=True)
class Environment:
    """What a world takes from outside the registry: resolved secret references, DNS answers, the
    certificate's fingerprint and the JWT verification keys."""

    secrets: dict[str, str]
    secret_problems: dict[str, str]
    addresses: dict[str, tuple[str, ...]]
    tls_fingerprint: str
    jwt: JwtKeys | None


async def read_environment(
    configs: list[InstanceConfig],
    tls_cert: str | None = None,
    jwt_files: JwtFiles | None = None,
    secret_policy: SecretPolicy | None = None,
    dns: HostAddresses | None = None,
) -> Environment:
    jwt = await asyncio.to_thread(jwt_keys.load_or_none, jwt_files or JwtFiles())
    secrets, problems = await asyncio.to_thread(secrets_of, configs, secret_policy or SecretPolicy())
    return Environment(
        secrets=secrets,
        secret_problems=problems,
        addresses=await (dns or HostAddresses(ttl_s=0)).resolve(configs),
        tls_fingerprint=file_fingerprint(tls_cert),
        jwt=jwt,
    )


async def gather_world(
    store: Store,
    tls_cert: str | None = None,
    jwt_files: JwtFiles | None = None,
    secret_policy: SecretPolicy | None = None,
    dns: HostAddresses | None = None,
) -> World:
    """The registry as it is now. The generation is read first: what the reads after it see is at least
    that generation, and a change committed meanwhile bumps it past the one recorded, so the generation
    watch (Reconciler.watch_generation: several nodes on one PostgreSQL) asks for another pass instead of
    taking the new generation for one already applied and leaving the change to the resync."""
    began = datetime.now(UTC)
    generation = await asyncio.to_thread(store.generation)
    instances = await asyncio.to_thread(store.list_instances)
    client_keys = await asyncio.to_thread(ClientKeyStore(store).list)
    routing = await asyncio.to_thread(store.get_routing)
    configs = [c for c, _ in instances]
    env = await read_environment(configs, tls_cert, jwt_files, secret_policy, dns)
    return World(
        instances=tuple(instances),
        routing=routing,
        now=datetime.now(UTC),
        generation=generation,
        addresses=env.addresses,
        secrets=env.secrets,
        secret_problems=env.secret_problems,
        tls_fingerprint=env.tls_fingerprint,
        client_keys=tuple(client_keys),
        jwt=env.jwt,
        states_read_at=began,
    )


# A delta read asks for the states written since the previous read began, less this: a write stamps its row
# inside its transaction and commits within moments, so one committed just after a read began is still
# caught. Clocks of other nodes (PostgreSQL) further apart than this are caught by the full read of states
# every pass with ``environment`` (once a resync interval).
STATES_MARGIN = timedelta(seconds=2)


async def refresh_world(
    store: Store, previous: World, environment: Environment | None = None
) -> World | None:
    """``previous`` with the instances' states read again and the clock now (and ``environment`` when
    given), when the configuration generation is still the one it was gathered at; None when it is not
    (gather in full). Every configuration write bumps the generation (registry/store.py), so the
    configuration, the routing and the client keys of ``previous`` are still the registry's. The states
    read are those written since ``previous`` read its own, or all of them with ``environment``."""
    began = datetime.now(UTC)
    generation = await asyncio.to_thread(store.generation)
    if generation != previous.generation:
        return None
    since = previous.states_read_at
    if environment is None and since is not None:
        states = await asyncio.to_thread(store.list_states, since - STATES_MARGIN)
    else:
        states = await asyncio.to_thread(store.list_states)
        if len(states) != len(previous.instances):
            return None  # (an instance deleted since the generation was read: its generation is newer)
    instances = []
    for config, state in previous.instances:
        fresh = states.get(config.name, state)
        instances.append((config, state if fresh is not state and fresh == state else fresh))
    world = replace(previous, instances=tuple(instances), now=datetime.now(UTC), states_read_at=began)
    if environment is None:
        return world
    return replace(
        world,
        secrets=_kept(previous.secrets, environment.secrets),
        secret_problems=_kept(previous.secret_problems, environment.secret_problems),
        addresses=_kept(previous.addresses, environment.addresses),
        tls_fingerprint=environment.tls_fingerprint,
        jwt=_kept(previous.jwt, environment.jwt),
    )


def _kept(previous: T, fresh: T) -> T:
    """The previous value when the fresh one equals it (later passes compare it by identity first)."""
    return previous if previous == fresh else fresh


class RegistryWorld:
    """The reconciler's WorldSource: the registry, and the files and names its rows point at."""

    def __init__(
        self,
        store: Store,
        tls_cert: str | None = None,
        jwt_files: JwtFiles | None = None,
        secret_policy: SecretPolicy | None = None,
    ) -> None:
        self.store = store
        self.tls_cert = tls_cert
        self.jwt_files = jwt_files
        self.secret_policy = secret_policy or SecretPolicy()
        self.dns = HostAddresses()

    async def gather(self) -> World:
        return await gather_world(self.store, self.tls_cert, self.jwt_files, self.secret_policy, self.dns)

    async def refresh(self, previous: World, environment: bool) -> World | None:
        env = None
        if environment:
            configs = [c for c, _ in previous.instances]
            env = await read_environment(configs, self.tls_cert, self.jwt_files, self.secret_policy, self.dns)
        return await refresh_world(self.store, previous, env)

    async def generation(self) -> int:
        return await asyncio.to_thread(self.store.generation)

    async def seed_budgets(self, spec: GatewaySpec) -> None:
        await asyncio.to_thread(write_budget_seed, UsageStore(self.store), spec, datetime.now(UTC))
