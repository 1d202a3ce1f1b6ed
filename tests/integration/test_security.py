"""Issue 19 (attack run), the client-side items: real controller, real nginx + Lua, a stub backend.

One gateway as deployed by default: HTTPS with a (self-signed) certificate, plain HTTP redirecting to it,
client keys required, RS256 tokens accepted. Every check talks to it over 127.0.0.1.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.backends.stub_llm import StubServer
from tests.integration.gateway import Gateway
from tests.ports import free_port
from tests.tls_util import make_self_signed

CHAT = "/v1/chat/completions"
AUDIENCE = "ish-gateway-security"
STALE_SSL = "ignoring stale global SSL error"


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Secured:
    """The gateway of this module and what a test needs of it."""

    def __init__(self, gw: Gateway, https_port: int, signer: rsa.RSAPrivateKey) -> None:
        self.gw = gw
        self.https_port = https_port
        self.signer = signer
        self.client = httpx.Client(base_url=f"https://127.0.0.1:{https_port}", verify=False, timeout=10)
        self.tls = ssl.create_default_context()
        self.tls.check_hostname = False
        self.tls.verify_mode = ssl.CERT_NONE

    def key(self, name: str, **settings: Any) -> str:
        response = self.gw.admin.post("/admin/keys", json={"name": name, **settings})
        assert response.status_code == 201, response.text
        self.gw.wait_applied()
        return str(response.json()["key"])

    def connect(self) -> ssl.SSLSocket:
        sock = socket.create_connection(("127.0.0.1", self.https_port), timeout=10)
        return self.tls.wrap_socket(sock, server_hostname="127.0.0.1")

    def error_log(self) -> str:
        return (self.gw.home / "nginx" / "logs" / "error.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def backend() -> Iterator[StubServer]:
    stub = StubServer(name="sec-1").start()
    yield stub
    stub.stop()


@pytest.fixture(scope="module")
def secured(backend: StubServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    keys = tmp_path_factory.mktemp("keys")
    signer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = keys / "public.pem"
    pem.write_bytes(
        signer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    https_port = free_port()
    # Under /tmp like the harness's own homes: pytest's base directory is 0700, so nginx's workers could
    # not reach the log stream's socket in it. Gateway.stop removes it.
    home = Path(tempfile.mkdtemp(prefix="ishgw-sec-", dir="/tmp"))
    make_self_signed(home / "ssl" / "cert.pem", home / "ssl" / "key.pem")
    env = {
        "ISHGW_AUTH_REQUIRED": "true",
        "ISHGW_HTTPS_PORT": str(https_port),
        "ISHGW_HTTP_REDIRECT": "true",
        "ISHGW_PROBES_ENABLED": "false",
        "ISHGW_JWT_PUBLIC_KEYS_FILE": str(pem),
        "ISHGW_JWT_AUDIENCE": AUDIENCE,
    }
    with Gateway(extra_env=env, home=home) as gw:
        for name, models, kind in (
            ("sec-1", ["m", "lm", "other"], "ollama"),
            ("sec-anthropic", ["claude-x"], "anthropic"),
        ):
            response = gw.add_instance(
                name=name, provider_type=kind, api_base=backend.url, supported_models=models
            )
            assert response.status_code == 201, response.text
        gw.wait_applied()
        secured = Secured(gw, https_port, signer)
        yield secured
        secured.client.close()


def seen_by_backend(backend: StubServer, marker: str) -> list[dict[str, Any]]:
    return [item for item in backend.requests() if (item.get("json") or {}).get("marker") == marker]


# -- 4 and the model-name echo ------------------------------------------------------------------------------


def test_unknown_model_lists_only_the_keys_models(secured: Secured) -> None:
    key = secured.key("only-m", allowed_models=["m"])
    r = secured.client.post(CHAT, json=chat("nope"), headers=bearer(key))
    assert r.status_code == 404, r.text
    assert r.json()["available_models"] == ["m"]
    assert "other" not in r.text and "lm" not in r.text.replace("model", "")
    r = secured.client.post("/api/chat", json=chat("nope"), headers=bearer(key))
    assert r.status_code == 404 and r.json()["available_models"] == ["m"]
    # A key for every model still sees every model.
    everything = secured.key("all-models")
    r = secured.client.post(CHAT, json=chat("nope"), headers=bearer(everything))
    assert set(r.json()["available_models"]) == {"m", "lm", "other"}


def test_a_huge_model_name_is_not_echoed_whole(secured: Secured) -> None:
    key = secured.key("echo")
    name = "x" * 10_000_000
    r = secured.client.post(CHAT, json=chat(name), headers=bearer(key))
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert len(r.content) < 2000 and ("x" * 256 + "\u2026") in message and "x" * 257 not in message


# -- 5 -------------------------------------------------------------------------------------------------------


def test_a_repeated_model_field_is_refused(secured: Secured, backend: StubServer) -> None:
    key = secured.key("dup")
    headers = {**bearer(key), "Content-Type": "application/json"}
    refused = {
        "plain": '{"model":"lm","model":"m","messages":[],"marker":"dup-1"}',
        "escaped": '{"model":"m","messages":[],"mod\\u0065l":"lm","marker":"dup-2"}',
        "spaced": '{ "model" : "m" ,\n "marker":"dup-3", "model":"m"}',
    }
    for case, body in refused.items():
        r = secured.client.post(CHAT, content=body, headers=headers)
        assert r.status_code == 400, (case, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and '"model"' in error["message"], case
    r = secured.client.post("/v1/messages", content=refused["plain"], headers=headers)
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = secured.client.post("/api/chat", content=refused["plain"], headers=headers)
    assert r.status_code == 400 and "model" in r.json()["error"]
    assert not any(seen_by_backend(backend, f"dup-{n}") for n in (1, 2, 3))
    # "model" deeper down, or inside a string, is no repeat.
    fine = (
        '{"model":"m","messages":[{"role":"user","content":"the \\"model\\": field","model":"x"}],'
        '"metadata":{"model":"y"},"marker":"dup-ok"}'
    )
    r = secured.client.post(CHAT, content=fine, headers=headers)
    assert r.status_code == 200, r.text
    assert len(seen_by_backend(backend, "dup-ok")) == 1
    # A key that merely ends in '"model"' is another key.
    odd = '{"x\\"model":1,"model":"m","messages":[],"marker":"dup-odd"}'
    assert json.loads(odd)["model"] == "m"
    assert secured.client.post(CHAT, content=odd, headers=headers).status_code == 200


# -- 6 -------------------------------------------------------------------------------------------------------


def raw_request(secured: Secured, head: str, body: bytes = b"") -> tuple[int, bytes]:
    with secured.connect() as sock:
        sock.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + content_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_the_backend_gets_the_normalised_path(secured: Secured, backend: StubServer) -> None:
    key = secured.key("paths")
    body = json.dumps(chat("m", marker="path-1")).encode()
    head = (
        "POST /api/pull/../../v1/chat/completions?trace=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    status, _ = raw_request(secured, head, body)
    assert status == 200
    (seen,) = seen_by_backend(backend, "path-1")
    assert seen["path"] == CHAT and seen["query_string"] == "trace=1"


# -- 7 -------------------------------------------------------------------------------------------------------


def slow_post(secured: Secured, headers: str, length: int) -> ssl.SSLSocket:
    sock = secured.connect()
    sock.sendall(
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}"
        f"Content-Length: {length}\r\n\r\n".encode()
        + b'{"model":"m","padding":"'
    )
    return sock


def answer_within(sock: ssl.SSLSocket, seconds: float) -> bytes:
    """What the gateway sends within `seconds` (b'' when nothing)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return b""


