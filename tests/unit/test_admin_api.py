"""Admin HTTP API, built by create_admin_app as in production, against the real store (in-memory SQLite) and a
recording reconciler."""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from control_plane.api.admin import AdminDeps, create_admin_app
from control_plane.api.app_keys import ADMIN_KEY, STORE
from control_plane.api.auth import AuthThrottle
from control_plane.api.instances import NAME_PARAM
from control_plane.api.openapi import build_openapi
from control_plane.api.routes import ROUTES
from control_plane.api.status_page import BROWSER_ROUTES
from control_plane.app import create_app
from control_plane.reconciler import ReconcileResult
from control_plane.registry.models import InstanceConfig, InstanceState, OperatorStatus, RoutingConfig
from control_plane.registry.store import Store
from control_plane.render.spec import GatewaySpec, Pool
from control_plane.settings import Settings

ADMIN = "admin-key-0123456789abcdef"
AUTH = {"X-Admin-API-Key": ADMIN}
SECRET = "sk-live-SECRETSECRET-0042"  # a literal provider key: must never leave in clear


# -- the real store, a recording reconciler -----------------------------------------------------------------


def snapshot(store: Store) -> tuple[Any, ...]:
    """Everything a write could change: configurations, states, routing, the generation."""
    pairs = store.list_instances()
    return (
        {c.name: c.model_dump() for c, _ in pairs},
        {c.name: s.model_dump(exclude={"updated_at"}) for c, s in pairs},
        store.get_routing().model_dump(),
        store.generation(),
    )


def reconciled(ok: bool = True, error: str | None = None) -> ReconcileResult:
    return ReconcileResult(ok, True, "abc" if ok else None, 1, error, 1.0, "2026-01-01T00:00:00+00:00")


@dataclass
class FakeReconciler:
    reasons: list[str] = field(default_factory=list)
    result: ReconcileResult = field(default_factory=reconciled)
    forced: list[bool] = field(default_factory=list)
    applied: ReconcileResult = field(default_factory=reconciled)

    def request(self, reason: str) -> None:
        self.reasons.append(reason)

    async def apply(self, reason: str) -> ReconcileResult:
        self.reasons.append(reason)
        return self.applied

    async def reconcile_now(self, *, force: bool = False) -> ReconcileResult:
        self.forced.append(force)
        return self.result

    spec: GatewaySpec | None = None  # no pass yet

    def status(self, pools: Sequence[Pool] | None = None) -> dict[str, object]:
        return {
            "checksum": "abc",
            "applied": None,
            "last_reload": None,
            "reloads": 0,
            "reload_failures": 0,
            "pools": [],
            "excluded": {},
        }


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- fixtures --------------------------------------------------------------------------------------------


@dataclass
class Api:
    client: TestClient[web.Request, web.Application]
    store: Store
    reconciler: FakeReconciler
    clock: Clock
    bodies: list[str] = field(default_factory=list)

    async def call(
        self, method: str, path: str, *, auth: bool = True, **kwargs: Any
    ) -> tuple[int, Any, dict[str, str]]:
        headers = {**(AUTH if auth else {}), **kwargs.pop("headers", {})}
        async with self.client.request(method, path, headers=headers, **kwargs) as resp:
            text = await resp.text()
            self.bodies.append(text)
            ctype = resp.content_type
            body = json.loads(text) if text and ctype == "application/json" else text
            return resp.status, body, dict(resp.headers)


@pytest.fixture
def store() -> Iterator[Store]:
    store = Store("sqlite://")
    store.migrate()
    yield store
    store.close()


@pytest.fixture
async def api(aiohttp_client: Any, tmp_path: Path, store: Store) -> Api:
    reconciler, clock = FakeReconciler(), Clock()
    # The provider credentials instances may reference as env:NAME (the values do not matter here).
    (tmp_path / "provider.env").write_text("OPENAI_KEY=x\nB_KEY=y\n")
    deps = AdminDeps(
        settings=Settings(home=tmp_path),
        store=store,
        reconciler=reconciler,  # type: ignore[arg-type]
        admin_key=ADMIN,
        throttle=AuthThrottle(clock=clock),
    )
    return Api(await aiohttp_client(create_admin_app(deps)), store, reconciler, clock)


