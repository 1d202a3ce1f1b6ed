"""Issue 4 (clients, limits, headers and hardening), end to end: real controller, real nginx + Lua."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jwt
import openai
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.backends.stub_llm import StubServer
from tests.integration.gateway import ROOT, Gateway, admin_tls_gateway
from tests.ports import free_port

HS256_SECRET = "an-hs256-secret-for-tests-0123456789abcdef"
AUDIENCE = "ish-gateway-tests"
CHAT = "/v1/chat/completions"
# Edge tests switch the limits the default harness turns off back to their defaults.
EDGE_ENV = {
    "ISHGW_AUTH_REQUIRED": "true",
    "ISHGW_LIMIT_IP_RPM": "6000",
    "ISHGW_LIMIT_CHAT_RPM": "3000",
    "ISHGW_LIMIT_EMBEDDINGS_RPM": "12000",
    "ISHGW_PROBES_ENABLED": "false",
}


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Keys:
    """JWT signing material written where the gateway reads it."""

    def __init__(self, directory: Path) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.secret_file = directory / "hs256.secret"
        self.secret_file.write_text(HS256_SECRET + "\n")
        self.pem_file = directory / "public.pem"
        self.pem_file.write_bytes(
            self.rsa.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        numbers = self.ec.public_key().public_numbers()
        self.jwks_file = directory / "jwks.json"
        self.jwks_file.write_text(
            json.dumps(
                {
                    "keys": [
                        {
                            "kty": "EC",
                            "crv": "P-256",
                            "kid": "ec-1",
                            "use": "sig",
                            "x": _b64(numbers.x.to_bytes(32, "big")),
                            "y": _b64(numbers.y.to_bytes(32, "big")),
                        }
                    ]
                }
            )
        )

    def env(self) -> dict[str, str]:
        return {
            "ISHGW_JWT_HS256_SECRET_FILE": str(self.secret_file),
            "ISHGW_JWT_PUBLIC_KEYS_FILE": str(self.pem_file),
            "ISHGW_JWT_JWKS_FILE": str(self.jwks_file),
            "ISHGW_JWT_AUDIENCE": AUDIENCE,
        }


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def token(
    key: Any, alg: str, *, lifetime: float = 300, headers: dict[str, str] | None = None, **claims: Any
) -> str:
    now = int(time.time())
    payload = {"sub": "alice", "aud": AUDIENCE, "iat": now, "exp": now + lifetime, **claims}
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


class Leaky(BaseHTTPRequestHandler):
    """An OpenAI-compatible backend that tells far too much about itself."""

    LEAKS = {
        "openai-organization": "org-secret",
        "openai-processing-ms": "123",
        "openai-version": "2020-10-01",
        "x-ratelimit-remaining-requests": "99",
        "x-ratelimit-limit-tokens": "1000",
        "anthropic-ratelimit-tokens-remaining": "5",
        "cf-ray": "8f00-AMS",
        "x-powered-by": "Express",
        "azureml-model-session": "d123",
        "apim-request-id": "abc",
        "x-ms-region": "West Europe",
        "x-ms-something-new": "1",
        "x-envoy-upstream-service-time": "42",
        "x-kong-proxy-latency": "3",
        "set-cookie": "__cf_bm=tracking; path=/",
        "keep-alive": "timeout=5",
        "x-kept": "fine",
    }

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Server", "leaky/1.0")
        for name, value in self.LEAKS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._json({"object": "list", "data": [{"id": "leaky-model", "object": "model"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._json(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "leaky-model",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
                ],
            }
        )


@pytest.fixture(scope="module")
def leaky() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Leaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture(scope="module")
def backend() -> Iterator[StubServer]:
    stub = StubServer(name="edge-1").start()
    yield stub
    stub.stop()


@pytest.fixture(scope="module")
def jwt_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("jwt"))


@pytest.fixture(scope="module")
def edge(backend: StubServer, leaky: str, jwt_keys: Keys) -> Iterator[Gateway]:
    env = {
        **EDGE_ENV,
        **jwt_keys.env(),
        "ISHGW_TRUSTED_PROXIES": "127.0.0.1",
        "ISHGW_IP_DENY": "203.0.113.0/24",
        # A one-a-minute tier: a token's limit test cannot be undone by a slow second (see its test).
        "ISHGW_JWT_RPM_TIERS": "1,600,6000",
    }
    with Gateway(extra_env=env) as gw:
        for name, models, kind in (
            ("edge-1", ["model-a", "model-b", "llama3"], "ollama"),
            ("edge-anthropic", ["claude-x"], "anthropic"),
        ):
            response = gw.add_instance(
                name=name,
                provider_type=kind,
                api_base=backend.url,
                supported_models=models,
                instance_type="both",
            )
            assert response.status_code == 201, response.text
        # A credentialed (cloud-like) instance: its shim strips whole header families as well.
        response = gw.add_instance(
            name="leaky",
            provider_type="openai_compatible",
            api_base=leaky,
            supported_models=["leaky-model"],
            api_key="sk-leaky-provider-0123",
        )
        assert response.status_code == 201, response.text
        gw.wait_applied()
        yield gw


def new_key(gw: Gateway, name: str, **settings: Any) -> dict[str, Any]:
    response = gw.admin.post("/admin/keys", json={"name": name, **settings})
    assert response.status_code == 201, response.text
    gw.wait_applied()
    return response.json()  # type: ignore[no-any-return]


# -- keys ---------------------------------------------------------------------------------------------------


def test_requests_without_a_valid_key_are_refused(edge: Gateway, backend: StubServer) -> None:
    good = new_key(edge, "good")["key"]
    expired = new_key(edge, "expired", expires_at=(datetime.now(UTC) - timedelta(minutes=1)).isoformat())[
        "key"
    ]
    disabled = new_key(edge, "disabled", enabled=False)["key"]
    client = edge.client
    cases = {
        "missing": {},
        "wrong": bearer("ishgw-not-a-key-at-all"),
        "expired": bearer(expired),
        "disabled": bearer(disabled),
    }
    for case, headers in cases.items():
        r = client.post(CHAT, json=chat("model-a"), headers=headers)
        assert r.status_code == 401, (case, r.text)
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers["WWW-Authenticate"].startswith("Bearer realm=")
        error = r.json()["error"]
        assert error["type"] == "authentication_error" and error["message"], case
    assert (
        "expired"
        in client.post(CHAT, json=chat("model-a"), headers=cases["expired"]).json()["error"]["message"]
    )

    # In the client's own API style.
    r = client.post("/v1/messages", json=chat("claude-x") | {"max_tokens": 5})
    assert r.status_code == 401 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "authentication_error"
    r = client.post("/api/chat", json=chat("llama3"))
    assert r.status_code == 401 and isinstance(r.json()["error"], str)
    assert client.get("/v1/models").status_code == 401
    assert client.get("/api/tags").status_code == 401
    assert client.get("/nope").status_code == 401

    # Every client style of presenting the key works.
    for headers in (bearer(good), {"x-api-key": good}, {"api-key": good}):
        r = client.post(CHAT, json=chat("model-a"), headers=headers)
        assert r.status_code == 200, (headers, r.text)
        assert "Hello from edge-1" in r.text
    # The key never reaches the provider.
    seen = [item for item in backend.requests() if (item.get("json") or {}).get("model") == "model-a"]
    assert seen and all(good not in json.dumps(dict(item["headers"])) for item in seen)

    # Health and stub status stay open.
    assert client.get("/health").status_code == 200
    assert client.get("/nginx_status").status_code == 200

    # The official SDKs.
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{edge.url}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            **chat("model-a")
        )
    sdk = openai.OpenAI(base_url=f"{edge.url}/v1", api_key=good, max_retries=0)
    assert "Hello from edge-1" in (
        sdk.chat.completions.create(**chat("model-a")).choices[0].message.content or ""
    )
    claude = anthropic.Anthropic(base_url=edge.url, api_key=good, max_retries=0)
    message = claude.messages.create(
        model="claude-x", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    assert "Hello from edge-1" in message.content[0].text  # type: ignore[union-attr]


def test_only_hashes_are_stored_and_rendered(edge: Gateway) -> None:
    created = new_key(edge, "hashed", rpm_limit=120, tpm_limit=5000)
    secret = created["key"]
    assert secret.startswith("ishgw-") and len(secret) > 40
    assert (
        created["key_prefix"] == secret[: len(created["key_prefix"])] and created["key_last4"] == secret[-4:]
    )
    listed = edge.admin.get("/admin/keys").json()["keys"]
    one = edge.admin.get(f"/admin/keys/{created['id']}").json()
    assert secret not in json.dumps(listed) and secret not in json.dumps(one)
    assert "key" not in one and "key_hash" not in one
    assert one["tpm_limit"] == 5000 and one["rpm_limit"] == 120
    for path in edge.home.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    live = (edge.home / "nginx" / "live").resolve()
    digest = __import__("hashlib").sha256(secret.encode()).hexdigest()
    assert digest in (live / "clients.json").read_text()
    assert stat.S_IMODE((live / "clients.json").stat().st_mode) == 0o600


def test_secrets_are_in_0600_files_only(edge: Gateway) -> None:
    live = (edge.home / "nginx" / "live").resolve()
    assert stat.S_IMODE(live.stat().st_mode) == 0o700
    holders = [p.name for p in live.rglob("*") if p.is_file() and HS256_SECRET in p.read_text()]
    assert holders == ["clients.json"]
    assert stat.S_IMODE((live / "clients.json").stat().st_mode) == 0o600


def test_key_limited_to_a_model(edge: Gateway) -> None:
    key = new_key(edge, "only-a", allowed_models=["model-a"])["key"]
    client = edge.client
    assert client.post(CHAT, json=chat("model-a"), headers=bearer(key)).status_code == 200
    r = client.post(CHAT, json=chat("model-b"), headers=bearer(key))
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = client.post("/api/chat", json=chat("model-b") | {"stream": False}, headers=bearer(key))
    assert r.status_code == 403 and "model-b" in r.json()["error"]
    assert [m["id"] for m in client.get("/v1/models", headers=bearer(key)).json()["data"]] == ["model-a"]
    assert [m["name"] for m in client.get("/api/tags", headers=bearer(key)).json()["models"]] == ["model-a"]
    everything = new_key(edge, "everything")["key"]
    assert {m["id"] for m in client.get("/v1/models", headers=bearer(everything)).json()["data"]} >= {
        "model-a",
        "model-b",
        "leaky-model",
    }
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=f"{edge.url}/v1", api_key=key, max_retries=0).chat.completions.create(
            **chat("model-b")
        )
    # Patterns.
    pattern = new_key(edge, "pattern", allowed_models=["model-*"])["key"]
    assert client.post(CHAT, json=chat("model-b"), headers=bearer(pattern)).status_code == 200
    assert client.post(CHAT, json=chat("leaky-model"), headers=bearer(pattern)).status_code == 403


def burst(client: httpx.Client, key: str, n: int, model: str = "model-a") -> Counter[int]:
    return Counter(client.post(CHAT, json=chat(model), headers=bearer(key)).status_code for _ in range(n))


def test_key_rate_limit_gives_429_beyond_burst_other_key_unaffected(edge: Gateway) -> None:
    # One request a minute: nothing refills while the test runs, so every request after the burst is
    # refused however slowly a busy machine sends them (at 60 a minute a second's pause let one through).
    slow = new_key(edge, "slow", rpm_limit=1)["key"]
    same_rate = new_key(edge, "same-rate", rpm_limit=1)["key"]
    fast = new_key(edge, "fast", rpm_limit=60000)["key"]
    burst_size = 10  # ISHGW_LIMIT_KEY_BURST default
    started = time.monotonic()
    counts = burst(edge.client, slow, 25)
    elapsed = time.monotonic() - started
    # The burst and one more.
    assert counts == Counter({200: burst_size + 1, 429: 25 - burst_size - 1}), (counts, elapsed)
    r = edge.client.post(CHAT, json=chat("model-a"), headers=bearer(slow))
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert int(r.headers["Retry-After"]) >= 1
    assert r.headers["X-Request-ID"]
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=f"{edge.url}/v1", api_key=slow, max_retries=0).chat.completions.create(
            **chat("model-a")
        )
    # Anthropic clients get Anthropic's error shape.
    r = edge.client.post("/v1/messages", json=chat("claude-x") | {"max_tokens": 5}, headers=bearer(slow))
    assert (
        r.status_code == 429
        and r.json()["error"]["type"] == "rate_limit_error"
        and r.json()["type"] == "error"
    )
    # Meanwhile other keys are not affected: one in the same zone (same rate), one in another.
    assert burst(edge.client, same_rate, 11) == Counter({200: 11})
    assert burst(edge.client, fast, 25) == Counter({200: 25})


def test_internal_redirects_count_once(edge: Gateway) -> None:
    """An alias goes through the router, a named pool location (body rewrite) and back: one request."""
    routing = edge.admin.get("/admin/routing").json()
    routing["model_aliases"] = {"alias-a": "model-a"}
    assert edge.admin.put("/admin/routing", json=routing).status_code == 200
    edge.wait_applied()
    key = new_key(edge, "counted", rpm_limit=60)["key"]
    started = time.monotonic()
    counts = Counter(
        edge.client.post(CHAT, json=chat("alias-a"), headers=bearer(key)).status_code for _ in range(15)
    )
    elapsed = time.monotonic() - started
    # burst 10 + 1 (+1 a second), not half of that as if each request were counted twice
    assert 11 <= counts[200] <= 12 + int(elapsed) and counts[429] == 15 - counts[200], (counts, elapsed)


def test_upstream_429_passes_through(edge: Gateway) -> None:
    """The gateway's own 429 page is for its limits; a provider's 429 reaches the client as it was."""
    with StubServer(name="busy") as busy:
        busy.set_mode("status", status=429, retry_after="7")
        response = edge.add_instance(
            name="busy", provider_type="ollama", api_base=busy.url, supported_models=["model-busy"]
        )
        assert response.status_code == 201
        key = new_key(edge, "upstream-429", rpm_limit=6000)["key"]
        r = edge.client.post(CHAT, json=chat("model-busy"), headers=bearer(key))
        assert r.status_code == 429
        assert r.headers["Retry-After"] == "7"
        assert "gateway" not in r.json()["error"]["message"]
        assert r.json()["error"]["type"] != "rate_limit_error"
        assert edge.admin.delete("/admin/instances/busy").status_code == 204


def add_stub(gw: Gateway, stub: StubServer, model: str, **config: Any) -> str:
    """The stand-in as an Ollama instance (named as the stub) serving `model`, live: the running checksum."""
    response = gw.add_instance(
        name=stub.name, provider_type="ollama", api_base=stub.url, supported_models=[model], **config
    )
    assert response.status_code == 201, response.text
    return gw.wait_applied()


def remove(gw: Gateway, name: str) -> None:
    assert gw.admin.delete(f"/admin/instances/{name}").status_code == 204
    gw.wait_applied()


def test_instance_403_and_413_are_not_taken_for_the_gateways_own(edge: Gateway) -> None:
    """An endpoint's location proxies too (its home profile): an instance's 403 reaches the client as the
    instance sent it (not the address rules' answer), and its 413 is answered in the client's style naming
    the instance (the body-size error_page cannot tell the two apart by status)."""
    with StubServer(name="refusing") as refusing:
        add_stub(edge, refusing, "model-refusing")
        key = new_key(edge, "instance-errors", rpm_limit=6000)["key"]
        refusing.set_mode("status", status=403)
        r = edge.client.post(CHAT, json=chat("model-refusing"), headers=bearer(key))
        assert r.status_code == 403 and "stub injected status 403" in r.text, r.text
        assert "address" not in r.text
        refusing.set_mode("status", status=413)
        r = edge.client.post(CHAT, json=chat("model-refusing"), headers=bearer(key))
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
        assert "larger than the instance accepts" in r.json()["error"]["message"]
        remove(edge, "refusing")


def test_a_request_handed_to_another_profiles_location_meets_its_limits_once(edge: Gateway) -> None:
    """An endpoint's location proxies in place with the profile most of its pools have; a pool with other
    proxy settings (here a longer timeout) is served by its profile's named location, which the router
    hands the request to from the rewrite phase, before the endpoint's limits: they apply there, once."""
    with StubServer(name="patient") as patient:
        checksum = add_stub(edge, patient, "model-patient", timeout_seconds=47)
        routes = json.loads(next(edge.home.rglob(f"generations/{checksum}/routes.json")).read_text())
        home = routes["endpoints"][CHAT]["home"]
        handed = routes["resolve"]["openai|chat"]["model-patient"]["location"]
        assert handed != home and "_47_" in handed, (home, handed)
        key = new_key(edge, "handed", rpm_limit=1)["key"]
        counts = burst(edge.client, key, 15, model="model-patient")
        burst_size = 10  # ISHGW_LIMIT_KEY_BURST default
        assert counts == Counter({200: burst_size + 1, 429: 15 - burst_size - 1}), counts
        remove(edge, "patient")


def test_jwt_bearer_tokens(edge: Gateway, jwt_keys: Keys) -> None:
    client = edge.client

    def status(tok: str, model: str = "model-a") -> int:
        return client.post(CHAT, json=chat(model), headers=bearer(tok)).status_code

    assert status(token(HS256_SECRET, "HS256")) == 200
    assert status(token(jwt_keys.rsa, "RS256")) == 200
    assert status(token(jwt_keys.ec, "ES256", headers={"kid": "ec-1"})) == 200
    assert status(token(jwt_keys.ec, "ES256")) == 200
    # Refused: expired, not yet valid, wrong audience, wrong key, no expiry, alg none, unknown kid.
    expired = token(HS256_SECRET, "HS256", lifetime=-120)
    r = client.post(CHAT, json=chat("model-a"), headers=bearer(expired))
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    assert status(token(jwt_keys.rsa, "RS256", lifetime=-120)) == 401
    assert status(token(HS256_SECRET, "HS256", nbf=int(time.time()) + 600)) == 401
    assert status(token(HS256_SECRET, "HS256", aud="someone-else")) == 401
    assert status(token("another-secret-of-sufficient-length-000000", "HS256")) == 401
    assert status(token(jwt_keys.other_rsa, "RS256")) == 401
    assert status(jwt.encode({"sub": "x", "aud": AUDIENCE}, HS256_SECRET, algorithm="HS256")) == 401
    # alg "none" signs with no key: the None the stubs refuse is the point.
    unsigned = jwt.encode({"sub": "x", "aud": AUDIENCE, "exp": int(time.time()) + 60}, None, algorithm="none")  # type: ignore[arg-type]
    assert status(unsigned + "x") == 401
    assert status(token(jwt_keys.ec, "ES256", headers={"kid": "other"})) == 401
    # A forged RS256 token: right claims, signature from another key.
    good = token(jwt_keys.rsa, "RS256")
    forged = ".".join([*good.split(".")[:2], token(jwt_keys.other_rsa, "RS256").split(".")[2]])
    assert status(forged) == 401
    # Claims map to the same limits as keys: models ...
    assert status(token(HS256_SECRET, "HS256", models=["model-a"]), "model-b") == 403
    assert status(token(jwt_keys.ec, "ES256", models="model-b"), "model-a") == 403
    listed = client.get("/v1/models", headers=bearer(token(jwt_keys.rsa, "RS256", models=["model-b"])))
    assert [m["id"] for m in listed.json()["data"]] == ["model-b"]
    # ... and rpm (rounded down to a configured tier, 1 a minute here: nothing refills during the burst).
    limited = token(HS256_SECRET, "HS256", sub="bob", rpm=100)
    counts = burst(client, limited, 20)
    assert counts == Counter({200: 11, 429: 9}), counts
    # Another subject is not affected.
    assert burst(client, token(HS256_SECRET, "HS256", sub="carol", rpm=100), 5) == Counter({200: 5})


def test_leaked_upstream_headers_are_stripped(edge: Gateway) -> None:
    key = new_key(edge, "headers")["key"]
    r = edge.client.post(CHAT, json=chat("leaky-model"), headers=bearer(key))
    assert r.status_code == 200, r.text
    names = {name.lower() for name in r.headers}
    assert "x-kept" in names
    for leak in Leaky.LEAKS:
        if leak != "x-kept":
            assert leak not in names, leak
    assert r.headers.get("server", "") in ("", "nginx")
    for header in ("x-content-type-options", "x-frame-options", "referrer-policy", "content-security-policy"):
        assert header in names


def test_real_ip_from_trusted_proxy_and_ip_deny(edge: Gateway) -> None:
    key = new_key(edge, "via-proxy")["key"]
    denied = {"X-Forwarded-For": "203.0.113.9", **bearer(key)}
    r = edge.client.post(CHAT, json=chat("model-a"), headers=denied)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert "address" in r.json()["error"]["message"]
    # Without a key as well: the early 401 (issue 19) is not for addresses the rules refuse.
    r = edge.client.post(CHAT, json=chat("model-a"), headers={"X-Forwarded-For": "203.0.113.9"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = edge.client.post(CHAT, json=chat("model-a"), headers={"X-Forwarded-For": "198.51.100.7"})
    assert r.status_code == 401
    allowed = {"X-Forwarded-For": "198.51.100.7", **bearer(key)}
    assert edge.client.post(CHAT, json=chat("model-a"), headers=allowed).status_code == 200
    # The health check is not the client API: it stays reachable.
    assert edge.client.get("/health", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 200


def test_audit_log_records_changes_without_secrets(edge: Gateway) -> None:
    created = new_key(edge, "audited")
    assert edge.admin.put(f"/admin/keys/{created['id']}", json={"rpm_limit": 30}).status_code == 200
    assert edge.admin.delete(f"/admin/keys/{created['id']}").status_code == 204
    r = edge.add_instance(
        name="audited-inst", provider_type="openai", api_key="sk-audit-secret-000111", supported_models=["x"]
    )
    assert r.status_code == 201
    assert edge.admin.delete("/admin/instances/audited-inst").status_code == 204
    entries = edge.admin.get("/admin/audit", params={"limit": 50}).json()["entries"]
    mine = [e for e in entries if created["id"] in (e["target"] or "") or e["target"] == "audited-inst"]
    assert [(e["method"], e["status"]) for e in reversed(mine)] == [
        ("POST", 201),
        ("PUT", 200),
        ("DELETE", 204),
        ("POST", 201),
        ("DELETE", 204),
    ]
    fingerprint = "key:" + __import__("hashlib").sha256(edge.admin_key.encode()).hexdigest()[:12]
    assert all(e["actor"] == fingerprint and e["client_ip"] == "127.0.0.1" and e["at"] for e in mine)
    text = json.dumps(entries) + (edge.home / "controller.log").read_text()
    for secret in (created["key"], "sk-audit-secret-000111", edge.admin_key):
        assert secret not in text
    assert f"audit: DELETE /admin/keys/{created['id']}" in (edge.home / "controller.log").read_text()


# -- separate gateways ---------------------------------------------------------------------------------------


def test_ip_allow_list_and_per_ip_limit(backend: StubServer) -> None:
    env = {
        **EDGE_ENV,
        "ISHGW_AUTH_REQUIRED": "false",
        "ISHGW_LIMIT_IP_RPM": "60",
        "ISHGW_LIMIT_IP_BURST": "4",
    }
    with Gateway(extra_env=env) as gw:
        gw.add_instance(name="ip", provider_type="ollama", api_base=backend.url, supported_models=["model-a"])
        gw.wait_applied()
        started = time.monotonic()
        counts = Counter(gw.client.post(CHAT, json=chat("model-a")).status_code for _ in range(10))
        elapsed = time.monotonic() - started
        assert 5 <= counts[200] <= 6 + int(elapsed) and counts[429] == 10 - counts[200], (counts, elapsed)
    with Gateway(
        extra_env={**EDGE_ENV, "ISHGW_AUTH_REQUIRED": "false", "ISHGW_IP_ALLOW": "10.0.0.0/8"}
    ) as gw:
        r = gw.client.post(CHAT, json=chat("model-a"))
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert gw.client.get("/health").status_code == 200
    with Gateway(extra_env={**EDGE_ENV, "ISHGW_AUTH_REQUIRED": "false", "ISHGW_IP_DENY": "127.0.0.1"}) as gw:
        assert gw.client.get("/api/tags").status_code == 403
        assert gw.client.get("/v1/models").json()["error"]["type"] == "permission_error"


def test_failed_authentications_meet_the_per_address_limit(backend: StubServer) -> None:
    """ISHGW_AUTH_REQUIRED: a request without a valid key is counted per address before its 401, so a
    flood of guessed keys meets the per-address limit; a valid key from the same address is not."""
    env = {**EDGE_ENV, "ISHGW_LIMIT_IP_RPM": "60", "ISHGW_LIMIT_IP_BURST": "4"}
    with Gateway(extra_env=env) as gw:
        gw.add_instance(name="ip", provider_type="ollama", api_base=backend.url, supported_models=["model-a"])
        good = new_key(gw, "good")["key"]
        started = time.monotonic()
        guesses = [bearer(f"guess-{n}") for n in range(10)]
        answers = [gw.client.post(CHAT, json=chat("model-a"), headers=headers) for headers in guesses]
        elapsed = time.monotonic() - started
        counts = Counter(r.status_code for r in answers)
        assert 5 <= counts[401] <= 6 + int(elapsed) and counts[429] == 10 - counts[401], (counts, elapsed)
        refused = next(r for r in answers if r.status_code == 401)
        assert refused.headers["WWW-Authenticate"] == 'Bearer realm="ish-gateway", error="invalid_token"'
        assert refused.json()["error"]["message"] == "The API key is not valid"
        limited = next(r for r in answers if r.status_code == 429)
        assert "Retry-After" in limited.headers and "ISHGW_LIMIT_IP_RPM" in limited.json()["error"]["message"]
        missing = gw.client.post("/api/chat", json=chat("model-a"))  # still counted, still the client's style
        assert missing.status_code == 429 and isinstance(missing.json()["error"], str)
        assert gw.client.post(CHAT, json=chat("model-a"), headers=bearer(good)).status_code == 200


def test_concurrency_limit_per_key(backend: StubServer) -> None:
    with Gateway(extra_env={**EDGE_ENV, "ISHGW_LIMIT_CONN_PER_KEY": "1"}) as gw:
        gw.add_instance(name="c", provider_type="ollama", api_base=backend.url, supported_models=["model-a"])
        busy, other = new_key(gw, "busy")["key"], new_key(gw, "other")["key"]
        slow = {"X-Stub-Chunks": "10", "X-Stub-Chunk-Delay-Ms": "150"}
        body = chat("model-a") | {"stream": True}
        with gw.client.stream("POST", "/api/chat", json=body, headers={**bearer(busy), **slow}) as streaming:
            assert streaming.status_code == 200
            second = gw.client.post(
                "/api/chat", json=chat("model-a") | {"stream": False}, headers=bearer(busy)
            )
            assert second.status_code == 429 and second.headers["Retry-After"] == "1"
            assert "limit" in second.json()["error"]
            alone = gw.client.post(
                "/api/chat", json=chat("model-a") | {"stream": False}, headers=bearer(other)
            )
            assert alone.status_code == 200
            assert b"Hello from edge-1" in b"".join(streaming.iter_bytes())
        assert gw.client.post(CHAT, json=chat("model-a"), headers=bearer(busy)).status_code == 200


def test_body_size_per_endpoint_class(backend: StubServer) -> None:
    env = {**EDGE_ENV, "ISHGW_AUTH_REQUIRED": "false", "ISHGW_CHAT_MAX_BODY_MB": "1"}
    with Gateway(extra_env=env) as gw:
        gw.add_instance(
            name="b",
            provider_type="ollama",
            api_base=backend.url,
            supported_models=["m"],
            instance_type="both",
        )
        gw.wait_applied()
        big = chat("m") | {"padding": "x" * 1_200_000}
        r = gw.client.post(CHAT, json=big)
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
        embed = {"model": "m", "input": "x" * 1_200_000}
        assert gw.client.post("/v1/embeddings", json=embed).status_code == 200  # 16 MB there


def test_admin_listener_beyond_loopback_needs_tls(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "ISHGW_HOME": str(tmp_path / "home"),
        "ISHGW_ADMIN_LISTEN": f"0.0.0.0:{free_port()}",
        "ISHGW_HTTPS_PORT": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "control_plane"], cwd=ROOT, env=env, capture_output=True, timeout=60, text=True
    )
    assert done.returncode == 2
    assert "refusing to start" in done.stderr and "needs TLS" in done.stderr


def test_unusable_jwt_keys_refuse_start(tmp_path: Path) -> None:
    short = tmp_path / "short.secret"
    short.write_text("short\n")
    env = {
        **os.environ,
        "ISHGW_HOME": str(tmp_path / "home"),
        "ISHGW_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
        "ISHGW_HTTP_PORT": str(free_port()),
        "ISHGW_HTTPS_PORT": "0",
        "ISHGW_JWT_HS256_SECRET_FILE": str(short),
    }
    done = subprocess.run(
        [sys.executable, "-m", "control_plane"], cwd=ROOT, env=env, capture_output=True, timeout=60, text=True
    )
    assert done.returncode == 2 and "shorter than 32 bytes" in done.stderr


def test_admin_tls_serves_https(tmp_path: Path) -> None:
    gw = admin_tls_gateway(tmp_path)
    with gw:
        assert gw.admin.get("/admin/health").json() == {"ok": True}
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{gw.admin_port}/admin/health", timeout=3)
