"""TLS for real: certbot gets a certificate from a local ACME server (pebble) through the running gateway,
nginx serves it, a forced renewal under load switches certificates without a failed request, OCSP is
stapled, and an outside scanner (sslscan) finds only TLS 1.2/1.3 and strong ciphers.

Everything runs on 127.0.0.1: pebble-challtestsrv answers DNS for the test domain with 127.0.0.1, pebble
validates HTTP-01 on the gateway's HTTP port, certbot trusts pebble's API through REQUESTS_CA_BUNDLE.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest

from control_plane import certs
from control_plane.render.spec import ServerSettings
from control_plane.settings import Settings
from tests import diagnostics
from tests.integration.gateway import ROOT, Gateway, wait_for
from tests.ports import free_port

pytestmark = pytest.mark.integration

DOMAIN = "gw.test"
REQUEST = f"GET /health HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode()
SETUP = ROOT / "ssl" / "letsencrypt-setup.sh"
GENERATE = ROOT / "ssl" / "generate-certs.sh"
TOOLS = ("certbot", "pebble", "pebble-challtestsrv", "sslscan", "openssl")


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        message = f"missing {', '.join(missing)}: scripts/test.sh installs them (apt: certbot pebble sslscan)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def run(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    done = subprocess.run(
        [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"{args[0]} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


# --- the pure part of control_plane.certs ----------------------------------------------------------------


def test_parse_x509_and_status() -> None:
    text = (
        "serial=44A9F0B93AE12E0B\nissuer=CN=Pebble Intermediate CA 77cf78\nsubject=CN=gw.test\n"
        "notAfter=Feb  3 00:55:52 2031 GMT\nsha256 Fingerprint=42:65:29\nhttp://127.0.0.1:4002/\n"
    )
    info = certs.parse_x509(text)
    assert info.not_after == datetime(2031, 2, 3, 0, 55, 52, tzinfo=UTC)
    assert (info.serial, info.ocsp_uri, info.self_signed) == (
        "44A9F0B93AE12E0B",
        "http://127.0.0.1:4002/",
        False,
    )
    status = certs.describe("/c.pem", info, info.not_after - timedelta(days=13, hours=1), stapling=True)
    assert status["days_left"] == 13 and status["expires_soon"] is True and status["expired"] is False
    assert status["not_after"] == "2031-02-03T00:55:52+00:00" and status["fingerprint"] == "42:65:29"
    expired = certs.describe("/c.pem", info, info.not_after + timedelta(hours=1), stapling=False)
    assert expired["days_left"] == -1 and expired["expired"] is True
    with pytest.raises(certs.CertError):
        certs.parse_enddate("notAfter=2031-02-03")
    with pytest.raises(certs.CertError):
        certs.parse_x509("subject=CN=x\n")


def test_self_signed_certificate_gets_no_stapling(tmp_path: Path) -> None:
    run(GENERATE, tmp_path)
    cert = str(tmp_path / "cert.pem")
    assert certs.read_cert(cert).self_signed
    (tmp_path / "chain.pem").write_text((tmp_path / "cert.pem").read_text())
    assert certs.stapling_chain(cert) is None  # no OCSP responder, and nginx would warn at every reload
    status = certs.tls_status(cert)
    assert status["self_signed"] is True and status["ocsp_stapling"] is False
    assert 800 <= int(status["days_left"]) <= 825  # type: ignore[call-overload]
    assert certs.tls_status(None) == {"enabled": False}
    assert "error" in certs.tls_status(str(tmp_path / "missing.pem"))


def test_plain_http_redirects_only_with_a_certificate_clients_can_verify(tmp_path: Path) -> None:
    """ISHGW_HTTP_REDIRECT=auto (the default): the self-signed default keeps the API on plain HTTP, as the
    quick start says; a CA-issued certificate (Let's Encrypt) turns the redirect on; true/false force it."""
    run(GENERATE, tmp_path / "self")
    (tmp_path / "ca").mkdir()
    _, issued, _ = make_ca(tmp_path / "ca")
    self_signed = str(tmp_path / "self" / "cert.pem")
    server = ServerSettings(prefix="/x", run_dir="/x", https_port=8443)
    expected = {
        ("auto", self_signed): False,
        ("auto", str(issued)): True,
        ("true", self_signed): True,
        ("false", str(issued)): False,
    }
    for (mode, cert), redirect in expected.items():
        settings = dataclasses.replace(server, tls_cert=cert, redirect_mode=mode)
        assert certs.redirects(settings) is redirect, (mode, cert)
        assert certs.with_tls_facts(settings).http_redirect is redirect
        assert certs.http_mode(settings)["redirect"] is redirect
    no_https = dataclasses.replace(server, https_port=0, tls_cert=str(issued), redirect_mode="true")
    assert certs.redirects(no_https) is False
    assert Settings(http_redirect="1").http_redirect == "true"
    assert Settings(http_redirect="FALSE").http_redirect == "false"
    assert Settings().http_redirect == "auto"


# --- a local ACME CA ----------------------------------------------------------------------------------------


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 signed by it: pebble's own TLS identity."""
    ca_key, ca, key, cert = (directory / n for n in ("ca.key", "ca.pem", "tls.key", "tls.pem"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run(
        "openssl",
        "req",
        "-x509",
        *ec,
        "-days",
        "2",
        "-subj",
        "/CN=ISH test CA",
        "-keyout",
        ca_key,
        "-out",
        ca,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    )
    csr = directory / "tls.csr"
    run("openssl", "req", *ec, "-subj", "/CN=localhost", "-keyout", key, "-out", csr)
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    run(
        "openssl",
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        ext,
        "-out",
        cert,
    )
    return ca, cert, key


class OcspResponder:
    """A real OCSP responder for pebble's intermediate: `openssl ocsp` answers each request from an index
    of every certificate certbot has received so far (pebble itself has no OCSP responder)."""

    def __init__(self, workdir: Path, archive: Path) -> None:
        self.workdir = workdir
        self.archive = archive
        self.issuer = workdir / "intermediate.pem"
        self.issuer_key = workdir / "intermediate.key"
        self.requests = 0
        self.port = free_port()
        responder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # nginx asks with GET /<base64 of the DER request>
                self._answer(base64.b64decode(unquote(self.path.lstrip("/"))))

            def do_POST(self) -> None:
                self._answer(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

            def _answer(self, request: bytes) -> None:
                body = responder.respond(request)
                self.send_response(200 if body else 500)
                self.send_header("Content-Type", "application/ocsp-response")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def respond(self, request: bytes) -> bytes:
        self.requests += 1
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            index, req, resp = Path(tmp, "index.txt"), Path(tmp, "req.der"), Path(tmp, "resp.der")
            lines = []
            for cert in sorted(self.archive.glob("*/cert*.pem")):
                info = certs.read_cert(cert)
                lines.append(
                    f"V\t{info.not_after:%y%m%d%H%M%SZ}\t\t{info.serial}\tunknown\t/{info.subject}\n"
                )
            index.write_text("".join(lines))
            req.write_bytes(request)
            done = subprocess.run(
                [
                    "openssl",
                    "ocsp",
                    "-index",
                    index,
                    "-CA",
                    self.issuer,
                    "-rsigner",
                    self.issuer,
                    "-rkey",
                    self.issuer_key,
                    "-reqin",
                    req,
                    "-respout",
                    resp,
                    "-ndays",
                    "1",
                ],
                capture_output=True,
                timeout=10,
                check=False,
            )
            return resp.read_bytes() if done.returncode == 0 and resp.exists() else b""

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Acme:
    """pebble + pebble-challtestsrv, validating HTTP-01 on `http_port` (the gateway's)."""

    workdir: Path
    http_port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ca, self.tls_cert, self.tls_key = make_ca(self.workdir)
        self.port, self.mgmt_port, self.dns_port = free_port(), free_port(), free_port()
        self.archive = self.workdir / "unused"
        self.ocsp: OcspResponder | None = None

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self, archive: Path) -> None:
        self.ocsp = OcspResponder(self.workdir, archive)
        self.ocsp.start()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
                "certificate": str(self.tls_cert),
                "privateKey": str(self.tls_key),
                "httpPort": self.http_port,
                "tlsPort": free_port(),  # TLS-ALPN-01 is not used: nothing listens there
                "ocspResponderURL": self.ocsp.url,
                "externalAccountBindingRequired": False,
            }
        }
        config_file = self.workdir / "pebble.json"
        config_file.write_text(json.dumps(config))
        log = open(self.workdir / "acme.log", "ab")  # noqa: SIM115 - lives as long as the processes
        self.procs.append(
            subprocess.Popen(
                [
                    "pebble-challtestsrv",
                    "-defaultIPv4",
                    "127.0.0.1",
                    "-defaultIPv6",
                    "",
                    "-dns01",
                    f"127.0.0.1:{self.dns_port}",
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                    "-management",
                    f"127.0.0.1:{free_port()}",
                ],
                stdout=log,
                stderr=log,
            )
        )
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_AUTHZREUSE": "0",
        }
        self.procs.append(
            subprocess.Popen(
                ["pebble", "-config", str(config_file), "-dnsserver", f"127.0.0.1:{self.dns_port}"],
                stdout=log,
                stderr=log,
                env=env,
            )
        )
        wait_for(lambda: self.get("/roots/0", mgmt=True), timeout=20, what="pebble management API")
        wait_for(lambda: self.get("/dir"), timeout=20, what="pebble ACME directory")
        # Pebble makes a new root and intermediate at every start.
        (self.workdir / "pebble-root.pem").write_text(self.get("/roots/0", mgmt=True))
        self.ocsp.issuer.write_text(self.get("/intermediates/0", mgmt=True))
        self.ocsp.issuer_key.write_text(self.get("/intermediate-keys/0", mgmt=True))

    def get(self, path: str, mgmt: bool = False) -> str:
        port = self.mgmt_port if mgmt else self.port
        response = httpx.get(
            f"https://127.0.0.1:{port}{path}",
            verify=ssl.create_default_context(cafile=str(self.ca)),
            timeout=5,
            trust_env=False,
        )
        response.raise_for_status()
        return response.text

    @property
    def root(self) -> Path:
        return self.workdir / "pebble-root.pem"

    def logs(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "acme.log").read_text(errors="replace")[-4000:]
        return ""

    def stop(self) -> None:
        if self.ocsp:
            self.ocsp.stop()
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@dataclass
class Env:
    gateway: Gateway
    acme: Acme
    https_port: int
    cron_dir: Path
    systemd_dir: Path

    @property
    def script_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ISHGW_")}
        env.update(
            ISHGW_HOME=str(self.gateway.home),
            ISHGW_DOMAIN=DOMAIN,
            ISHGW_EMAIL="ops@example.org",
            ISHGW_ACME_SERVER=self.acme.directory,
            ISHGW_CRON_DIR=str(self.cron_dir),
            ISHGW_SYSTEMD_DIR=str(self.systemd_dir),
            REQUESTS_CA_BUNDLE=str(self.acme.ca),
            no_proxy="127.0.0.1,localhost",
        )
        return env

    @property
    def archive(self) -> Path:
        return self.gateway.home / "letsencrypt" / "config" / "archive"

    def context(self, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
        """Trusts pebble's root only: a served certificate must chain to it and name gw.test."""
        context = ssl.create_default_context(cafile=str(self.acme.root))
        if alpn:
            context.set_alpn_protocols(list(alpn))
        return context

    def served(self) -> tuple[Mapping[str, object], str | None]:
        """The certificate nginx presents for gw.test, and the protocol it picks from h2 and http/1.1."""
        with (
            socket.create_connection(("127.0.0.1", self.https_port), timeout=5) as sock,
            self.context(("h2", "http/1.1")).wrap_socket(sock, server_hostname=DOMAIN) as tls,
        ):
            return tls.getpeercert() or {}, tls.selected_alpn_protocol()

    def served_serial(self) -> str:
        return str(self.served()[0]["serialNumber"]).upper()


@pytest.fixture(scope="module")
def tls_env() -> Iterator[Env]:
    workdir = Path(tempfile.mkdtemp(prefix="ishgw-tls-", dir="/tmp"))
    workdir.chmod(0o711)  # nginx workers (an unprivileged user) reach the ACME webroot below it
    home = workdir / "home"
    run(GENERATE, home / "ssl")  # deploy's default: HTTPS from the start with a self-signed certificate
    https_port = free_port()
    gateway = Gateway(
        home=home,
        extra_env={"ISHGW_HTTPS_PORT": str(https_port), "ISHGW_DOMAIN": DOMAIN},  # ISHGW_HTTP_REDIRECT: auto
    )
    # What deploy writes: the scripts read the running gateway's settings from gateway.env.
    settings = {k: gateway.env[k] for k in gateway.env if k.startswith("ISHGW_") and k != "ISHGW_HOME"}
    env_file = home / "gateway.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in sorted(settings.items())))
    env_file.chmod(0o600)
    (workdir / "acme").mkdir()
    acme = Acme(workdir / "acme", gateway.http_port)
    with gateway:
        try:
            acme.start(home / "letsencrypt" / "config" / "archive")
            yield Env(gateway, acme, https_port, workdir / "cron.d", workdir / "systemd")
        except BaseException:
            print(acme.logs())
            raise
        finally:
            acme.stop()
    shutil.rmtree(workdir, ignore_errors=True)


# --- HTTP with the self-signed default: the API on plain HTTP (no redirect into an untrusted certificate)


def test_self_signed_default_serves_the_api_on_plain_http(tls_env: Env) -> None:
    gw = tls_env.gateway
    client = httpx.Client(base_url=gw.url, follow_redirects=False, trust_env=False, timeout=5)
    assert client.get("/v1/models").json()["object"] == "list"  # the API itself, not a 301
    assert gw.status()["http"] == {
        "redirect": False,
        "mode": "auto",
        "reason": "the certificate is self-signed",
    }
    client.close()


# --- issuance ---------------------------------------------------------------------------------------------


def test_letsencrypt_setup_gets_the_certificate_and_nginx_serves_it(tls_env: Env) -> None:
    gw = tls_env.gateway
    before = tls_env.gateway.status()["tls"]
    assert before["self_signed"] is True and before["ocsp_stapling"] is False
    checksum_before = gw.health()["checksum"]
    controller_pid = gw.proc.pid if gw.proc else None

    output = run(SETUP, env=tls_env.script_env, timeout=300)

    live = gw.home / "letsencrypt" / "config" / "live" / DOMAIN
    ssl_dir = gw.home / "ssl"
    assert (ssl_dir / "cert.pem").resolve() == (live / "fullchain.pem").resolve()
    assert (ssl_dir / "key.pem").resolve() == (live / "privkey.pem").resolve()
    assert (ssl_dir / "chain.pem").resolve() == (live / "chain.pem").resolve()
    assert (ssl_dir / "self-signed" / "cert.pem").is_file()  # the previous pair is kept
    issued = certs.read_cert(live / "cert.pem")

    # nginx serves pebble's certificate for gw.test, chained to pebble's root, over HTTP/2-capable TLS.
    peer, alpn = tls_env.served()
    assert str(peer["serialNumber"]).upper() == issued.serial
    assert "Pebble Intermediate CA" in str(peer["issuer"])
    assert alpn == "h2"
    # ...without restarting the controller: only the configuration checksum (certificate fingerprint) moved.
    assert gw.proc is not None and gw.proc.pid == controller_pid and gw.proc.poll() is None
    assert gw.health()["checksum"] != checksum_before
    status_code, headers, _ = https_get(tls_env, "/health")
    assert status_code == 200 and "strict-transport-security: max-age=" in headers.lower()

    # /admin/status shows the certificate and its expiry.
    status = gw.status()["tls"]
    assert status["cert"] == str(ssl_dir / "cert.pem")
    assert status["serial"] == issued.serial and status["fingerprint"] == issued.fingerprint
    assert status["issuer"].startswith("CN=Pebble Intermediate CA") and status["self_signed"] is False
    assert datetime.fromisoformat(status["not_after"]) == issued.not_after
    assert status["days_left"] > 300 and status["expires_soon"] is False
    assert status["ocsp_stapling"] is True  # pebble's certificate names our OCSP responder

    # The renewal job: a cron entry and a systemd service + timer, all with the same certbot command.
    cron = (tls_env.cron_dir / "ish-gateway-renew").read_text()
    command = cron_command(cron)
    service = (tls_env.systemd_dir / "ish-gateway-renew.service").read_text()
    timer = (tls_env.systemd_dir / "ish-gateway-renew.timer").read_text()
    match = re.search(r"^ExecStart=(.*)$", service, re.M)
    assert match is not None
    renew = match.group(1)
    assert command.endswith(renew) and "certbot renew" in renew
    assert f"--config-dir {gw.home}/letsencrypt/config" in renew
    assert f'--deploy-hook "{ROOT}/ssl/renew-hook.sh --home {gw.home}"' in renew
    assert "OnCalendar=" in timer and "WantedBy=timers.target" in timer
    if shutil.which("systemd-analyze"):  # the units parse (the service's ExecStart, quoted hook included)
        units = [tls_env.systemd_dir / f"ish-gateway-renew.{kind}" for kind in ("timer", "service")]
        assert "ish-gateway-renew" not in run("systemd-analyze", "verify", *units)
    assert "reload done" in output


def https_get(env: Env, path: str) -> tuple[int, str, bytes]:
    """One request on a fresh TLS connection (SNI gw.test, pebble's root trusted)."""
    with (
        socket.create_connection(("127.0.0.1", env.https_port), timeout=5) as sock,
        env.context().wrap_socket(sock, server_hostname=DOMAIN) as tls,
    ):
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head.decode(errors="replace"), body


def cron_command(cron: str) -> str:
    lines = [line for line in cron.splitlines() if line and not line.startswith("#") and "=" not in line[:12]]
    assert len(lines) == 1, cron
    match = re.match(r"^(\S+\s+){5}root\s+(.*)$", lines[0])
    assert match is not None, lines[0]
    return match.group(2)


# --- HTTP once the certificate is CA-issued: redirect everything but ACME and /health ---------------------


def test_http_redirects_to_https_except_acme_and_health(tls_env: Env) -> None:
    gw = tls_env.gateway
    assert gw.status()["http"]["redirect"] is True  # auto: pebble's certificate is one clients can verify
    client = httpx.Client(base_url=gw.url, follow_redirects=False, trust_env=False, timeout=5)
    response = client.get("/v1/models?x=1", headers={"Host": DOMAIN})
    assert response.status_code == 301
    assert response.headers["location"] == f"https://{DOMAIN}:{tls_env.https_port}/v1/models?x=1"
    assert client.post("/v1/chat/completions", headers={"Host": DOMAIN}).status_code == 301
    # Issue 19: never to the client's Host, only to a configured name (ISHGW_DOMAIN).
    for host in ("evil.example", "evil.example:8443", f"{DOMAIN}.evil.example", "127.0.0.1"):
        response = client.get("/v1/models", headers={"Host": host})
        assert response.status_code == 301
        assert response.headers["location"] == f"https://{DOMAIN}:{tls_env.https_port}/v1/models", host
    assert client.get("/health").status_code == 200
    assert client.get("/.well-known/acme-challenge/missing").status_code == 404  # not a redirect
    challenge = gw.home / "acme" / ".well-known" / "acme-challenge" / "token-1"
    challenge.write_text("token-1.thumbprint")
    answer = client.get("/.well-known/acme-challenge/token-1")
    assert (answer.status_code, answer.text) == (200, "token-1.thumbprint")
    assert answer.headers["content-type"].startswith("text/plain")
    assert "strict-transport-security" not in answer.headers  # HSTS only over HTTPS
    challenge.unlink()
    client.close()


def test_ocsp_response_is_stapled(tls_env: Env) -> None:
    """nginx fetches the OCSP response on the first handshakes and staples it from then on."""

    def stapled() -> str | None:
        out = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{tls_env.https_port}",
                "-servername",
                DOMAIN,
                "-status",
            ],
            input="",
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
        return out if "OCSP Response Status: successful" in out else None

    out = wait_for(stapled, timeout=20, interval=0.3, what="a stapled OCSP response")
    assert "Cert Status: good" in out
    assert tls_env.acme.ocsp is not None and tls_env.acme.ocsp.requests >= 1