def stored(api: Api, name: str) -> tuple[InstanceConfig, InstanceState]:
    return api.store.get_instance(name)


def names(api: Api) -> set[str]:
    return {config.name for config, _ in api.store.list_instances()}


def config(name: str = "inst-a", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "provider_type": "openai",
        "api_key": SECRET,
        "supported_models": ["gpt-4o"],
        **extra,
    }


async def create(api: Api, name: str = "inst-a", **extra: Any) -> dict[str, Any]:
    status, body, _ = await api.call("POST", "/admin/instances", json=config(name, **extra))
    assert status == 201, body
    return body  # type: ignore[no-any-return]


def fields(body: dict[str, Any]) -> set[str]:
    return {item["field"] for item in body["detail"]}


# -- auth ------------------------------------------------------------------------------------------------


async def test_missing_and_wrong_key_are_401(api: Api) -> None:
    for headers in (
        {},
        {"X-Admin-API-Key": "nope"},
        {"Authorization": "Bearer nope"},
        {"Authorization": ADMIN},
    ):
        status, body, resp_headers = await api.call("GET", "/admin/instances", auth=False, headers=headers)
        assert status == 401
        assert body["error"] == "unauthorized" and "X-Admin-API-Key" in body["detail"]
        assert resp_headers["WWW-Authenticate"] == "Bearer"


