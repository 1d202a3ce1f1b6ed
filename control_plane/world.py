"""Effects that fill in a World: registry reads, secret references, DNS. build_spec stays pure."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
from datetime import UTC, datetime
from pathlib import Path

from control_plane import jwt_keys, providers, secret_refs
from control_plane.registry.client_keys import ClientKeyStore
from control_plane.registry.models import InstanceConfig
from control_plane.registry.store import Store
from control_plane.render.edge import JwtFiles
from control_plane.render.spec import World
from control_plane.secret_refs import SecretPolicy


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


async def resolve_hosts(configs: list[InstanceConfig]) -> dict[str, tuple[str, ...]]:
    hosts = sorted({providers.base_host(c) for c in configs})
    results = await asyncio.gather(*(resolve_host(h) for h in hosts if h))
    return {h: r for h, r in zip([h for h in hosts if h], results, strict=True) if r}


def file_fingerprint(path: str | None) -> str:
    if not path:
        return ""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return ""


async def gather_world(
    store: Store,
    tls_cert: str | None = None,
    jwt_files: JwtFiles | None = None,
    secret_policy: SecretPolicy | None = None,
) -> World:
    instances = await asyncio.to_thread(store.list_instances)
    client_keys = await asyncio.to_thread(ClientKeyStore(store).list)
    jwt = await asyncio.to_thread(jwt_keys.load_or_none, jwt_files or JwtFiles())
    routing = await asyncio.to_thread(store.get_routing)
    generation = await asyncio.to_thread(store.generation)
    configs = [c for c, _ in instances]
    secrets, problems = await asyncio.to_thread(secrets_of, configs, secret_policy or SecretPolicy())
    return World(
        instances=tuple(instances),
        routing=routing,
        now=datetime.now(UTC),
        generation=generation,
        addresses=await resolve_hosts(configs),
        secrets=secrets,
        secret_problems=problems,
        tls_fingerprint=file_fingerprint(tls_cert),
        client_keys=tuple(client_keys),
        jwt=jwt,
    )