# --- renewal under load -----------------------------------------------------------------------------------


@dataclass
class Load:
    env: Env
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    serials: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, max_requests: int = 20000, max_seconds: float = 120) -> None:
        context = self.env.context()
        deadline = time.monotonic() + max_seconds
        while not self.stop.is_set() and self.ok + len(self.failures) < max_requests:
            if time.monotonic() > deadline:
                self.failures.append("load ran out of time")
                return
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.env.https_port), timeout=5) as sock,
                    context.wrap_socket(sock, server_hostname=DOMAIN) as tls,
                ):
                    serial = str((tls.getpeercert() or {}).get("serialNumber", "?")).upper()
                    tls.sendall(REQUEST)
                    data = b""
                    while chunk := tls.recv(65536):
                        data += chunk
                if not data.startswith(b"HTTP/1.1 200") or b'"ok":true' not in data:
                    self.failures.append(data[:100].decode(errors="replace"))
                    continue
                self.ok += 1
                self.serials[serial] = self.serials.get(serial, 0) + 1
            except (OSError, ssl.SSLError) as exc:
                self.failures.append(repr(exc))


def test_forced_renewal_under_load_switches_without_a_failed_request(tls_env: Env) -> None:
    gw = tls_env.gateway
    old = tls_env.served_serial()
    command = cron_command((tls_env.cron_dir / "ish-gateway-renew").read_text())
    load = Load(tls_env)
    thread = threading.Thread(target=load.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: load.ok >= 20, timeout=20, what="load running")
        # Exactly what cron runs, forced (the certificate is not due) and without certbot's random sleep.
        started = time.monotonic()
        run(
            "sh",
            "-c",
            f"{command} --force-renewal --no-random-sleep-on-renew",
            env=tls_env.script_env,
            timeout=300,
        )
        renewal_s = time.monotonic() - started
        new = tls_env.served_serial()
        seen_new = load.ok
        wait_for(lambda: load.ok >= seen_new + 20, timeout=20, what="load after the renewal")
    finally:
        load.stop.set()
        thread.join(30)

    live = certs.read_cert(gw.home / "letsencrypt" / "config" / "live" / DOMAIN / "cert.pem")
    print(
        f"\nrenewal: serial {old} -> {new} in {renewal_s:.1f}s; {load.ok} requests, "
        f"{len(load.failures)} failed; served serials {load.serials}"
    )
    assert new != old and new == live.serial
    assert not load.failures, load.failures[:5]
    assert load.serials.get(old, 0) > 0 and load.serials.get(new, 0) > 0
    assert gw.status()["tls"]["serial"] == new
    assert len(list((tls_env.archive / DOMAIN).glob("cert*.pem"))) == 2


