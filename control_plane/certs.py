"""The server certificate: what it is (expiry, serial, fingerprint, OCSP responder) and whether nginx can
staple OCSP for it.

Parsing is pure (`parse_x509`, `tls_status`); `read_cert` runs `openssl x509` once per version of the file
(cached by the file's identity), so calling it at every reconcile and every /admin/status is cheap.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from control_plane.render.spec import ServerSettings

# deploy-load-balancer.sh warns below this many days; /admin/status flags it as `expires_soon`.
EXPIRY_WARNING_DAYS = 14
_X509_FIELDS = ("-serial", "-issuer", "-subject", "-enddate", "-fingerprint", "-sha256", "-ocsp_uri")


class CertError(Exception):
    pass


@dataclass(frozen=True)
class CertInfo:
    not_after: datetime
    serial: str
    issuer: str
    subject: str
    fingerprint: str  # SHA-256 of the leaf certificate, as openssl and browsers show it
    ocsp_uri: str | None

    @property
    def self_signed(self) -> bool:
        return self.issuer == self.subject


def parse_enddate(value: str) -> datetime:
    """openssl's notAfter ('Nov 23 11:32:24 2031 GMT') as an aware UTC datetime."""
    text = value.strip().removeprefix("notAfter=").strip()
    if not text.endswith(" GMT"):
        raise CertError(f"unexpected notAfter format: {value!r}")
    try:
        # openssl pads the day with a space ('Feb  3'): split() normalises it.
        parsed = datetime.strptime(" ".join(text[:-4].split()), "%b %d %H:%M:%S %Y")
    except ValueError as exc:
        raise CertError(f"unexpected notAfter format: {value!r}") from exc
    return parsed.replace(tzinfo=UTC)


def parse_x509(text: str) -> CertInfo:
    """The output of `openssl x509 -noout -nameopt RFC2253` with the options in _X509_FIELDS."""
    fields: dict[str, str] = {}
    ocsp: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        lowered = key.lower()
        if sep and lowered in ("serial", "issuer", "subject", "notafter"):
            fields[lowered] = value.strip()
        elif sep and lowered.endswith("fingerprint"):
            fields["fingerprint"] = value.strip()
        elif "://" in line:
            ocsp.append(line)
    missing = [name for name in ("serial", "notafter", "fingerprint") if name not in fields]
    if missing:
        raise CertError(f"openssl output lacks {', '.join(missing)}")
    return CertInfo(
        not_after=parse_enddate(fields["notafter"]),
        serial=fields["serial"].upper(),
        issuer=fields.get("issuer", ""),
        subject=fields.get("subject", ""),
        fingerprint=fields["fingerprint"].upper(),
        ocsp_uri=ocsp[0] if ocsp else None,
    )


_cache: dict[tuple[str, int, int, int], CertInfo] = {}
_cache_lock = threading.Lock()


def read_cert(path: str | Path) -> CertInfo:
    """The first certificate in `path` (a full chain starts with the leaf). Raises CertError."""
    try:
        stat = os.stat(path)  # follows symlinks: certbot's live/ links change at every renewal
    except OSError as exc:
        raise CertError(f"{path}: {exc.strerror}") from exc
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    try:
        done = subprocess.run(
            ["openssl", "x509", "-noout", "-nameopt", "RFC2253", "-in", str(path), *_X509_FIELDS],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CertError(f"openssl x509 failed: {exc}") from exc
    if done.returncode != 0:
        raise CertError(f"{path}: not a readable certificate: {done.stderr.strip()[:200]}")
    info = parse_x509(done.stdout)
    with _cache_lock:
        if len(_cache) > 32:
            _cache.clear()
        _cache[key] = info
    return info


def chain_file(cert: str) -> str | None:
    """The issuer chain that belongs to `cert`: chain.pem beside it (ssl/chain.pem, linked by
    ssl/letsencrypt-setup.sh), or beside the file it links to (certbot's live/<name>/chain.pem)."""
    path = Path(cert)
    for candidate in (path.with_name("chain.pem"), path.resolve().with_name("chain.pem")):
        if candidate != path and candidate.is_file() and candidate.stat().st_size > 0:
            return str(candidate)
    return None


def stapling_chain(cert: str | None) -> str | None:
    """The file for ssl_trusted_certificate when OCSP stapling can work, else None: the certificate
    names an OCSP responder and its issuer chain is at hand. A self-signed certificate has neither, and
    `ssl_stapling on` would only make nginx warn at every reload."""
    if not cert:
        return None
    try:
        info = read_cert(cert)
    except CertError:
        return None
    if info.self_signed or not info.ocsp_uri:
        return None
    return chain_file(cert)


def verifiable(cert: str | None) -> bool:
    """True for a readable certificate that clients can check without being told about it (not the
    self-signed default)."""
    if not cert:
        return False
    try:
        return not read_cert(cert).self_signed
    except CertError:
        return False


def redirect_decision(server: ServerSettings) -> tuple[bool, str]:
    """Whether plain HTTP redirects to HTTPS, and why: ISHGW_HTTP_REDIRECT=true always (with HTTPS on),
    auto only once the certificate is one clients can verify, so the self-signed default keeps the API on
    HTTP."""
    if not server.https_port:
        return False, "HTTPS is off"
    if server.redirect_mode != "auto":
        return server.redirect_mode == "true", f"set to {server.redirect_mode}"
    if verifiable(server.tls_cert):
        return True, "the certificate is verifiable"
    return False, "the certificate is self-signed"


def redirects(server: ServerSettings) -> bool:
    return redirect_decision(server)[0]


def with_tls_facts(server: ServerSettings) -> ServerSettings:
    """`server` with the certificate-dependent settings filled in for this reconcile: a renewed or newly
    linked certificate takes effect without restarting the controller."""
    trusted = stapling_chain(server.tls_cert) if server.https_port else None
    redirect = redirects(server)
    if trusted == server.tls_trusted_certificate and redirect == server.http_redirect:
        return server
    return dataclasses.replace(server, tls_trusted_certificate=trusted, http_redirect=redirect)


def tls_status(cert: str | None, now: datetime | None = None) -> dict[str, object]:
    """The `tls` part of /admin/status."""
    if not cert:
        return {"enabled": False}
    try:
        info = read_cert(cert)
    except CertError as exc:
        return {"enabled": True, "cert": cert, "error": str(exc)}
    return describe(cert, info, now or datetime.now(UTC), stapling_chain(cert) is not None)


def describe(cert: str, info: CertInfo, now: datetime, stapling: bool) -> dict[str, object]:
    seconds_left = (info.not_after - now).total_seconds()
    days_left = int(seconds_left // 86400)
    return {
        "enabled": True,
        "cert": cert,
        "not_after": info.not_after.isoformat(),
        "days_left": days_left,
        "expired": seconds_left <= 0,
        "expires_soon": days_left < EXPIRY_WARNING_DAYS,
        "fingerprint": info.fingerprint,
        "serial": info.serial,
        "issuer": info.issuer,
        "subject": info.subject,
        "self_signed": info.self_signed,
        "ocsp_stapling": stapling,
    }


def http_mode(server: ServerSettings) -> dict[str, object]:
    """The `http` part of /admin/status: what plain HTTP does and why."""
    redirect, why = redirect_decision(server)
    return {"redirect": redirect, "mode": server.redirect_mode, "reason": why}