async def test_header_and_bearer_keys_are_accepted(api: Api) -> None:
    status, _, _ = await api.call("GET", "/admin/instances", auth=False, headers=AUTH)
    assert status == 200
    status, _, _ = await api.call(
        "GET", "/admin/instances", auth=False, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert status == 200


async def test_public_routes_need_no_key(api: Api) -> None:
    assert (await api.call("GET", "/admin/health", auth=False))[:2] == (200, {"ok": True})
    status, body, _ = await api.call("GET", "/admin/openapi.json", auth=False)
    assert status == 200 and body["openapi"].startswith("3.1")


async def test_unknown_routes_answer_json(api: Api) -> None:
    """Every error has `error` (a stable code) and `detail` (what went wrong), as the README promises."""
    assert (await api.call("GET", "/admin/nope", auth=False))[0] == 401
    for path, auth in (("/admin/nope", True), ("/elsewhere", False)):
        status, body, _ = await api.call("GET", path, auth=auth)
        assert (status, body["error"]) == (404, "not_found") and "openapi.json" in body["detail"]
    status, body, headers = await api.call("PATCH", "/admin/routing")
    assert (status, body["error"]) == (405, "method_not_allowed") and "PUT" in body["detail"]
    assert "PUT" in headers["Allow"]


async def test_failed_authentications_are_throttled(api: Api) -> None:
    for _ in range(10):
        assert (await api.call("GET", "/admin/status", auth=False, headers={"X-Admin-API-Key": "x"}))[
            0
        ] == 401
    api.clock.now += 20
    wrong = {"X-Admin-API-Key": "y"}
    status, body, headers = await api.call("GET", "/admin/status", auth=False, headers=wrong)
    assert status == 429 and body["error"] == "too_many_requests"
    assert headers["Retry-After"] == "40"
    # Issue 19: the right key is never throttled (ten wrong guesses must not lock the operator out).
    assert (await api.call("GET", "/admin/status"))[0] == 200
    assert (await api.call("GET", "/admin/status", auth=False, headers=wrong))[0] == 429
    assert (await api.call("GET", "/admin/health", auth=False))[0] == 200  # public routes stay open
    api.clock.now += 41
    assert (await api.call("GET", "/admin/status", auth=False, headers=wrong))[0] == 401


def test_admin_key_setting_is_long_enough_to_resist_guessing() -> None:
    with pytest.raises(ValueError, match="admin_api_key"):
        Settings(admin_api_key="short-key-123")
    assert Settings(admin_api_key=ADMIN).admin_api_key == ADMIN


def test_throttle_is_bounded() -> None:
    clock = Clock()
    throttle = AuthThrottle(limit=2, window_s=60, max_entries=3, clock=clock)
    for i in range(10):
        throttle.record_failure(f"10.0.0.{i}")
    assert len(throttle) == 3
    throttle.record_failure("10.0.0.9")
    assert throttle.retry_after("10.0.0.9") == 60
    assert throttle.retry_after("10.0.0.8") is None


# -- CRUD ------------------------------------------------------------------------------------------------


async def test_crud_happy_path(api: Api) -> None:
    body = await create(api, weight=5)
    assert body["name"] == "inst-a"
    assert body["config"]["weight"] == 5 and body["state"]["status"] == "active"
    status, listing, _ = await api.call("GET", "/admin/instances")
    assert status == 200 and [i["name"] for i in listing["instances"]] == ["inst-a"]
    status, item, _ = await api.call("GET", "/admin/instances/inst-a")
    assert status == 200 and item == listing["instances"][0]
    assert (await api.call("GET", "/admin/instances/inst-a/config"))[1] == item["config"]
    assert (await api.call("GET", "/admin/instances/inst-a/state"))[1] == item["state"]

    status, state, _ = await api.call("PUT", "/admin/instances/inst-a/state", json={"status": "draining"})
    assert status == 200 and state["status"] == "draining"
    assert stored(api, "inst-a")[1].status is OperatorStatus.DRAINING
    generation = api.store.generation()
    status, _, _ = await api.call("PUT", "/admin/instances/inst-a/state", json={"status": "maintenance"})
    assert status == 200 and api.store.generation() == generation  # state is not configuration

    status, text, _ = await api.call("DELETE", "/admin/instances/inst-a")
    assert (status, text) == (204, "")
    assert (await api.call("GET", "/admin/instances/inst-a"))[0] == 404
    assert len(api.reconciler.reasons) == 4


async def test_migrate_is_a_reserved_name(api: Api) -> None:
    status, body, _ = await api.call("POST", "/admin/instances", json=config("migrate"))
    assert status == 422 and fields(body) == {"name"}
    status, body, headers = await api.call("GET", "/admin/instances/migrate")
    assert status == 405 and headers["Allow"] == "POST"
    status, body, _ = await api.call("POST", "/admin/config/import", json={"instances": [config("migrate")]})
    assert status == 422 and fields(body) == {"instances"}
    assert api.store.list_instances() == []


async def test_not_found_and_conflict(api: Api) -> None:
    await create(api)
    status, body, _ = await api.call("POST", "/admin/instances", json=config())
    assert status == 409 and body["error"] == "conflict"
    for method, path, payload in [
        ("GET", "/admin/instances/ghost", None),
        ("GET", "/admin/instances/ghost/config", None),
        ("GET", "/admin/instances/ghost/state", None),
        ("PUT", "/admin/instances/ghost/config", {"weight": 2}),
        ("PUT", "/admin/instances/ghost/state", {"status": "active"}),
        ("DELETE", "/admin/instances/ghost", None),
    ]:
        status, body, _ = await api.call(method, path, json=payload)
        assert status == 404 and body["error"] == "not_found", (method, path)


async def test_routing_get_and_put(api: Api) -> None:
    routing = {
        "model_aliases": {"gpt4": "gpt-4o"},
        "default_strategy": "least_connections",
        "strategies": {"gpt-4o": "round_robin"},
        "session_header": "X-Session",
    }
    status, body, _ = await api.call("PUT", "/admin/routing", json=routing)
    assert status == 200 and body == RoutingConfig.model_validate(routing).model_dump(mode="json")
    assert body.items() >= routing.items()
    assert (await api.call("GET", "/admin/routing"))[1] == body
    assert api.reconciler.reasons == ["routing updated"]
    status, body, _ = await api.call(
        "PUT", "/admin/routing", json={**routing, "session_header": "bad header"}
    )
    assert status == 422 and fields(body) == {"session_header"}


async def test_status_and_health(api: Api) -> None:
    await create(api)
    await create(api, "inst-b", enabled=False)
    status, body, _ = await api.call("GET", "/admin/status")
    assert status == 200
    assert body["generation"] == api.store.generation() > 0
    assert body["instances"] == {"total": 2, "enabled": 1}
    assert body["checksum"] == "abc"


async def test_reload(api: Api) -> None:
    status, body, _ = await api.call("POST", "/admin/reload")
    assert status == 200 and body["ok"] is True and body["checksum"] == "abc"
    assert api.reconciler.forced == [True]
    await create(api)
    api.reconciler.result = reconciled(False, f"nginx -t rejected: unknown token {SECRET}")
    status, body, _ = await api.call("POST", "/admin/reload")
    assert status == 409 and body["ok"] is False
    assert SECRET not in body["error"] and "nginx -t rejected" in body["error"]


# -- partial PUT -----------------------------------------------------------------------------------------


async def test_partial_config_update_merges(api: Api) -> None:
    await create(api, weight=3, tags=["eu"])
    status, body, _ = await api.call("PUT", "/admin/instances/inst-a/config", json={"weight": 7})
    assert status == 200 and body["weight"] == 7 and body["tags"] == ["eu"]
    stored_config, _ = stored(api, "inst-a")
    assert (stored_config.weight, stored_config.tags, stored_config.api_key) == (7, ["eu"], SECRET)
    assert api.reconciler.reasons[-1] == "instance inst-a configuration updated"


async def test_partial_update_merges_nested_health_policy(api: Api) -> None:
    await create(api, health={"rise": 4, "fall": 6})
    status, body, _ = await api.call("PUT", "/admin/instances/inst-a/config", json={"health": {"fall": 7}})
    assert status == 200 and (body["health"]["rise"], body["health"]["fall"]) == (4, 7)
    status, body, _ = await api.call("PUT", "/admin/instances/inst-a/config", json={"health": {"rise": 0}})
    assert status == 422 and fields(body) == {"health.rise"}


async def test_partial_update_masked_key_keeps_and_null_clears(api: Api) -> None:
    created = await create(api)
    masked = created["config"]["api_key"]
    assert masked.startswith("****") and masked != SECRET
    generation = api.store.generation()
    status, body, _ = await api.call(
        "PUT", "/admin/instances/inst-a/config", json={"api_key": masked, "name": "inst-a"}
    )
    assert status == 200 and stored(api, "inst-a")[0].api_key == SECRET
    assert api.store.generation() == generation  # nothing changed: no write, no reload
    status, body, _ = await api.call("PUT", "/admin/instances/inst-a/config", json={"api_key": None})
    assert status == 200 and body["api_key"] is None and stored(api, "inst-a")[0].api_key is None
    status, body, _ = await api.call(
        "PUT", "/admin/instances/inst-a/config", json={"api_key": "env:OPENAI_KEY"}
    )
    assert body["api_key"] == "env:OPENAI_KEY"  # references are not secret


async def test_partial_update_rejects_name_change_and_unknown_fields(api: Api) -> None:
    await create(api)
    before = snapshot(api.store)
    status, body, _ = await api.call("PUT", "/admin/instances/inst-a/config", json={"name": "other"})
    assert status == 422 and fields(body) == {"name"}
    status, body, _ = await api.call("PUT", "/admin/instances/inst-a/config", json={"bogus": 1, "weight": 2})
    assert status == 422 and fields(body) == {"bogus"}
    status, body, _ = await api.call("PUT", "/admin/instances/inst-a/config", json={"weight": -1})
    assert status == 422 and fields(body) == {"weight"}
    assert snapshot(api.store) == before


# -- validation and errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "field_name"),
    [
        (config("bad;name"), "name"),
        (config(api_base="https://api.example.com/v1\nproxy_pass http://evil"), "api_base"),
        (config(weight=-1), "weight"),
        (config(bogus=True), "bogus"),
        (config(weight="5"), "weight"),  # no string-to-number coercion: the schema says integer
        (config(api_key="key with space"), "api_key"),
        (config(api_key="****0042"), "api_key"),
        (config(supported_models=["ok", "bad model"]), "supported_models.1"),
    ],
)
async def test_invalid_instance_is_422_naming_the_field(
    api: Api, payload: dict[str, Any], field_name: str
) -> None:
    before = snapshot(api.store)
    status, body, _ = await api.call("POST", "/admin/instances", json=payload)
    assert status == 422
    assert body["error"] == "invalid_input"
    assert field_name in fields(body)
    assert all(set(item) == {"field", "message"} for item in body["detail"])
    assert snapshot(api.store) == before and api.reconciler.reasons == []