def test_setup_again_keeps_the_certificate(tls_env: Env) -> None:
    serial = tls_env.served_serial()
    jobs = [(tls_env.cron_dir / "ish-gateway-renew").read_text()]
    run(SETUP, env=tls_env.script_env, timeout=300)
    assert tls_env.served_serial() == serial
    assert [(tls_env.cron_dir / "ish-gateway-renew").read_text()] == jobs
    assert len(list((tls_env.archive / DOMAIN).glob("cert*.pem"))) == 2
    # Stapling was switched on only with the CA's certificate: nginx never warned about it.
    error_log = (tls_env.gateway.home / "nginx" / "logs" / "error.log").read_text()
    assert '"ssl_stapling" ignored' not in error_log and "[emerg]" not in error_log


# --- deploy: the expiry warning ---------------------------------------------------------------------------


@pytest.mark.deploy
def test_deploy_warns_when_the_certificate_expires_within_14_days() -> None:
    from tests.deploy.conftest import Deployment, describe
    from tests.ports import free_ports

    home = Path(tempfile.mkdtemp(prefix="ishgw-deploy-tls-", dir="/tmp"))
    (home / "ssl").mkdir()
    run(
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-days", "5", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        "-keyout", home / "ssl" / "key.pem", "-out", home / "ssl" / "cert.pem",
    )  # fmt: skip
    deployment = Deployment(home, *free_ports(3))
    diagnostics.register(f"deployment {home}", deployment)
    try:
        result = deployment.run("deploy")
        assert result.returncode == 0, describe(result)
        assert f"warning: the certificate {home}/ssl/cert.pem expires within 14 days" in result.stderr
        tls = deployment.admin("/admin/status", key=deployment.admin_key).json()["tls"]
        assert tls["days_left"] in (4, 5) and tls["expires_soon"] is True and tls["self_signed"] is True
    finally:
        diagnostics.unregister(deployment)
        stopped = deployment.run("stop").returncode == 0
        if stopped:
            shutil.rmtree(home, ignore_errors=True)