def test_a_request_without_a_key_is_refused_before_its_body(secured: Secured) -> None:
    length = 15_000_000
    # Twenty slow clients without a key, each announcing 15 MB and sending 24 bytes of it: answered at once.
    started = time.monotonic()
    socks = [slow_post(secured, "", length) for _ in range(20)]
    answers = [answer_within(sock, 2.0) for sock in socks]
    took = time.monotonic() - started
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        assert b"authentication_error" in answer and b"WWW-Authenticate: Bearer" in answer
    assert took < 2.0, took
    # ... and a client that keeps trickling its body is cut off (lingering_time 5 s), not held for the
    # body timeout.
    sock = socks[0]
    deadline = time.monotonic() + 15
    closed = False
    while time.monotonic() < deadline and not closed:
        try:
            sock.sendall(b"x" * 1000)
            readable, _, _ = select.select([sock], [], [], 0.5)
            closed = bool(readable) and sock.recv(65536) == b""
        except OSError:
            closed = True
    cut_after = time.monotonic() - started
    assert closed and cut_after < 10, cut_after
    for sock in socks:
        sock.close()
    # A wrong key is refused the same way.
    with slow_post(secured, "Authorization: Bearer ishgw-wrong\r\n", length) as sock:
        assert answer_within(sock, 2.0).startswith(b"HTTP/1.1 401 ")


