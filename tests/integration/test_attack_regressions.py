"""Issue 19, what the attack run found held, kept: the client side, against real nginx + Lua.

One gateway as an attacker meets it: HTTPS (self-signed) and plain HTTP both serving the API, client keys
required, RS256 tokens only (a PEM public key, audience and issuer required), a stub backend. The admin
side of the same list (injection payloads, billion laughs, huge bodies) is in test_admin_fuzz.py; the TLS
scanner in test_tls.py. README "Security model" maps each item to its tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import select
import socket
import ssl
import stat
import subprocess
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.backends.stub_llm import StubServer
from tests.integration.gateway import Gateway, wait_for
from tests.ports import free_ports
from tests.tls_util import make_self_signed

CHAT = "/v1/chat/completions"
AUDIENCE = "ish-gateway-attack"
ISSUER = "https://issuer.attack.test"
HSTS = "max-age=63072000; includeSubDomains"
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")
# The three API styles and a body each accepts.
FAMILIES = {
    "openai": (CHAT, "m"),
    "anthropic": ("/v1/messages", "claude-x"),
    "ollama": ("/api/chat", "m"),
}


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False, **extra}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_type(family: str, response: httpx.Response) -> str:
    """The error kind in the family's style (Ollama's carries only a message)."""
    body = response.json()
    if family == "anthropic":
        assert body["type"] == "error"
        return str(body["error"]["type"])
    if family == "ollama":
        assert isinstance(body["error"], str) and body["error"]
        return "(ollama)"
    return str(body["error"]["type"])


class Attacked:
    """The gateway of this module and what a test needs of it."""

    def __init__(self, gw: Gateway, https_port: int, signer: rsa.RSAPrivateKey, public_pem: bytes) -> None:
        self.gw = gw
        self.https_port = https_port
        self.signer = signer
        self.public_pem = public_pem
        self.https = httpx.Client(base_url=f"https://127.0.0.1:{https_port}", verify=False, timeout=30)
        self.tls = ssl.create_default_context()
        self.tls.check_hostname = False
        self.tls.verify_mode = ssl.CERT_NONE
        self.key = self.new_key("attack-main")

    def new_key(self, name: str, **settings: Any) -> str:
        response = self.gw.admin.post("/admin/keys", json={"name": name, **settings})
        assert response.status_code == 201, response.text
        self.gw.wait_applied()
        return str(response.json()["key"])

    def error_log(self) -> list[str]:
        return (self.gw.home / "nginx" / "logs" / "error.log").read_text(errors="replace").splitlines()

    def raw(self, head: bytes, body: bytes = b"") -> bytes:
        """One request as bytes on a fresh TLS connection; the whole answer (the server closes)."""
        with (
            socket.create_connection(("127.0.0.1", self.https_port), timeout=10) as sock,
            self.tls.wrap_socket(sock, server_hostname="127.0.0.1") as conn,
        ):
            conn.sendall(head + body)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        return data


@pytest.fixture(scope="module")
def backend() -> Iterator[StubServer]:
    stub = StubServer(name="att-1").start()
    yield stub
    stub.stop()


@pytest.fixture(scope="module")
def attacked(backend: StubServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attacked]:
    signer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = signer.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = tmp_path_factory.mktemp("jwt") / "public.pem"
    pem.write_bytes(public_pem)
    # Directly under /tmp: the controller makes home 0711, so nginx's workers reach run/log.sock below it.
    home = Path(tempfile.mkdtemp(prefix="ishgw-attack-", dir="/tmp"))
    make_self_signed(home / "ssl" / "cert.pem", home / "ssl" / "key.pem")
    https_port, closed_port = free_ports(2)
    env = {
        "ISHGW_AUTH_REQUIRED": "true",
        "ISHGW_HTTPS_PORT": str(https_port),
        "ISHGW_HTTP_REDIRECT": "false",
        "ISHGW_PROBES_ENABLED": "false",
        "ISHGW_JWT_PUBLIC_KEYS_FILE": str(pem),
        "ISHGW_JWT_AUDIENCE": AUDIENCE,
        "ISHGW_JWT_ISSUER": ISSUER,
    }
    with Gateway(extra_env=env, home=home) as gw:
        for name, kind, base, models in (
            ("att-1", "ollama", backend.url, ["m", "lm"]),
            ("att-anthropic", "anthropic", backend.url, ["claude-x"]),
            ("att-down", "ollama", f"http://127.0.0.1:{closed_port}", ["down"]),  # nothing listens there
        ):
            response = gw.add_instance(name=name, provider_type=kind, api_base=base, supported_models=models)
            assert response.status_code == 201, response.text
        gw.wait_applied()
        attacked = Attacked(gw, https_port, signer, public_pem)
        yield attacked
        attacked.https.close()


def sent_to_backend(backend: StubServer, marker: str) -> list[dict[str, Any]]:
    return [item for item in backend.requests() if marker in json.dumps(item.get("json"))]


# -- X-Request-ID sanitising -------------------------------------------------------------------------------


def test_a_request_id_that_is_not_sane_is_replaced_both_ways(attacked: Attacked, backend: StubServer) -> None:
    headers = bearer(attacked.key)
    hostile: dict[str, str | bytes] = {
        "space and semicolon": "a b;c",
        "too long": "x" * 129,
        "log line break-out": '"},"st":"200","key":"',
        "log line break-out, array": '","200","key_x","',
        "markup": "<script>alert(1)</script>",
        "path": "../../etc/passwd",
        "tab": "id\tz",
        "non-ascii": "id-\u00e9".encode(),
        "empty": "",
    }
    for n, (case, value) in enumerate(hostile.items()):
        marker = f"rid-{n}"
        r = attacked.https.post(
            CHAT,
            json=chat("m", marker=marker),
            # One hostile value is bytes on purpose: httpx sends it, though its stubs want str only.
            headers={**headers, "X-Request-ID": value},  # type: ignore[arg-type]
        )
        assert r.status_code == 200, (case, r.text)
        given = r.headers.get_list("X-Request-ID")
        assert len(given) == 1 and GENERATED_ID.match(given[0]), (case, given)
        (seen,) = sent_to_backend(backend, marker)
        assert seen["headers"]["x-request-id"] == given[0], case
    # The gateway's own answers (401 before the body, 404 of the router) get a fresh one too.
    r = attacked.https.post(CHAT, json=chat("m"), headers={"X-Request-ID": "a b;c"})
    assert r.status_code == 401 and GENERATED_ID.match(r.headers["X-Request-ID"])
    r = attacked.https.post(CHAT, json=chat("nope"), headers={**headers, "X-Request-ID": "x" * 129})
    assert r.status_code == 404 and GENERATED_ID.match(r.headers["X-Request-ID"])
    # The control: a sane id (1-128 of A-Za-z0-9._:-) is kept, both ways.
    sane = "Trace-1.2_3:" + "z" * 116
    r = attacked.https.post(
        CHAT, json=chat("m", marker="rid-sane"), headers={**headers, "X-Request-ID": sane}
    )
    assert r.headers["X-Request-ID"] == sane
    (seen,) = sent_to_backend(backend, "rid-sane")
    assert seen["headers"]["x-request-id"] == sane


# -- path and method games ---------------------------------------------------------------------------------


def request_line(attacked: Attacked, method: str, target: str, body: bytes, key: str) -> tuple[int, bytes]:
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = attacked.raw(head, body)
    return int(answer.split(b" ", 2)[1]), answer


def test_path_and_method_games(attacked: Attacked, backend: StubServer) -> None:
    # Spellings nginx normalises to the endpoint: routed, and the backend gets the normalised path.
    routed = [
        "//v1//chat/completions",
        "/v1/chat/./completions",
        "/v1/%63hat/completions",
        "/v1/embeddings/../chat/completions",
        "http://evil.example/v1/chat/completions",  # absolute form: the path counts, not the host
    ]
    for n, target in enumerate(routed):
        marker = f"path-ok-{n}"
        status, answer = request_line(attacked, "POST", target, json.dumps(chat("m", marker=marker)).encode(),
                                      attacked.key)  # fmt: skip
        assert status == 200, (target, answer[:300])
        (seen,) = sent_to_backend(backend, marker)
        assert seen["path"] == CHAT, target
    # Spellings of nothing routed: the gateway's JSON 404 (never the admin API, never a file).
    unrouted = [
        "/v1/chat/completions/",
        "/V1/CHAT/COMPLETIONS",
        "/v1/chat/completions;x=1",
        "/v1/chat/completions%2F..",
        "/api/../admin/status",
    ]
    # Outside the root, or a NUL: nginx refuses the request line itself.
    refused = [
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/v1/../../admin/keys",
        "/v1/chat/completions%00",
    ]
    for n, target in enumerate(unrouted + refused):
        marker = f"path-no-{n}"
        status, answer = request_line(attacked, "POST", target, json.dumps(chat("m", marker=marker)).encode(),
                                      attacked.key)  # fmt: skip
        assert status == (404 if target in unrouted else 400), (target, answer[:300])
        assert not sent_to_backend(backend, marker), target
        assert HSTS.encode() in answer
    # Methods: only POST is routed; the others are a 405 in the client's style, with Allow.
    for n, method in enumerate(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND", "FOO"]):
        marker = f"method-{n}"
        r = attacked.https.request(
            method, CHAT, content=json.dumps(chat("m", marker=marker)), headers=bearer(attacked.key)
        )
        assert r.status_code == 405 and r.headers["Allow"] == "POST", method
        assert r.json()["error"]["type"] == "invalid_request_error", method
        assert not sent_to_backend(backend, marker), method
    assert attacked.https.head(CHAT, headers=bearer(attacked.key)).status_code == 405
    status, _ = request_line(attacked, "TRACE", CHAT, b"", attacked.key)
    assert status == 405  # nginx itself
    # A method override header changes nothing.
    r = attacked.https.post(
        CHAT,
        json=chat("m", marker="override"),
        headers={**bearer(attacked.key), "X-HTTP-Method-Override": "DELETE"},
    )
    assert r.status_code == 200 and sent_to_backend(backend, "override")[0]["method"] == "POST"


# -- bodies ------------------------------------------------------------------------------------------------


def test_a_17_mb_body_is_413_in_the_clients_style(attacked: Attacked) -> None:
    big = 17 * 1024 * 1024

    def chunks() -> Iterator[bytes]:
        for _ in range(17):
            yield b"x" * (1024 * 1024)

    for family, (path, _) in FAMILIES.items():
        for how, content in (("Content-Length", b"x" * big), ("chunked", chunks())):
            r = attacked.https.post(path, content=content, headers=bearer(attacked.key))
            assert r.status_code == 413, (family, how, r.text[:200])
            assert error_type(family, r) in ("request_too_large", "(ollama)"), (family, how)
            assert r.headers["Strict-Transport-Security"] == HSTS
    # Without a key, announced: refused before a byte of it is read.
    r = attacked.https.post(CHAT, content=b"x" * big)
    assert r.status_code == 413


# Text with MODEL for the family's model, and how it is encoded.
NOT_JSON = {
    "NaN at the top": ('{"model":"MODEL","temperature":NaN}', "utf-8"),
    "Infinity at the top": ('{"model":"MODEL","temperature":Infinity}', "utf-8"),
    "NaN nested": ('{"model":"MODEL","messages":[{"role":"user","content":"hi","x":[1,NaN]}]}', "utf-8"),
    "-Infinity nested": ('{"model":"MODEL","logit_bias":{"50256":-Infinity}}', "utf-8"),
    "a UTF-8 byte-order mark": ('{"model":"MODEL"}', "utf-8-sig"),
    "UTF-16 with its mark": ('{"model":"MODEL"}', "utf-16"),
    "UTF-16 BE without a mark": ('{"model":"MODEL"}', "utf-16-be"),
    "UTF-32": ('{"model":"MODEL"}', "utf-32"),
    "1001 arrays deep": ('{"model":"MODEL","a":' + "[" * 1001 + "]" * 1001 + "}", "utf-8"),
    "1001 objects deep": ('{"model":"MODEL","a":' + '{"a":' * 1001 + "1" + "}" * 1001 + "}", "utf-8"),
    "a million brackets": ('{"model":"MODEL","a":' + "[" * 1_000_000, "utf-8"),
}


def test_bodies_that_are_not_json_are_400_in_the_clients_style(
    attacked: Attacked, backend: StubServer
) -> None:
    backend.clear_requests()
    for family, (path, model) in FAMILIES.items():
        for case, (text, encoding) in NOT_JSON.items():
            r = attacked.https.post(
                path,
                content=text.replace("MODEL", model).encode(encoding),
                headers={**bearer(attacked.key), "Content-Type": "application/json"},
            )
            assert r.status_code == 400, (family, case, r.text[:200])
            assert error_type(family, r) in ("invalid_request_error", "(ollama)"), (family, case)
            message = r.json()["error"] if family == "ollama" else r.json()["error"]["message"]
            assert "not valid JSON" in message, (family, case)
    assert backend.requests() == []
    # The control: NaN and Infinity as text are just text.
    r = attacked.https.post(CHAT, content=b'{"model":"m","messages":[],"x":["NaN",{"Infinity":1}]}',
                            headers={**bearer(attacked.key), "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 200, r.text


# -- load ----------------------------------------------------------------------------------------------------


def test_500_concurrent_requests_without_a_5xx(attacked: Attacked) -> None:
    """500 requests over 50 connections at once, the three API styles, some streamed: all answered 200."""
    bodies = [
        (CHAT, chat("m")),
        (CHAT, chat("m", stream=True)),
        ("/v1/messages", chat("claude-x", max_tokens=16)),
        ("/api/chat", chat("m")),
    ]

    def worker(n: int) -> list[int]:
        statuses = []
        with httpx.Client(base_url=attacked.gw.url, timeout=30, headers=bearer(attacked.key)) as client:
            for i in range(10):
                path, body = bodies[(n + i) % len(bodies)]
                r = client.post(path, json=body)
                statuses.append(r.status_code)
        return statuses

    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = [s for batch in pool.map(worker, range(50)) for s in batch]
    assert Counter(statuses) == Counter({200: 500}), Counter(statuses)


# -- JWT -----------------------------------------------------------------------------------------------------


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def compact(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    signed = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signed}.{b64(sign(signed.encode()))}"


def rs256(key: rsa.RSAPrivateKey) -> Callable[[bytes], bytes]:
    return lambda data: key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def hs256(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda data: hmac.new(secret, data, hashlib.sha256).digest()


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "mallory", "aud": AUDIENCE, "iss": ISSUER, "iat": now, "exp": now + 300}
    return {k: v for k, v in {**base, **changes}.items() if v is not None}


def refused_as_invalid_token(attacked: Attacked, token: str, what: str) -> None:
    r = attacked.https.post(CHAT, json=chat("m"), headers=bearer(token))
    assert r.status_code == 401, (what, r.text[:300])
    assert r.json()["error"]["type"] == "authentication_error", what
    assert r.headers["WWW-Authenticate"].startswith("Bearer realm="), what


def test_jwt_attacks_are_401(attacked: Attacked) -> None:
    genuine = rs256(attacked.signer)
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_der = attacked.signer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    attacks: dict[str, str] = {
        "alg none, no signature": compact({"alg": "none", "typ": "JWT"}, claims(), lambda _: b""),
        "alg none, a signature": compact({"alg": "none"}, claims(), genuine),
        "alg None": compact({"alg": "None"}, claims(), lambda _: b"x"),
        "alg NONE": compact({"alg": "NONE"}, claims(), lambda _: b"x"),
        "no alg": compact({"typ": "JWT"}, claims(), genuine),
        # The classic confusion: the RSA public key (PEM, as a server might keep it) used as an HMAC secret.
        "HS256 with the RSA public key (PEM)": compact(
            {"alg": "HS256"}, claims(), hs256(attacked.public_pem)
        ),
        "HS256 with the RSA public key (PEM, trimmed)": compact(
            {"alg": "HS256"}, claims(), hs256(attacked.public_pem.strip())
        ),
        "HS256 with the RSA public key (DER)": compact({"alg": "HS256"}, claims(), hs256(public_der)),
        "HS256 with an empty secret": compact({"alg": "HS256"}, claims(), hs256(b"")),
        "RS256 header, HMAC signature": compact({"alg": "RS256"}, claims(), hs256(attacked.public_pem)),
        "ES256 header, RS256 signature": compact({"alg": "ES256"}, claims(), genuine),
        "RS256 by another key": compact({"alg": "RS256"}, claims(), rs256(forger)),
        "expired": compact({"alg": "RS256"}, claims(exp=now - 120), genuine),
        "no exp": compact({"alg": "RS256"}, claims(exp=None), genuine),
        "exp as a string": compact({"alg": "RS256"}, claims(exp=str(now + 300)), genuine),
        "exp NaN": compact({"alg": "RS256"}, claims(exp=float("nan")), genuine),
        "not valid yet": compact({"alg": "RS256"}, claims(nbf=now + 600), genuine),
        "wrong aud": compact({"alg": "RS256"}, claims(aud="someone-else"), genuine),
        "no aud": compact({"alg": "RS256"}, claims(aud=None), genuine),
        "wrong iss": compact({"alg": "RS256"}, claims(iss="https://evil.example"), genuine),
        "no iss": compact({"alg": "RS256"}, claims(iss=None), genuine),
    }
    good = compact({"alg": "RS256", "typ": "JWT"}, claims(), genuine)
    head, body, sig = good.split(".")
    attacks["claims changed after signing"] = f"{head}.{b64(json.dumps(claims(sub='admin')).encode())}.{sig}"
    attacks["signature cut"] = f"{head}.{body}.{sig[:-4]}"
    before = len(attacked.error_log())
    for what, token in attacks.items():
        refused_as_invalid_token(attacked, token, what)
    # The control: the genuine token of the same claims is let in.
    assert attacked.https.post(CHAT, json=chat("m"), headers=bearer(good)).status_code == 200
    assert attacked.error_log()[before:] == []


def test_jwt_kid_injection(attacked: Attacked, backend: StubServer) -> None:
    """A kid only picks among the configured keys: whatever it says, a token not signed by one is refused,
    and nothing is read, looked up or logged because of it."""
    kids: dict[str, Any] = {
        "path": "../../etc/passwd",
        "null device": "/dev/null",
        "SQL": "' OR 1=1 --",
        "command": "$(touch /tmp/ishgw-kid-pwned)",
        "4 KB": "k" * 4000,
        "number": 5,
        "object": {"kid": "x"},
        "list": ["x"],
        "true": True,
        "null": None,
    }
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    passwd = Path("/etc/passwd").read_bytes()
    before = len(attacked.error_log())
    backend.clear_requests()
    for case, kid in kids.items():
        for alg, sign in (
            ("HS256", hs256(b"")),
            ("HS256", hs256(passwd)),
            ("HS256", hs256(attacked.public_pem)),
            ("RS256", rs256(forger)),
        ):
            refused_as_invalid_token(
                attacked, compact({"alg": alg, "kid": kid}, claims(), sign), f"{case} {alg}"
            )
    assert backend.requests() == []
    # The control: the configured key (a PEM key has no kid) verifies the same header when it signed it.
    for case, kid in kids.items():
        token = compact({"alg": "RS256", "kid": kid}, claims(), rs256(attacked.signer))
        assert attacked.https.post(CHAT, json=chat("m"), headers=bearer(token)).status_code == 200, case
    # A 10 KB kid makes the header line longer than nginx reads (8 KB): refused before any Lua runs.
    huge = compact({"alg": "RS256", "kid": "k" * 10_000}, claims(), rs256(attacked.signer))
    r = attacked.https.post(CHAT, json=chat("m", marker="huge-kid"), headers=bearer(huge))
    assert r.status_code == 400 and not sent_to_backend(backend, "huge-kid")
    assert not Path("/tmp/ishgw-kid-pwned").exists()
    assert attacked.error_log()[before:] == []


# -- HTTPS ---------------------------------------------------------------------------------------------------


def test_hsts_on_every_https_answer(attacked: Attacked, backend: StubServer) -> None:
    key = attacked.key
    only_m = attacked.new_key("attack-only-m", allowed_models=["m"])
    slow = attacked.new_key("attack-slow", rpm_limit=1)
    c = attacked.https
    for _ in range(11):  # the burst (10) and the one a minute
        c.post(CHAT, json=chat("m"), headers=bearer(slow))
    answers: dict[str, httpx.Response] = {
        "200 chat": c.post(CHAT, json=chat("m"), headers=bearer(key)),
        "200 anthropic": c.post("/v1/messages", json=chat("claude-x", max_tokens=8), headers=bearer(key)),
        "200 stream": c.post(CHAT, json=chat("m", stream=True), headers=bearer(key)),
        "200 /v1/models": c.get("/v1/models", headers=bearer(key)),
        "200 /api/tags": c.get("/api/tags", headers=bearer(key)),
        "200 /api/version": c.get("/api/version"),
        "200 /health": c.get("/health"),
        "200 /nginx_status": c.get("/nginx_status"),
        "400 not JSON": c.post(CHAT, content=b"{", headers=bearer(key)),
        "400 header too large": c.get("/v1/models", headers={"X-Big": "x" * 10_000}),
        "401 no key": c.post(CHAT, json=chat("m")),
        "401 wrong key": c.post(CHAT, json=chat("m"), headers=bearer("ishgw-wrong")),
        "403 model": c.post(CHAT, json=chat("lm"), headers=bearer(only_m)),
        "404 model": c.post(CHAT, json=chat("nope"), headers=bearer(key)),
        "404 path": c.get("/nope", headers=bearer(key)),
        "405 method": c.get(CHAT, headers=bearer(key)),
        "413 body": c.post(CHAT, content=b"x" * (17 * 1024 * 1024), headers=bearer(key)),
        "429 key limit": c.post(CHAT, json=chat("m"), headers=bearer(slow)),
        "503 instance down": c.post(CHAT, json=chat("down"), headers=bearer(key)),
    }
    for what, r in answers.items():
        assert str(r.status_code) == what.split()[0], (what, r.status_code, r.text[:200])
        assert r.headers.get_list("Strict-Transport-Security") == [HSTS], what
    # Answers nginx makes before any location: a request line it cannot parse, TRACE.
    # They answer JSON in the OpenAI style, not nginx's HTML page.
    too_large = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 10_000}\r\n\r\n".encode()
    too_long = f"GET /{'u' * 10_000} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    for head, code in (
        (b"GARBAGE\r\n\r\n", b"400"),
        (f"TRACE {CHAT} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), b"405"),
        (too_large, b"400"),
        (too_long, b"414"),
    ):
        answer = attacked.raw(head)
        assert answer.split(b" ", 2)[1] == code and HSTS.encode() in answer, answer[:300]
        headers, _, body = answer.partition(b"\r\n\r\n")
        assert b"application/json" in headers and b"<html" not in body, answer[:300]
        assert json.loads(body)["error"]["type"] == "invalid_request_error", body
    # The control: plain HTTP never sends it (a browser must not pin a name from an unauthenticated answer).
    plain = httpx.get(f"{attacked.gw.url}/health", timeout=5)
    assert plain.status_code == 200 and "strict-transport-security" not in plain.headers


def handshake(port: int, version: ssl.TLSVersion, ciphers: str = "ALL") -> tuple[str, str] | None:
    """(protocol, cipher) a client offering only `version` and `ciphers` gets, or None when refused."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():  # TLS 1.0 and 1.1 are deprecated: offering them is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = version
    context.set_ciphers(f"{ciphers}:@SECLEVEL=0")
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
            context.wrap_socket(sock) as conn,
        ):
            cipher = conn.cipher()
            assert cipher is not None  # the handshake is done
            return str(conn.version()), cipher[0]
    except (ssl.SSLError, ConnectionResetError):
        return None