async def test_validation_errors_never_echo_the_value(api: Api) -> None:
    status, body, _ = await api.call("POST", "/admin/instances", json=config(api_key=SECRET + " {;}"))
    assert status == 422 and SECRET not in json.dumps(body)


async def test_invalid_path_name_is_422(api: Api) -> None:
    status, body, _ = await api.call("GET", "/admin/instances/bad;name")
    assert status == 422 and fields(body) == {"name"}


async def test_body_errors(api: Api) -> None:
    await create(api)
    before = snapshot(api.store)
    status, body, _ = await api.call(
        "POST", "/admin/instances", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert (status, body["error"]) == (400, "invalid_json")
    status, body, _ = await api.call(
        "POST", "/admin/instances", data=b'{"weight": NaN}', headers={"Content-Type": "application/json"}
    )
    assert (status, body["error"]) == (400, "invalid_json")
    status, body, _ = await api.call(
        "POST", "/admin/instances", data=json.dumps(config("x")), headers={"Content-Type": "text/plain"}
    )
    assert (status, body["error"]) == (415, "unsupported_media_type")
    status, body, _ = await api.call("POST", "/admin/instances", json=[config("x")])
    assert status == 422 and fields(body) == {"body"}
    status, body, _ = await api.call("PUT", "/admin/instances/inst-a/state", json={"status": "broken"})
    assert status == 422 and fields(body) == {"status"}
    status, body, _ = await api.call("GET", "/admin/config/export?format=xml")
    assert status == 422 and fields(body) == {"format"}
    status, body, _ = await api.call("POST", "/admin/config/import?mode=wipe", json={"instances": []})
    assert status == 422 and fields(body) == {"mode"}
    assert snapshot(api.store) == before


async def test_unexpected_errors_are_500_without_traceback(api: Api) -> None:
    with api.store._engine.begin() as conn:  # the database breaks under the controller
        conn.exec_driver_sql("DROP TABLE instance_state")
    status, body, _ = await api.call("GET", "/admin/instances")
    assert (status, body["error"]) == (500, "internal_error")
    assert set(body) == {"error", "detail"} and "instance_state" not in body["detail"]


async def test_trailing_newline_is_rejected(api: Api) -> None:
    status, _, _ = await api.call("POST", "/admin/instances", json=config("inst\n", api_key="sk-abc\n"))
    assert status == 422


# -- export / import / migrate ---------------------------------------------------------------------------


async def _seed(api: Api) -> None:
    await create(api, "inst-a", weight=4)
    await create(api, "inst-b", api_key="env:B_KEY", provider_type="anthropic", tags=["x"])
    routing = {"model_aliases": {"fast": "gpt-4o"}, "strategies": {"gpt-4o": "round_robin"}}
    assert (await api.call("PUT", "/admin/routing", json=routing))[0] == 200


@pytest.mark.parametrize(("fmt", "ctype"), [("json", "application/json"), ("yaml", "application/yaml")])
async def test_export_import_round_trip(api: Api, fmt: str, ctype: str) -> None:
    await _seed(api)
    before = snapshot(api.store)
    status, text, headers = await api.call("GET", f"/admin/config/export?format={fmt}")
    assert status == 200 and headers["Content-Type"].startswith(ctype)
    raw = text if isinstance(text, str) else json.dumps(text)
    assert SECRET not in raw
    doc = yaml.safe_load(raw)
    assert {i["name"] for i in doc["instances"]} == {"inst-a", "inst-b"}

    assert (await api.call("DELETE", "/admin/instances/inst-b"))[0] == 204
    assert (await api.call("PUT", "/admin/instances/inst-a/config", json={"weight": 9}))[0] == 200
    status, body, _ = await api.call(
        "POST", "/admin/config/import?mode=replace", data=raw.encode(), headers={"Content-Type": ctype}
    )
    assert status == 200 and body == {"imported": 2, "generation": api.store.generation()}
    after = snapshot(api.store)
    assert after[0] == before[0]  # masked key kept the existing secret; the reference came back verbatim
    assert after[2] == before[2]
    assert api.reconciler.reasons[-1] == "configuration imported"


async def test_import_replace_deletes_and_rejects_bad_documents(api: Api) -> None:
    await _seed(api)
    before = snapshot(api.store)
    bad = {"instances": [config("ok"), config("bad", weight=0)]}
    status, body, _ = await api.call("POST", "/admin/config/import", json=bad)
    assert status == 422 and "instances[1].weight" in fields(body)
    status, body, _ = await api.call(
        "POST", "/admin/config/import", data=b"instances: [\n", headers={"Content-Type": "application/x-yaml"}
    )
    assert status == 422 and fields(body) == {"body"}
    assert snapshot(api.store) == before
    status, body, _ = await api.call(
        "POST", "/admin/config/import?mode=replace", json={"instances": [config("solo")]}
    )
    assert status == 200 and names(api) == {"solo"}


LEGACY = {
    "instance_configs": {
        "legacy-1": {
            "name": "legacy-1",
            "provider_type": "azure_openai",
            "api_key": SECRET,
            "api_base": "https://x.openai.azure.com",
            "api_version": "2024-02-01",
            "supported_models": "gpt-4o, gpt-4o-mini",
            "priority": 2,
            "weight": "",
            "model_deployments": {"gpt-4o": "gpt4o-prod"},
        },
        "legacy-2": {"provider_type": "openai", "api_key": "env:OPENAI_KEY", "max_tpm": 1000},
    },
    "instance_states": {
        "legacy-1": {"status": "draining", "health_status": "healthy", "total_requests": 12, "bogus": 1},
    },
}


async def test_migrate_legacy(api: Api) -> None:
    status, body, _ = await api.call("POST", "/admin/instances/migrate", json=LEGACY)
    assert status == 200 and body == {"imported": ["legacy-1", "legacy-2"], "count": 2}
    assert stored(api, "legacy-1")[0].provider_type == "azure"
    assert stored(api, "legacy-1")[0].supported_models == ["gpt-4o", "gpt-4o-mini"]
    assert stored(api, "legacy-1")[1].status is OperatorStatus.DRAINING
    assert stored(api, "legacy-1")[1].total_requests == 12
    assert api.reconciler.reasons == ["migration imported"]


async def test_migrate_invalid_changes_nothing(api: Api) -> None:
    await create(api)
    before = snapshot(api.store)
    bad = json.loads(json.dumps(LEGACY))
    bad["instance_configs"]["legacy-2"]["weight"] = -3
    status, body, _ = await api.call("POST", "/admin/instances/migrate", json=bad)
    assert status == 422 and "instance_configs.legacy-2.weight" in fields(body)
    payload: dict[str, Any] | list[Any]
    for payload in ({"something": 1}, [], {"ollama_instances": [{"name": "no-url"}]}):
        assert (await api.call("POST", "/admin/instances/migrate", json=payload))[0] == 422
    assert (await api.call("POST", "/admin/instances/migrate?mode=nuke", json=LEGACY))[0] == 422
    assert snapshot(api.store) == before


async def test_migrate_ollama_lists(api: Api) -> None:
    await create(api)
    items = [
        {"base_url": "http://10.0.0.5:11434", "instance_type": "embeddings"},
        {"name": "gpu-box", "base_url": "http://gpu.local:11434/", "enabled": False},
    ]
    status, body, _ = await api.call("POST", "/admin/instances/migrate", json=items)
    assert status == 200 and body["imported"] == ["ollama-10-0-0-5-11434", "gpu-box"]
    assert names(api) == {"inst-a", "ollama-10-0-0-5-11434", "gpu-box"}  # merge keeps inst-a
    status, body, _ = await api.call(
        "POST", "/admin/instances/migrate?mode=replace", json={"ollama_instances": items[1:]}
    )
    assert status == 200 and names(api) == {"gpu-box"}
    assert stored(api, "gpu-box")[0].provider_type == "ollama"


# -- secrets never leave in clear ------------------------------------------------------------------------


async def test_api_key_never_in_any_response(api: Api) -> None:
    await _seed(api)
    await api.call("POST", "/admin/instances/migrate", json=LEGACY)
    name = "inst-a"
    for method, path, payload in [
        ("GET", "/admin/instances", None),
        ("GET", f"/admin/instances/{name}", None),
        ("GET", f"/admin/instances/{name}/config", None),
        ("PUT", f"/admin/instances/{name}/config", {"weight": 2}),
        ("PUT", f"/admin/instances/{name}/config", {"api_key": SECRET + "X"}),
        ("PUT", f"/admin/instances/{name}/config", {"api_key": SECRET}),
        ("PUT", f"/admin/instances/{name}/config", {"api_key": SECRET, "weight": 0}),
        ("GET", f"/admin/instances/{name}/state", None),
        ("GET", "/admin/config/export", None),
        ("GET", "/admin/config/export?format=yaml", None),
        ("GET", "/admin/status", None),
        ("POST", "/admin/instances", config("inst-c")),
        ("POST", "/admin/instances", config("inst-c")),
        ("POST", "/admin/reload", None),
    ]:
        await api.call(method, path, json=payload)
    assert api.bodies and not [b for b in api.bodies if SECRET in b]


# -- OpenAPI ---------------------------------------------------------------------------------------------


def _app_routes(app: web.Application) -> set[tuple[str, str]]:
    return {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }


def _doc_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "patch"}
    return {(m, path) for path, item in doc["paths"].items() for m in item if m in methods}