def test_a_request_with_a_key_still_sends_its_body(secured: Secured) -> None:
    """The early answer is for missing credentials only: a valid key's slow body is waited for."""
    key = secured.key("slow-body")
    rest = b'x","messages":[{"role":"user","content":"hi"}]}'
    length = len(b'{"model":"m","padding":"') + len(rest)
    with slow_post(secured, f"Authorization: Bearer {key}\r\nConnection: close\r\n", length) as sock:
        assert answer_within(sock, 1.0) == b""
        sock.sendall(rest)
        assert answer_within(sock, 5.0).startswith(b"HTTP/1.1 200 ")


# -- 8 -------------------------------------------------------------------------------------------------------


def test_the_redirect_never_follows_the_host_header(secured: Secured) -> None:
    client = httpx.Client(base_url=secured.gw.url, follow_redirects=False, trust_env=False, timeout=5)
    for host in ("evil.example", "evil.example:443", "127.0.0.1"):
        r = client.get("/v1/models?x=1", headers={"Host": host})
        assert r.status_code == 301, host
        # Without ISHGW_DOMAIN: the address the client connected to.
        assert r.headers["location"] == f"https://127.0.0.1:{secured.https_port}/v1/models?x=1", host
    client.close()


# -- 10 ------------------------------------------------------------------------------------------------------

CLIENT_HEADERS = {
    "X-Forwarded-For": "198.51.100.7",
    "X-Real-IP": "198.51.100.7",
    "Forwarded": "for=198.51.100.7;proto=https",
    "X-Forwarded-Host": "evil.example",
    "Cookie": "session=client-cookie-secret",
    "X-Admin-API-Key": "admin-key-the-client-sent",
}


def test_client_address_claims_cookies_and_admin_key_stay_here(secured: Secured, backend: StubServer) -> None:
    key = secured.key("headers")
    r = secured.client.post(CHAT, json=chat("m", marker="hdr-1"), headers={**bearer(key), **CLIENT_HEADERS})
    assert r.status_code == 200
    (seen,) = seen_by_backend(backend, "hdr-1")
    headers = seen["headers"]
    assert headers["x-forwarded-for"] == "127.0.0.1" and headers["x-real-ip"] == "127.0.0.1"
    for name in ("forwarded", "x-forwarded-host", "cookie", "x-admin-api-key", "authorization"):
        assert name not in headers, name
    assert "198.51.100.7" not in json.dumps(headers) and key not in json.dumps(headers)


def test_forward_client_ip_false_sends_no_address(backend: StubServer) -> None:
    env = {"ISHGW_FORWARD_CLIENT_IP": "false", "ISHGW_PROBES_ENABLED": "false"}
    with Gateway(extra_env=env) as gw:
        response = gw.add_instance(
            name="quiet", provider_type="ollama", api_base=backend.url, supported_models=["m"]
        )
        assert response.status_code == 201
        gw.wait_applied()
        r = gw.client.post(CHAT, json=chat("m", marker="hdr-2"), headers=CLIENT_HEADERS)
        assert r.status_code == 200, r.text
        (seen,) = seen_by_backend(backend, "hdr-2")
        headers = seen["headers"]
        for name in ("x-forwarded-for", "x-real-ip", "forwarded", "cookie", "x-admin-api-key"):
            assert name not in headers, name


# -- Informational: a forged RS256 token ---------------------------------------------------------------------


