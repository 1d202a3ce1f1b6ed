"""The client access policy, pure and in-process: settings, JWT key files, build_client_access/render,
keys and audit API."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import ssl
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from control_plane import jwt_keys
from control_plane.admin_tls import AdminTlsError, admin_ssl_context
from control_plane.api.address_filter import address_allowed
from control_plane.api.admin import AdminDeps, create_admin_app
from control_plane.api.app_keys import SETTINGS
from control_plane.client_access_settings import ClientAccessSettings, client_access_policy
from control_plane.registry.audit import AuditLog
from control_plane.registry.client_keys import ClientKey, hash_key
from control_plane.registry.models import InstanceConfig, InstanceState, RoutingConfig
from control_plane.registry.store import Store
from control_plane.render.client_access import (
    ClientAccessPolicy,
    JwtFiles,
    JwtKeys,
    PublicKey,
    address_geo,
    build_client_access,
)
from control_plane.render.lua_data import clients_data
from control_plane.render.nginx import SECRET_FILES, render
from control_plane.render.spec import ServerSettings, World, build_spec
from control_plane.settings import Settings
from tests.tls_util import make_self_signed
from tests.unit.test_render import parse_directives

NOW = datetime(2026, 1, 1, tzinfo=UTC)
ADMIN = "admin-key-0123456789abcdef"
AUTH = {"X-Admin-API-Key": ADMIN}


def client_key(i: int, rpm: int, *, enabled: bool = True, models: list[str] | None = None) -> ClientKey:
    return ClientKey(
        id=f"key_{i:016x}",
        name=f"k{i}",
        key_hash=hash_key(f"secret-{i}"),
        key_prefix="ishgw-abcd",
        key_last4="wxyz",
        rpm_limit=rpm,
        enabled=enabled,
        allowed_models=models or [],
        created_at=NOW,
        updated_at=NOW,
    )


# -- settings ----------------------------------------------------------------------------------------------


def test_settings_validate_cidrs_and_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISHGW_IP_DENY", "203.0.113.7, 10.1.2.3/8,2001:db8::/32")
    monkeypatch.setenv("ISHGW_STATUS_ALLOW", "192.168.0.0/16")
    monkeypatch.setenv("ISHGW_JWT_RPM_TIERS", "600,60,600")
    settings = Settings()
    assert settings.ip_deny == ["203.0.113.7/32", "10.0.0.0/8", "2001:db8::/32"]
    assert settings.status_allow == ["192.168.0.0/16"]
    assert settings.jwt_rpm_tiers == [60, 600]
    assert settings.auth_required is True  # required unless said otherwise
    for name, value in (
        ("ISHGW_IP_ALLOW", "10.0.0.0/33"),
        ("ISHGW_ADMIN_IP_DENY", "example.com"),
        ("ISHGW_TRUSTED_PROXIES", "1.2.3.4;deny all"),
        ("ISHGW_STATUS_ALLOW", "x"),
        ("ISHGW_JWT_RPM_TIERS", "0"),
        ("ISHGW_LIMIT_CONN_PER_KEY", "70000"),
        ("ISHGW_JWT_AUDIENCE", "a\nb"),
    ):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(ValidationError):
                Settings()
    with pytest.raises(ValidationError):
        ClientAccessSettings(admin_tls_cert=Path("/c.pem"))  # the key is missing


def test_edge_policy_from_settings() -> None:
    settings = ClientAccessSettings(limit_chat_rpm=10, embeddings_max_body_mb=64, ip_allow=["10.0.0.0/8"])
    policy = client_access_policy(settings, default_body_mb=16)
    assert policy.limit("chat").rpm == 10 and policy.limit("chat").body_mb == 16
    assert policy.limit("embeddings").body_mb == 64
    assert policy.ip_allow == ("10.0.0.0/8",)
    assert policy.jwt_files == JwtFiles()


# -- JWT key files -----------------------------------------------------------------------------------------


def _spki(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_jwks_keys_become_the_same_spki_as_openssl_makes() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    n = rsa_key.public_key().public_numbers()
    p = ec_key.public_key().public_numbers()
    doc = {
        "keys": [
            {
                "kty": "RSA",
                "kid": "r1",
                "n": _b64url(n.n.to_bytes(256, "big")),
                "e": _b64url(b"\x01\x00\x01"),
            },
            {
                "kty": "EC",
                "crv": "P-256",
                "kid": "e1",
                "x": _b64url(p.x.to_bytes(32, "big")),
                "y": _b64url(p.y.to_bytes(32, "big")),
            },
            {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"},  # not for signatures: skipped
        ]
    }
    keys = jwt_keys.parse_jwks(json.dumps(doc))
    assert [(k.alg, k.kid) for k in keys] == [("RS256", "r1"), ("ES256", "e1")]
    assert base64.b64decode(keys[0].spki_b64) == _spki(rsa_key)
    assert base64.b64decode(keys[1].spki_b64) == _spki(ec_key)


def test_pem_keys_are_checked() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pkcs1 = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    text = "\n".join(
        k.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
        for k in (rsa_key, ec_key)
    )
    keys = jwt_keys.parse_pem(text + pkcs1.decode())
    assert [k.alg for k in keys] == ["RS256", "ES256", "RS256"]
    assert keys[0].spki_b64 == keys[2].spki_b64
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    p384 = ec.generate_private_key(ec.SECP384R1())
    for bad in (weak, p384):
        pem = bad.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        with pytest.raises(jwt_keys.JwtConfigError):
            jwt_keys.parse_pem(pem.decode())
    with pytest.raises(jwt_keys.JwtConfigError):
        jwt_keys.parse_pem("no key here")
    with pytest.raises(jwt_keys.JwtConfigError):
        jwt_keys.parse_jwks('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')


def test_secret_file_rules(tmp_path: Path) -> None:
    short, good = tmp_path / "short", tmp_path / "good"
    short.write_text("too-short\n")
    good.write_text("x" * 40 + "\n")
    assert jwt_keys.load(JwtFiles()) is None
    assert jwt_keys.load(JwtFiles(hs256_secret=str(good))) == JwtKeys(hs256_secret="x" * 40)
    with pytest.raises(jwt_keys.JwtConfigError, match="shorter"):
        jwt_keys.load(JwtFiles(hs256_secret=str(short)))
    with pytest.raises(jwt_keys.JwtConfigError):
        jwt_keys.load(JwtFiles(hs256_secret=str(tmp_path / "missing")))
    # In the reconcile loop a broken file switches JWTs off (fail closed) instead of failing the render.
    assert jwt_keys.load_or_none(JwtFiles(jwks=str(tmp_path / "missing"))) is None


# -- build_client_access and render ----------------------------------------------------------------------


def access_tree(keys: tuple[ClientKey, ...], jwt: JwtKeys | None = None, **policy: Any) -> dict[str, str]:
    config = InstanceConfig(
        name="a",
        provider_type="ollama",
        api_base="http://127.0.0.1:1",
        supported_models=["m"],
        instance_type="both",
    )
    world = World(
        instances=((config, InstanceState()),),
        routing=RoutingConfig(),
        now=NOW,
        addresses={"127.0.0.1": ("127.0.0.1",)},
        client_keys=keys,
        jwt=jwt,
    )
    server = ServerSettings(prefix="/p", run_dir="/r", access=ClientAccessPolicy(**policy))
    return render(build_spec(world, server)).files


CHAT_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/api/chat",
    "/api/generate",
)


def locations(servers: str) -> dict[str, str]:
    """The client-facing server's locations by what follows `location` ("= /health", "@gw_denied"): their
    directives."""
    first = servers.split("\n}\n", 1)[0]
    return {name: body for name, body in re.findall(r"\n    location (.+?) \{\n(.*?)\n    \}\n", first, re.S)}


def test_one_zone_per_distinct_rate() -> None:
    keys = (
        client_key(1, 60),
        client_key(2, 60),
        client_key(3, 600),
        client_key(4, 0),
        client_key(5, 99, enabled=False),
    )
    access = build_client_access(ClientAccessPolicy(), keys, None, [])
    assert access.key_rates == (60, 600)
    with_jwt = build_client_access(
        ClientAccessPolicy(jwt_rpm_tiers=(10, 100), jwt_default_rpm=50), keys, JwtKeys("s" * 40), []
    )
    assert with_jwt.key_rates == (10, 50, 60, 100, 600)
    assert build_client_access(ClientAccessPolicy(), keys, JwtKeys(), []).jwt is None  # no usable key: no JWT
    files = access_tree(keys)
    counts = parse_directives(files)
    # Per rate and per IP; the default class limits (anonymous only) guard no location when a key is required.
    assert counts["limit_req_zone"] == 2 + 1
    # Every client-facing API location has the limits, and so does each profile's named location a request
    # is handed to from its endpoint's rewrite phase (and its "_su" twin; not its 429 chain, reached only
    # after the first location's limits): /health, /nginx_status and the other named locations do not.
    servers = files["servers.conf"]
    blocks = locations(servers)
    endpoints = [
        name for name, body in blocks.items() if 'rewrite_by_lua_block { gw_gateway.route("/' in body
    ]
    handed = [name for name in blocks if name.startswith("@x_") and "_429_" not in name]
    answered = ["= /v1/models", "= /api/tags", "= /api/version", "/"]
    assert len(endpoints) == 9 and handed and all(name in blocks for name in answered)
    for name in answered:
        assert blocks[name].count("content_by_lua_block { gw_gateway.answer(") == 1
    limited = sorted([*endpoints, *handed, *answered])
    assert sorted(name for name, body in blocks.items() if "limit_req zone=gw_key_60 " in body) == limited
    assert servers.count("limit_req zone=gw_key_60 ") == len(limited)
    assert servers.count("error_page 439 = @gw_limited;") == len(limited) + 1  # and @gw_unauthorized
    assert "error_page 429 = @gw_limited;" not in servers  # a proxying location's 429 is the instance's
    # Every one but /api/version identifies the client (and refuses one without a valid credential)
    # before the limits, in the rewrite phase (the endpoints' router first of all), and hands one without a
    # valid credential to @gw_unauthorized: the per-address limits guard only that and /api/version (they
    # could never bind elsewhere).
    assert servers.count("rewrite_by_lua_block { gw_gateway.identify() }") == 3
    version = blocks["= /api/version"]
    refused = blocks["@gw_unauthorized"]
    for limit in ("limit_req zone=gw_ip ", "limit_conn gw_conn_ip "):
        assert servers.count(limit) == 2 and limit in version and limit in refused
    assert "gw_class_" not in servers
    # Without ISHGW_AUTH_REQUIRED a request without a valid key goes on as anonymous: every location
    # counts it per address and per class.
    open_files = access_tree(keys, auth_required=False)
    open_servers = open_files["servers.conf"]
    open_blocks = locations(open_servers)
    assert parse_directives(open_files)["limit_req_zone"] == 2 + 1 + 3
    for limit in ("limit_req zone=gw_ip ", "limit_conn gw_conn_ip "):
        assert open_servers.count(limit) == len(limited) + 1
    # the chat endpoints /v1/{chat/completions,completions,responses,messages}, /api/{chat,generate}, and
    # the named locations of chat profiles
    chat = sorted(name for name, body in open_blocks.items() if "limit_req zone=gw_class_chat " in body)
    chat_endpoints = [f'= "{path}"' for path in CHAT_PATHS]
    assert chat == sorted([*chat_endpoints, *(name for name in handed if "_chat_" in name)])
    health = servers.split("location = /health {", 1)[1].split("}", 1)[0]
    assert "limit_req" not in health and "lua" not in health
    data = json.loads(files["clients.json"])
    assert data["keys"][hash_key("secret-3")] == {
        "id": "key_0000000000000003",
        "rpm": 600,
        "expires": 0,
        "enabled": True,
        "models": [],  # no list: all models
    }
    assert data["required"] is True and "jwt" not in data


def test_secrets_only_in_secret_files() -> None:
    secret = "hs256-shared-secret-0123456789abcdef-XYZ"
    files = access_tree(
        (client_key(1, 60),), JwtKeys(hs256_secret=secret, public_keys=(PublicKey("ES256", "QUJD", "k"),))
    )
    assert "clients.json" in SECRET_FILES
    assert [name for name, text in files.items() if secret in text] == ["clients.json"]
    assert all("secret-1" not in text for text in files.values())  # keys leave as hashes only


def test_address_rules_and_real_ip_render() -> None:
    files = access_tree(
        (), ip_allow=("10.0.0.0/8",), ip_deny=("10.9.0.0/16",), trusted_proxies=("192.168.1.0/24",)
    )
    servers = files["servers.conf"]
    blocks = locations(servers)

    def rules(body: str) -> list[str]:
        return [line.strip() for line in body.splitlines() if line.strip().startswith(("allow", "deny"))]

    for name in ("= /v1/models", "= /api/tags", "= /api/version", "/"):
        assert rules(blocks[name]) == ['deny "10.9.0.0/16";', 'allow "10.0.0.0/8";', "deny all;"]
        assert "error_page 403 = @gw_denied;" in blocks[name]
    # An endpoint's location proxies, where an instance's 403 must pass: its router hands a refused
    # address to @gw_denied itself (the same rules, as the geo block it reads).
    chat = blocks['= "/v1/chat/completions"']
    assert rules(chat) == [] and "error_page 403 =" not in chat and "proxy_pass" in chat
    assert "geo $gw_address_refused {" in files["edge.conf"]
    assert 'set_real_ip_from "192.168.1.0/24";' in servers and "real_ip_recursive on;" in servers
    assert "set_real_ip_from" not in access_tree(())["servers.conf"]  # default: no proxy is trusted


def test_address_rules_as_a_geo_block_keep_deny_first() -> None:
    """The early 401 skips addresses the allow/deny rules refuse; geo must agree with deny-first order."""
    assert address_geo((), ()) == ("0", ())
    default, entries = address_geo(
        ("10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16"), ("10.0.0.0/9", "2001:db8::/32")
    )
    assert default == "1"  # an allow list denies everything else
    assert dict(entries) == {
        "10.0.0.0/8": "0",
        "10.1.0.0/16": "1",  # allowed, but inside a denied network: deny comes first
        "192.168.0.0/16": "0",
        "10.0.0.0/9": "1",
        "2001:db8::/32": "1",
    }
    files = access_tree((), ip_allow=("10.0.0.0/8",), ip_deny=("10.9.0.0/16",))
    assert (
        'geo $gw_address_refused {\n    default 1;\n    "10.0.0.0/8" 0;\n    "10.9.0.0/16" 1;\n}'
        in files["edge.conf"]
    )
    assert "geo " not in access_tree(())["edge.conf"]


def test_upstream_header_policy_in_every_pool_location() -> None:
    files = access_tree((client_key(1, 60),))
    counts = parse_directives(files)
    # Every location that proxies: the profiles' named ones and the endpoints' own (their home profile's).
    pools = sum(1 for line in files["servers.conf"].splitlines() if line.strip().startswith("proxy_pass "))
    assert pools > 0
    # The client's cookies, the admin key and its claims about its address never reach a provider; the
    # gateway's own view of the address does (ISHGW_FORWARD_CLIENT_IP, default true).
    lines = Counter(line.strip() for line in files["servers.conf"].splitlines())
    for name in ("Cookie", "X-Admin-API-Key", "Forwarded", "Authorization", "x-api-key", "api-key"):
        assert lines[f'proxy_set_header {name} "";'] == pools, name
    assert lines["proxy_set_header X-Forwarded-For $remote_addr;"] == pools
    assert lines["proxy_set_header X-Real-IP $remote_addr;"] == pools
    assert "$proxy_add_x_forwarded_for" not in files["servers.conf"]
    quiet = Counter(
        line.strip() for line in access_tree((), forward_client_ip=False)["servers.conf"].splitlines()
    )
    assert quiet['proxy_set_header X-Forwarded-For "";'] == quiet['proxy_set_header X-Real-IP "";'] == pools
    assert not any("$remote_addr" in line for line in quiet if line.startswith("proxy_set_header"))
    # Header families are dropped by Lua in the shims only (none here): instances without a shim send none.
    assert counts["header_filter_by_lua_block"] == files["shims.conf"].count("proxy_pass ")
    hidden = Counter(
        line.strip() for line in files["servers.conf"].splitlines() if "proxy_hide_header" in line
    )
    for name in (
        "openai-organization",
        "x-ratelimit-remaining-requests",
        "cf-ray",
        "apim-request-id",
        "set-cookie",
    ):
        assert hidden[f'proxy_hide_header "{name}";'] == pools


def test_clients_data_for_jwt() -> None:
    access = build_client_access(
        ClientAccessPolicy(jwt_audience="aud", jwt_issuer="iss", jwt_rpm_tiers=(60, 600)),
        (),
        JwtKeys(hs256_secret="s" * 40, public_keys=(PublicKey("RS256", "QUJD"),)),
        [],
    )
    data = clients_data(access)
    assert data["jwt"] == {
        "hs256": "s" * 40,
        "keys": [{"alg": "RS256", "spki": "QUJD"}],  # no kid: absent, never null
        "audience": "aud",
        "issuer": "iss",
        "leeway": 30,
        "default_rpm": 600,
        "tiers": [60, 600],
    }


# -- admin API: keys, audit, address filter ---------------------------------------------------------------


@dataclass
class Recorder:
    reasons: list[str] = field(default_factory=list)

    def request(self, reason: str) -> None:
        self.reasons.append(reason)

    async def apply(self, reason: str) -> SimpleNamespace:
        self.reasons.append(reason)
        return SimpleNamespace(ok=True)


@dataclass
class Api:
    client: TestClient[web.Request, web.Application]
    store: Store
    reconciler: Recorder

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        headers = {**AUTH, **kwargs.pop("headers", {})}
        async with self.client.request(method, path, headers=headers, **kwargs) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None


@pytest.fixture
async def api(aiohttp_client: Any) -> Api:
    store = Store("sqlite://")
    store.migrate()
    reconciler = Recorder()
    deps = AdminDeps(
        settings=Settings(admin_ip_deny=["10.0.0.0/8"]),
        store=store,
        reconciler=reconciler,  # type: ignore[arg-type]
        admin_key=ADMIN,
        audit=AuditLog(store),
    )
    return Api(await aiohttp_client(create_admin_app(deps)), store, reconciler)


async def test_key_lifecycle(api: Api) -> None:
    generation = api.store.generation()
    status, created = await api.call(
        "POST", "/admin/keys", json={"name": "team-a", "allowed_models": ["gpt-4o*"]}
    )
    assert status == 201
    secret = created["key"]
    assert secret.startswith("ishgw-") and created["rpm_limit"] is None and created["enabled"] is True
    assert created["key_prefix"] == secret[:10] and created["key_last4"] == secret[-4:]
    assert "key_hash" not in created
    assert api.store.generation() == generation + 1 and api.reconciler.reasons
    key_id = created["id"]

    status, listed = await api.call("GET", "/admin/keys")
    assert status == 200 and [k["id"] for k in listed["keys"]] == [key_id]
    assert secret not in json.dumps(listed) and hashlib.sha256(secret.encode()).hexdigest() not in json.dumps(
        listed
    )

    expires = (NOW + timedelta(days=1)).isoformat()
    status, updated = await api.call(
        "PUT", f"/admin/keys/{key_id}", json={"rpm_limit": 60, "expires_at": expires}
    )
    assert status == 200 and updated["rpm_limit"] == 60 and updated["allowed_models"] == ["gpt-4o*"]
    assert updated["expires_at"].startswith("2026-01-02")
    status, one = await api.call("GET", f"/admin/keys/{key_id}")
    assert one == updated

    # Validation.
    assert (await api.call("POST", "/admin/keys", json={"name": "team-a"}))[0] == 409
    for body in (
        {"name": "bad name"},
        {"name": "x", "allowed_models": ["a b"]},
        {"name": "x", "rpm_limit": -1},
        {"name": "x", "rpm_limit": "60"},
        {"name": "x", "expires_at": "2030-01-01T00:00:00"},  # no timezone
        {"name": "x", "key": "chosen-by-client"},
    ):
        assert (await api.call("POST", "/admin/keys", json=body))[0] == 422, body
    assert (await api.call("PUT", f"/admin/keys/{key_id}", json={"key_hash": "0" * 64}))[0] == 422
    assert (await api.call("GET", "/admin/keys/nope"))[0] == 422
    assert (await api.call("GET", "/admin/keys/key_0000000000000000"))[0] == 404

    assert (await api.call("DELETE", f"/admin/keys/{key_id}"))[0] == 204
    assert (await api.call("GET", f"/admin/keys/{key_id}"))[0] == 404


async def test_audit_records_changes_not_secrets(api: Api) -> None:
    _, created = await api.call("POST", "/admin/keys", json={"name": "audited"})
    await api.call("PUT", f"/admin/keys/{created['id']}", json={"enabled": False})
    await api.call("POST", "/admin/keys", json={"name": "bad name"})  # refused: no change, no entry
    status, _ = await api.call(
        "POST",
        "/admin/instances",
        json={"name": "inst", "provider_type": "openai", "api_key": "sk-secret-000011112222"},
    )
    assert status == 201
    status, audit = await api.call("GET", "/admin/audit")
    assert status == 200
    entries = audit["entries"]
    assert [(e["method"], e["path"], e["status"]) for e in entries] == [
        ("POST", "/admin/instances", 201),
        ("PUT", f"/admin/keys/{created['id']}", 200),
        ("POST", "/admin/keys", 201),
    ]
    assert entries[0]["target"] == "inst" and created["id"] in entries[2]["target"]
    assert {e["actor"] for e in entries} == {"key:" + hashlib.sha256(ADMIN.encode()).hexdigest()[:12]}
    text = json.dumps(entries)
    assert created["key"] not in text and "sk-secret-000011112222" not in text and ADMIN not in text
    assert (await api.call("GET", "/admin/audit", params={"limit": "1"}))[1]["entries"] == entries[:1]
    older = (await api.call("GET", "/admin/audit", params={"before": str(entries[1]["id"])}))[1]["entries"]
    assert older == entries[2:]
    assert (await api.call("GET", "/admin/audit", params={"limit": "0"}))[0] == 422


async def test_refused_admin_keys_are_audited_and_never_lock_out_the_right_one(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="control_plane.audit")
    guesses = [f"guess-{n}-of-the-admin-key" for n in range(12)]
    statuses = [(await api.call("GET", "/admin/keys", headers={"X-Admin-API-Key": g}))[0] for g in guesses]
    assert statuses == [401] * 10 + [429] * 2  # ISHGW_ADMIN_AUTH_FAILURE_LIMIT default 10
    status, listed = await api.call("GET", "/admin/keys")  # the right key, from the same address
    assert status == 200 and "keys" in listed
    entries = (await api.call("GET", "/admin/audit"))[1]["entries"]
    refused = [e for e in entries if e["actor"] == "unauthenticated"]
    # Every refused key (the throttled ones are answered, not recorded one by one): address and time.
    assert len(refused) == 10 and len(entries) == 10
    assert all(
        (e["method"], e["path"], e["status"], e["client_ip"], e["target"])
        == ("GET", "/admin/keys", 401, "127.0.0.1", None)
        and e["at"]
        for e in refused
    )
    written = json.dumps(entries) + caplog.text
    assert not any(g in written for g in guesses)
    assert not any(hashlib.sha256(g.encode()).hexdigest()[:12] in written for g in guesses)
    assert "audit: GET /admin/keys target=- status=401 by unauthenticated from 127.0.0.1" in caplog.text


async def test_admin_address_filter(api: Api) -> None:
    assert address_allowed("10.1.2.3", (), ("10.0.0.0/8",)) is False
    assert address_allowed("::ffff:10.1.2.3", (), ("10.0.0.0/8",)) is False
    assert address_allowed("127.0.0.1", ("10.0.0.0/8",), ()) is False
    assert address_allowed("127.0.0.1", ("127.0.0.0/8",), ("10.0.0.0/8",)) is True
    status, _ = await api.call("GET", "/admin/health")  # the test client is 127.0.0.1: allowed
    assert status == 200
    api.client.app[SETTINGS].admin_ip_allow = ["10.0.0.0/8"]
    status, body = await api.call("GET", "/admin/health")
    assert (status, body["error"]) == (403, "forbidden")


# -- admin TLS -----------------------------------------------------------------------------------------------


def test_admin_tls_rules(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert admin_ssl_context(Settings(home=home, admin_listen="127.0.0.1:9000")) is None
    with pytest.raises(AdminTlsError, match="needs TLS"):
        admin_ssl_context(Settings(home=home, admin_listen="0.0.0.0:9000"))
    with pytest.raises(AdminTlsError):
        admin_ssl_context(Settings(home=home, admin_listen="0.0.0.0:9000", admin_tls=False))
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    make_self_signed(cert, key, "admin", days=1)
    context = admin_ssl_context(
        Settings(home=home, admin_listen="[::]:9000", admin_tls_cert=cert, admin_tls_key=key)
    )
    assert isinstance(context, ssl.SSLContext) and context.minimum_version == ssl.TLSVersion.TLSv1_2
    # The gateway's own certificate is the default.
    (home / "ssl").mkdir(parents=True)
    (home / "ssl" / "cert.pem").write_bytes(cert.read_bytes())
    (home / "ssl" / "key.pem").write_bytes(key.read_bytes())
    assert admin_ssl_context(Settings(home=home, admin_listen="0.0.0.0:9000")) is not None


def test_key_model_lists_whole_in_clients_json() -> None:
    """However long a key's model list, it is one JSON list (nginx maps needed chunks; Lua data does not)."""
    short = client_key(1, 60, models=["gpt-4o", "llama*"])
    long = client_key(2, 60, enabled=False, models=[f"model-{i:03d}-{'x' * 40}" for i in range(200)])
    keys = clients_data(build_client_access(ClientAccessPolicy(), (short, long), JwtKeys(), []))["keys"]
    assert isinstance(keys, dict)
    assert keys[short.key_hash] == {
        "id": "key_0000000000000001",
        "rpm": 60,
        "expires": 0,
        "enabled": True,
        "models": ["gpt-4o", "llama*"],
    }
    assert keys[long.key_hash]["enabled"] is False and keys[long.key_hash]["models"] == long.allowed_models