async def test_openapi_lists_exactly_the_registered_routes(api: Api) -> None:
    status, doc, headers = await api.call("GET", "/admin/openapi.json", auth=False)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    browser = {(method.lower(), path) for method, path, *_ in BROWSER_ROUTES}  # the status page: HTML
    assert _doc_routes(doc) == _app_routes(api.client.app) - browser
    assert _doc_routes(doc) == {(r.method.lower(), r.path.replace(NAME_PARAM, "{name}")) for r in ROUTES}
    assert doc == build_openapi(ROUTES)


def test_openapi_is_self_consistent() -> None:
    doc = build_openapi(ROUTES)
    text = json.dumps(doc)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        node: Any = doc
        for key in ref.removeprefix("#/").split("/"):
            node = node[key]
    assert "$defs" not in text
    assert set(doc["components"]["securitySchemes"]) == {"AdminApiKey", "BearerAuth"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            public = op.get("security") == []
            assert public == (path in ("/admin/health", "/admin/openapi.json")), path
            if not public:
                assert {"401", "429"} <= set(op["responses"]), path
            if "{name}" in path:
                assert {"404", "422"} <= set(op["responses"]), path


def test_openapi_validates() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(build_openapi(ROUTES))


def test_openapi_schemas_accept_what_the_api_returns() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    doc = build_openapi(ROUTES)
    schema = {**doc["components"]["schemas"]["InstanceConfig"], "components": doc["components"]}
    cfg = InstanceConfig.model_validate(config()).model_dump(mode="json")
    cfg["api_key"] = "****0042"
    jsonschema.validate(cfg, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**cfg, "name": "bad;name"}, schema)