WEAK_OFFERS = [
    (ssl.TLSVersion.TLSv1, "ALL"),
    (ssl.TLSVersion.TLSv1_1, "ALL"),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA"),  # CBC
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES256-SHA384"),  # CBC
    (ssl.TLSVersion.TLSv1_2, "AECDH-AES128-SHA"),  # anonymous
]


def test_only_tls12_and_tls13_with_ecdhe_and_aead(attacked: Attacked, tmp_path: Path) -> None:
    port = attacked.https_port
    for version, ciphers in WEAK_OFFERS:
        assert handshake(port, version, ciphers) is None, (version, ciphers)
    tls12 = handshake(port, ssl.TLSVersion.TLSv1_2)
    assert tls12 is not None and tls12[0] == "TLSv1.2", tls12
    assert tls12[1].startswith("ECDHE-") and re.search("GCM|CHACHA20", tls12[1]), tls12
    tls13 = handshake(port, ssl.TLSVersion.TLSv1_3)
    assert tls13 is not None and tls13[0] == "TLSv1.3" and re.search("GCM|CHACHA20", tls13[1]), tls13
    # The control: a server that allows them gets each weak offer through (the client really offers it).
    make_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem")
    control = free_ports(1)[0]
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{control}", "-cert", str(tmp_path / "cert.pem"),
         "-key", str(tmp_path / "key.pem"), "-min_protocol", "TLSv1", "-cipher", "ALL:@SECLEVEL=0", "-www"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: handshake(control, ssl.TLSVersion.TLSv1_2), timeout=10, what="openssl s_server")
        for version, ciphers in WEAK_OFFERS:
            assert handshake(control, version, ciphers) is not None, (version, ciphers)
    finally:
        server.terminate()
        server.wait(10)