# --- an outside scanner -----------------------------------------------------------------------------------

AEAD = re.compile(r"(GCM|CHACHA20|CCM)")
WEAK = re.compile(r"(RC4|DES|3DES|NULL|EXP|ADH|AECDH|anon|MD5|IDEA|SEED|CAMELLIA|PSK|SRP)", re.I)


def sslscan(port: int, sni: str = DOMAIN) -> ET.Element:
    out = run("sslscan", "--xml=-", "--no-colour", f"--sni-name={sni}", f"127.0.0.1:{port}", timeout=120)
    return ET.fromstring(out[out.index("<?xml") : out.rindex("</document>") + len("</document>")])


def scan_summary(doc: ET.Element) -> tuple[dict[str, bool], list[dict[str, str]]]:
    protocols = {f"{p.get('type')}{p.get('version')}": p.get("enabled") == "1" for p in doc.iter("protocol")}
    return protocols, [dict(c.attrib) for c in doc.iter("cipher")]


def weak_ciphers(ciphers: list[dict[str, str]]) -> list[str]:
    bad = []
    for c in ciphers:
        name, version = c["cipher"], c["sslversion"]
        if (
            WEAK.search(name)
            or int(c["bits"]) < 128
            or c.get("strength") not in ("strong", "acceptable")
            or version not in ("TLSv1.2", "TLSv1.3")
            or (version == "TLSv1.2" and not (AEAD.search(name) and name.startswith("ECDHE-")))
        ):
            bad.append(f"{version} {name} {c['bits']} bits ({c.get('strength')})")
    return bad