# -- the controller's factory ----------------------------------------------------------------------------


async def test_building_the_controller_writes_nothing_and_its_startup_prepares_home(tmp_path: Path) -> None:
    """create_app builds the admin app through create_admin_app and touches no file; the first cleanup
    context does the startup effects (directories, migrations, the registry key, the admin key file)."""
    settings = Settings(home=tmp_path / "h", db_url="sqlite://")
    app = create_app(settings, CollectorRegistry())
    assert list(tmp_path.iterdir()) == [] and ADMIN_KEY not in app
    startup = cast(AsyncIterator[None], app.cleanup_ctx[0](app))  # create_app's is an async generator
    await anext(startup)
    try:
        assert stat.S_IMODE(settings.home.stat().st_mode) == 0o711
        assert stat.S_IMODE((settings.home / "secrets").stat().st_mode) == 0o700
        assert stat.S_IMODE(settings.admin_key_file.stat().st_mode) == 0o600
        assert app[ADMIN_KEY] == settings.admin_key_file.read_text().strip()
        assert settings.registry_key_path.is_file() and (settings.nginx_dir / "generations").is_dir()
        assert app[STORE].generation() == 0 and app[STORE].list_instances() == []  # migrated
    finally:
        with pytest.raises(StopAsyncIteration):
            await anext(startup)
        app[STORE].close()