def read_until(proc: subprocess.Popen[bytes], done: Callable[[bytes], bool], seconds: float) -> bytes:
    """s_client's output until done(output) or it exits or `seconds` pass."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    out = b""
    deadline = time.monotonic() + seconds
    while not done(out) and time.monotonic() < deadline:
        readable, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
    return out


def test_client_initiated_renegotiation_is_refused(attacked: Attacked) -> None:
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{attacked.https_port}", "-tls1_2"]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdin is not None
        session = read_until(proc, lambda out: b"Extended master secret" in out, 10)
        assert b"Protocol  : TLSv1.2" in session and b"Cipher    : ECDHE-" in session, session[-800:]
        proc.stdin.write(b"R\n")  # s_client: renegotiate
        proc.stdin.flush()
        after = read_until(proc, lambda out: b"no renegotiation" in out, 10)
        assert b"RENEGOTIATING" in after and b"no renegotiation" in after, after[-800:]
        # The connection does not go on: the server sent its no_renegotiation alert and s_client gave up.
        assert proc.wait(timeout=10) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


# -- secrets at rest and in logs -----------------------------------------------------------------------------


def test_no_client_or_admin_key_in_any_log_or_file(attacked: Attacked) -> None:
    gw = attacked.gw
    key = attacked.new_key("attack-logged")
    token = compact({"alg": "RS256"}, claims(sub="logged"), rs256(attacked.signer))
    wrong_key = "ishgw-wrong-key-canary-0123456789"
    wrong_admin = "wrong-admin-key-canary-0123456789"
    for headers in (bearer(key), {"x-api-key": key}, {"api-key": key}, bearer(token)):
        assert attacked.https.post(CHAT, json=chat("m"), headers=headers).status_code == 200
        assert (
            httpx.post(f"{gw.url}{CHAT}", json=chat("nope"), headers=headers, timeout=10).status_code == 404
        )
    for headers in (bearer(wrong_key), {"x-api-key": wrong_key}):
        assert attacked.https.post(CHAT, json=chat("m"), headers=headers).status_code == 401
    admin = httpx.Client(base_url=str(gw.admin.base_url), timeout=10)
    assert admin.get("/admin/status", headers={"X-Admin-API-Key": gw.admin_key}).status_code == 200
    assert admin.get("/admin/status", headers=bearer(gw.admin_key)).status_code == 200
    assert admin.get("/admin/status", headers={"X-Admin-API-Key": wrong_admin}).status_code == 401
    assert admin.get("/admin/keys", headers=bearer(wrong_admin)).status_code == 401
    admin.close()
    secrets = {"client key": key, "token": token, "wrong key": wrong_key, "admin key": gw.admin_key,
               "wrong admin key": wrong_admin}  # fmt: skip
    found = []
    for path in gw.home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{name} in {path}" for name, secret in secrets.items() if secret.encode() in data]
    assert found == []
    # The control: the log looked through is the one that records these requests.
    assert (
        "audit: GET /admin/keys target=- status=401 by unauthenticated"
        in (gw.home / "controller.log").read_text()
    )


def test_secrets_at_rest_are_0600_in_private_directories(attacked: Attacked, backend: StubServer) -> None:
    gw = attacked.gw
    provider_key = "sk-attack-provider-canary-0001"
    r = gw.add_instance(
        name="att-cloud",
        provider_type="openai_compatible",
        api_base=f"{backend.url}/v1",
        api_key=provider_key,
        supported_models=["cloud-m"],
    )
    assert r.status_code == 201, r.text
    client_key = attacked.new_key("attack-at-rest")
    key_hash = hashlib.sha256(client_key.encode()).hexdigest()
    holders = []
    for path in sorted(gw.home.rglob("*")):
        info = path.lstat()
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISLNK(info.st_mode):
            continue
        if stat.S_ISSOCK(info.st_mode):
            # Behind run/ (0710, the workers' group): nginx makes the shim sockets 0666 itself.
            assert path.parent == gw.home / "run" and stat.S_IMODE(path.parent.stat().st_mode) == 0o710
            continue
        assert mode & 0o022 == 0, f"{path} is writable by others: {oct(mode)}"
        if path.is_file():
            data = path.read_bytes()
            if provider_key.encode() in data or key_hash.encode() in data or path.name == "key.pem":
                holders.append(path)
                assert mode == 0o600, f"{path} holds a secret and is {oct(mode)}"
                if path.name != "key.pem":  # ssl/ is the operator's (deploy makes the key 0600)
                    # nobody else lists or changes its directory (home is 0711: passed through to run/)
                    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o066 == 0, path
    names = {p.name for p in holders}
    # The control: the sweep saw the files that do hold them.
    assert {"shims.conf", "clients.json", "key.pem"} <= names, names
    assert stat.S_IMODE((gw.home / "secrets").stat().st_mode) == 0o700
    assert stat.S_IMODE((gw.home / "nginx" / "generations").stat().st_mode) == 0o700
    assert gw.admin.delete("/admin/instances/att-cloud").status_code == 204