def test_a_forged_rs256_token_is_refused(secured: Secured) -> None:
    key = secured.key("after-forgery")
    now = int(time.time())
    claims = {"sub": "mallory", "aud": AUDIENCE, "exp": now + 300}
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, forger, algorithm="RS256")
    genuine = jwt.encode(claims, secured.signer, algorithm="RS256")
    before = secured.error_log().count(STALE_SSL)
    for _ in range(5):
        r = secured.client.post(CHAT, json=chat("m"), headers=bearer(forged))
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        # New TLS connections after it, in whichever worker: each would log the stale error.
        with httpx.Client(base_url=secured.client.base_url, verify=False, timeout=10) as fresh:
            assert fresh.post(CHAT, json=chat("m"), headers=bearer(key)).status_code == 200
    assert secured.client.post(CHAT, json=chat("m"), headers=bearer(genuine)).status_code == 200
    assert secured.error_log().count(STALE_SSL) == before
    # Verified in the rewrite phase (issue 11): a forged RS256 token is refused before its body is read.
    with slow_post(secured, f"Authorization: Bearer {forged}\r\n", 15_000_000) as sock:
        answer = answer_within(sock, 2.0)
    assert answer.startswith(b"HTTP/1.1 401 ") and b"signature" in answer, answer[:300]


def test_a_verified_subject_shares_one_bucket_across_its_tokens(secured: Secured) -> None:
    """Every RS256 token is verified before the limits count it, so its zone is keyed by iss+sub, not by
    the token: a client cannot get more requests by minting more tokens, nor spend another subject's."""
    now = int(time.time())

    def token(sub: str, exp: int) -> str:
        claims = {"sub": sub, "aud": AUDIENCE, "exp": exp, "rpm": 60}
        return str(jwt.encode(claims, secured.signer, algorithm="RS256"))

    first, second = token("alice", now + 300), token("alice", now + 301)
    assert first != second
    # 60 per minute with a burst of 10 (ISHGW_LIMIT_KEY_BURST): each token alone would stay under it with 10.
    statuses = [
        secured.client.post(CHAT, json=chat("m"), headers=bearer(t)).status_code
        for t in [first] * 10 + [second] * 10
    ]
    assert set(statuses) == {200, 429} and statuses[:10] == [200] * 10, statuses
    other = bearer(token("bob", now + 300))
    assert secured.client.post(CHAT, json=chat("m"), headers=other).status_code == 200


# -- 9: the admin API ----------------------------------------------------------------------------------------


def test_wrong_admin_keys_never_lock_out_the_right_one(secured: Secured) -> None:
    gw = secured.gw
    admin = httpx.Client(base_url=str(gw.admin.base_url), timeout=10)
    statuses = [
        admin.get("/admin/status", headers={"X-Admin-API-Key": f"wrong-guess-{n}"}).status_code
        for n in range(12)
    ]
    assert statuses == [401] * 10 + [429] * 2
    assert gw.admin.get("/admin/status").status_code == 200  # the operator, same address, same minute
    entries = gw.admin.get("/admin/audit", params={"limit": 50}).json()["entries"]
    refused = [e for e in entries if e["actor"] == "unauthenticated"]
    assert len(refused) == 10
    assert {(e["path"], e["status"], e["client_ip"]) for e in refused} == {
        ("/admin/status", 401, "127.0.0.1")
    }
    logged = json.dumps(entries) + (gw.home / "controller.log").read_text()
    assert "wrong-guess" not in logged
    admin.close()


def test_a_deeply_nested_import_is_422_with_one_log_line(secured: Secured) -> None:
    gw = secured.gw
    log = gw.home / "controller.log"
    for body in ("x: " + "[" * 10_000 + "]" * 10_000, "x: " + "{a: " * 10_000 + "1" + "}" * 10_000):
        before = len(log.read_text().splitlines())
        r = gw.admin.post(
            "/admin/config/import", content=body.encode(), headers={"Content-Type": "application/yaml"}
        )
        assert r.status_code == 422, r.text
        assert r.json()["detail"] == [{"field": "body", "message": "nested more than 32 levels deep"}]
        new = log.read_text().splitlines()[before:]
        assert len(new) == 1 and "nested more than 32 levels deep" in new[0], new[:5]
    # Deep but parsable, in JSON as in YAML: refused the same way, before any code recurses through it.
    deep = '{"version": 1, "instances": ' + "[" * 500 + "]" * 500 + "}"
    r = gw.admin.post("/admin/config/import", content=deep, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "nested" in r.text
    assert gw.admin.get("/admin/status").status_code == 200
