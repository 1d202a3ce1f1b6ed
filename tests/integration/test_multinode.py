"""Two gateway nodes on one PostgreSQL registry: a change through either admin API reaches both."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_plane.registry.models import InstanceConfig
from control_plane.registry.sealing import create_key
from control_plane.registry.store import Store
from control_plane.world import RegistryWorld
from tests.backends.stub_llm import StubServer
from tests.integration.conftest import start_stub
from tests.integration.gateway import Gateway, wait_for
from tests.integration.postgres import pg_admin


def test_two_nodes_share_a_postgresql_registry(
    postgres_server: str, stubs: dict[str, StubServer], tmp_path: Path
) -> None:
    database = f"gw_{uuid.uuid4().hex[:12]}"
    pg_admin(postgres_server, f"CREATE DATABASE {database}")
    url = postgres_server.rsplit("/", 1)[0] + f"/{database}"
    create_key(tmp_path / "registry.key")  # the nodes of one registry share its key (README)
    env = {
        "ISHGW_DB_URL": url,
        "ISHGW_GENERATION_POLL_S": "0.3",
        # Only the generation watch brings the other node's changes: the resync (the fallback) is an hour.
        "ISHGW_RESYNC_INTERVAL_S": "3600",
        "ISHGW_REGISTRY_KEY_FILE": str(tmp_path / "registry.key"),
    }
    stub = start_stub(stubs, "shared")
    try:
        with Gateway(extra_env=env) as a, Gateway(extra_env=env) as b:
            r = a.add_instance(
                name="shared", provider_type="ollama", api_base=stub.url, supported_models=["m"]
            )
            assert r.status_code == 201, r.text
            for node in (a, b):

                def serves(node: Gateway = node) -> bool:
                    return node.client.post("/v1/chat/completions", json={"model": "m"}).status_code == 200

                wait_for(serves, timeout=5, what="both nodes serve the instance")
            assert b.admin.delete("/admin/instances/shared").status_code == 204
            for node in (a, b):

                def dropped(node: Gateway = node) -> bool:
                    return node.client.post("/v1/chat/completions", json={"model": "m"}).status_code == 404

                wait_for(dropped, timeout=5, what="both nodes dropped it")
            assert a.status()["generation"] == b.status()["generation"]
            burst_on_a_is_live_on_b(a, b, stub.url)
    finally:
        pg_admin(postgres_server, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


@pytest.fixture
def shared_database(postgres_server: str) -> Iterator[str]:
    """A fresh PostgreSQL database for the nodes of one test."""
    database = f"gw_{uuid.uuid4().hex[:12]}"
    pg_admin(postgres_server, f"CREATE DATABASE {database}")
    try:
        yield postgres_server.rsplit("/", 1)[0] + f"/{database}"
    finally:
        pg_admin(postgres_server, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def weighted(weight: int) -> InstanceConfig:
    return InstanceConfig(
        name="shared",
        provider_type="ollama",
        api_base="http://127.0.0.1:11434",
        supported_models=["m"],
        weight=weight,
    )


async def test_a_world_read_during_writes_is_never_older_than_its_generation(shared_database: str) -> None:
    """Node A writes while node B reads its world (each its own Store on one PostgreSQL). What B read must
    be at least the generation B records: had B recorded a newer one, its generation watch would take A's
    change for one applied, and the change would wait for the resync (30 s)."""
    writer, reader = Store(shared_database), Store(shared_database)
    writer.migrate()
    writer.create_instance(weighted(1))
    first = writer.generation()  # weight w is generation first + w - 1: A is the only writer
    stop = threading.Event()

    def write() -> None:
        for weight in range(2, 1001):
            if stop.is_set():
                return
            writer.replace_config(weighted(weight))

    thread = threading.Thread(target=write, name="node-a-writes")
    seen: list[tuple[int, int]] = []  # (the generation B recorded, the generation of what B read)
    source = RegistryWorld(reader)
    deadline = time.monotonic() + 20
    thread.start()
    try:  # until 30 of B's reads saw distinct writes of A's
        while len({read for _, read in seen}) < 30 and thread.is_alive() and time.monotonic() < deadline:
            world = await source.gather()
            ((config, _state),) = world.instances
            seen.append((world.generation, first + config.weight - 1))
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
        writer.close()
        reader.close()
    older = [(recorded, read) for recorded, read in seen if read < recorded]
    assert older == [], f"{len(older)} of {len(seen)} worlds were older than their generation: {older[:5]}"
    assert len({read for _, read in seen}) >= 30, "the reads did not overlap the writes"


def burst_on_a_is_live_on_b(a: Gateway, b: Gateway, api_base: str) -> None:
    """A burst of changes on node A, without waiting for A's reloads (B reads its world while A commits):
    node B's nginx serves the last one, and B applies the registry's generation."""
    for i in range(20):
        r = a.admin.post(
            "/admin/instances?wait=false",
            json={
                "name": f"burst-{i}",
                "provider_type": "ollama",
                "api_base": api_base,
                "supported_models": [f"burst-m{i}"],
                "discover_models": False,
            },
        )
        assert r.status_code == 202, r.text
    wait_for(
        lambda: b.client.post("/v1/chat/completions", json={"model": "burst-m19"}).status_code == 200,
        timeout=10,
        what="node B serves the last change of the burst",
    )
    generation = b.status()["generation"]
    wait_for(
        lambda: (b.status().get("applied") or {}).get("generation") == generation,
        timeout=5,
        what="node B applied the registry's generation",
    )
    for i in range(20):
        assert b.client.post("/v1/chat/completions", json={"model": f"burst-m{i}"}).status_code == 200
