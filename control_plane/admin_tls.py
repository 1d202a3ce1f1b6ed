"""TLS for the admin listener: required whenever it listens beyond loopback."""

from __future__ import annotations

import ssl
from pathlib import Path

from control_plane.client_access_settings import is_loopback
from control_plane.settings import Settings


class AdminTlsError(RuntimeError):
    pass


def admin_tls_wanted(settings: Settings) -> bool:
    host, _ = settings.admin_host_port
    return settings.admin_tls if settings.admin_tls is not None else not is_loopback(host)


def admin_cert_files(settings: Settings) -> tuple[Path, Path] | None:
    """ISHGW_ADMIN_TLS_CERT/KEY, or else the gateway's certificate; None when neither exists."""
    if settings.admin_tls_cert and settings.admin_tls_key:
        return settings.admin_tls_cert, settings.admin_tls_key
    cert = settings.tls_cert or settings.home / "ssl" / "cert.pem"
    key = settings.tls_key or settings.home / "ssl" / "key.pem"
    return (cert, key) if cert.is_file() and key.is_file() else None


def admin_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's TLS context, None on loopback (unless ISHGW_ADMIN_TLS=true). Raises AdminTlsError
    when TLS is needed and no certificate can be loaded: the controller must not start in clear."""
    host, _ = settings.admin_host_port
    if settings.admin_tls is False and not is_loopback(host):
        raise AdminTlsError(f"ISHGW_ADMIN_TLS=false is refused: the admin API listens on {host}")
    if not admin_tls_wanted(settings):
        return None
    files = admin_cert_files(settings)
    if files is None:
        raise AdminTlsError(
            f"the admin API listens on {host} and needs TLS: set ISHGW_ADMIN_TLS_CERT and "
            "ISHGW_ADMIN_TLS_KEY or install the gateway certificate (ssl/generate-certs.sh)"
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(files[0]), str(files[1]))
    except (OSError, ssl.SSLError) as exc:
        raise AdminTlsError(f"cannot load the admin TLS certificate {files[0]}: {exc}") from None
    return context