def test_scanner_finds_only_tls12_tls13_and_strong_ciphers(tls_env: Env) -> None:
    doc = sslscan(tls_env.https_port)
    protocols, ciphers = scan_summary(doc)
    print(f"\nsslscan: protocols {protocols}; ciphers {[(c['sslversion'], c['cipher']) for c in ciphers]}")
    assert protocols == {
        "ssl2": False,
        "ssl3": False,
        "tls1.0": False,
        "tls1.1": False,
        "tls1.2": True,
        "tls1.3": True,
    }
    assert ciphers and weak_ciphers(ciphers) == []
    assert {c["sslversion"] for c in ciphers} == {"TLSv1.2", "TLSv1.3"}
    assert all(h.get("vulnerable") == "0" for h in doc.iter("heartbleed"))
    assert all(r.get("secure") == "1" or r.get("supported") == "0" for r in doc.iter("renegotiation"))
    assert all(c.get("supported") != "1" for c in doc.iter("compression"))


def test_scanner_would_see_old_protocols_and_weak_ciphers(tmp_path: Path) -> None:
    """The control: the same scan against a deliberately weak server reports what it must."""
    run(GENERATE, tmp_path)
    port = free_port()
    server = subprocess.Popen(
        [
            "openssl",
            "s_server",
            "-accept",
            f"127.0.0.1:{port}",
            "-cert",
            tmp_path / "cert.pem",
            "-key",
            tmp_path / "key.pem",
            "-tls1",
            "-cipher",
            "ALL:@SECLEVEL=0",
            "-www",
            "-quiet",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def accepts() -> bool:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True

        wait_for(accepts, timeout=10)
        protocols, ciphers = scan_summary(sslscan(port, sni="localhost"))
    finally:
        server.terminate()
        server.wait(10)
    assert protocols["tls1.0"] is True
    assert weak_ciphers(ciphers)  # CBC-SHA1 and anonymous suites on TLS 1.0
