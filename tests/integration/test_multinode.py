"""Two gateway nodes on one PostgreSQL registry: a change through either admin API reaches both."""

from __future__ import annotations

import uuid
from pathlib import Path

from control_plane.registry.sealing import create_key
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
                wait_for(
                    lambda node=node: (
                        node.client.post("/v1/chat/completions", json={"model": "m"}).status_code == 200
                    ),
                    timeout=5,
                    what="both nodes serve the instance",
                )
            assert b.admin.delete("/admin/instances/shared").status_code == 204
            for node in (a, b):
                wait_for(
                    lambda node=node: (
                        node.client.post("/v1/chat/completions", json={"model": "m"}).status_code == 404
                    ),
                    timeout=5,
                    what="both nodes dropped it",
                )
            assert a.status()["generation"] == b.status()["generation"]
    finally:
        pg_admin(postgres_server, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
