"""Settings of the client access policy (once called "the secure edge"): client authentication, JWT,
limits, IP filters, admin hardening.

``Settings`` inherits these, so every knob is still one ``ISHGW_*`` environment variable. Lists are
comma-separated (``ISHGW_IP_DENY=203.0.113.0/24,2001:db8::/32``); every CIDR is validated here.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from control_plane.registry import validators as v
from control_plane.render.client_access import CLASS_DEFAULT_RPM, ClassLimit, ClientAccessPolicy, JwtFiles

CidrList = Annotated[list[str], NoDecode]
MAX_RPM = 10**6
MAX_CONN = 65535  # nginx refuses a larger limit_conn
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def check_cidrs(values: list[str]) -> list[str]:
    return [v.check_cidr(value) for value in values]


def check_server_name(name: str) -> str:
    """A host name or IP address clients reach the gateway by (ISHGW_DOMAIN), lower case."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not v.HOSTNAME_RE.fullmatch(name):
        raise ValueError(f"{name[:80]!r} is neither a host name nor an IP address")
    return name.lower()


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ClientAccessSettings(BaseSettings):
    """Client auth, limits and filters of the data plane; IP filter, TLS and audit of the admin API."""

    model_config = SettingsConfigDict(env_prefix="ISHGW_", extra="ignore")

    # -- clients -------------------------------------------------------------------------------------------
    auth_required: bool = Field(
        default=True, description="Clients need an API key or JWT; false runs the data plane open"
    )
    jwt_hs256_secret_file: Path | None = Field(default=None, description="HS256 shared secret (>= 32 bytes)")
    jwt_public_keys_file: Path | None = Field(
        default=None, description="PEM public keys: RSA keys verify RS256, P-256 keys verify ES256"
    )
    jwt_jwks_file: Path | None = Field(default=None, description="A JWKS document (RSA and P-256 keys)")
    jwt_audience: str | None = Field(default=None, description="Required 'aud' when set")
    jwt_issuer: str | None = Field(default=None, description="Required 'iss' when set")
    jwt_leeway_s: int = Field(default=30, ge=0, le=600, description="Clock skew allowed for exp/nbf")
    jwt_default_rpm: int = Field(default=600, ge=0, le=MAX_RPM, description="For tokens without 'rpm'")
    jwt_rpm_tiers: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [60, 600, 6000],
        description="Rates a token's 'rpm' claim is rounded down to (each one is a limit_req zone)",
    )
    jwt_cache_size: int = Field(
        default=10000, ge=1, le=1_000_000, description="JWT verdicts each nginx worker keeps (until exp)"
    )

    # -- limits (0 switches a limit off) -------------------------------------------------------------------
    limit_key_burst: int = Field(default=10, ge=0, le=MAX_RPM, description="Burst of every per-key limit")
    key_default_rpm: int = Field(
        default=0, ge=0, le=MAX_RPM, description="Rate of keys created without rpm_limit; 0: no limit"
    )
    limit_ip_rpm: int = Field(
        default=6000, ge=0, le=MAX_RPM, description="Per address, for requests without a valid key"
    )
    limit_ip_burst: int = Field(default=500, ge=0, le=MAX_RPM)
    # Per endpoint class. Unset: the class default binds anonymous and failed-authentication traffic only
    # (per address); set: it binds every client (per key, or per address without one).
    limit_chat_rpm: int | None = Field(default=None, ge=0, le=MAX_RPM, description="Default 3000, anonymous")
    limit_chat_burst: int = Field(default=300, ge=0, le=MAX_RPM)
    limit_embeddings_rpm: int | None = Field(
        default=None, ge=0, le=MAX_RPM, description="Default 12000, anonymous"
    )
    limit_embeddings_burst: int = Field(default=1000, ge=0, le=MAX_RPM)
    limit_uploads_rpm: int | None = Field(
        default=None, ge=0, le=MAX_RPM, description="Default 120, anonymous"
    )
    limit_uploads_burst: int = Field(default=20, ge=0, le=MAX_RPM)
    limit_conn_per_key: int = Field(default=256, ge=0, le=MAX_CONN, description="Concurrent requests per key")
    limit_conn_per_ip: int = Field(
        default=512, ge=0, le=MAX_CONN, description="Concurrent requests per IP without a valid key"
    )
    chat_max_body_mb: int | None = Field(default=None, ge=1, le=1024, description="Default: client_max_body")
    embeddings_max_body_mb: int | None = Field(default=None, ge=1, le=1024)
    uploads_max_body_mb: int | None = Field(default=None, ge=1, le=1024)
    chat_body_timeout_s: int = Field(default=60, ge=1, le=3600, description="client_body_timeout")
    embeddings_body_timeout_s: int = Field(default=60, ge=1, le=3600)
    uploads_body_timeout_s: int = Field(default=300, ge=1, le=3600)
    chat_send_timeout_s: int = Field(default=300, ge=1, le=3600, description="send_timeout (slow readers)")
    embeddings_send_timeout_s: int = Field(default=60, ge=1, le=3600)
    uploads_send_timeout_s: int = Field(default=60, ge=1, le=3600)

    # -- addresses -----------------------------------------------------------------------------------------
    ip_allow: CidrList = Field(default_factory=list, description="Data plane: only these (empty: all)")
    ip_deny: CidrList = Field(default_factory=list, description="Data plane: never these (checked first)")
    trusted_proxies: CidrList = Field(
        default_factory=list, description="Proxies whose X-Forwarded-For gives the real client IP"
    )
    forward_client_ip: bool = Field(
        default=True,
        description="Tell providers the client's address (X-Forwarded-For, X-Real-IP: the address the "
        "gateway sees, never the client's own headers); false sends neither",
    )
    admin_ip_allow: CidrList = Field(default_factory=list, description="Admin API: only these (empty: all)")
    admin_ip_deny: CidrList = Field(default_factory=list, description="Admin API: never these")

    # -- admin API -----------------------------------------------------------------------------------------
    admin_tls: bool | None = Field(default=None, description="Default: TLS exactly when not on loopback")
    admin_tls_cert: Path | None = Field(default=None, description="Default: the gateway certificate")
    admin_tls_key: Path | None = None
    admin_auth_failure_limit: int = Field(default=10, ge=1, le=MAX_RPM, description="Per address and window")
    admin_auth_failure_window_s: float = Field(default=60.0, ge=1.0, le=86400.0)
    audit_keep: int = Field(default=100_000, ge=100, le=10**8, description="Audit rows kept")

    @field_validator(
        "ip_allow",
        "ip_deny",
        "trusted_proxies",
        "admin_ip_allow",
        "admin_ip_deny",
        "jwt_rpm_tiers",
        mode="before",
    )
    @classmethod
    def _csv(cls, value: object) -> object:
        return split_csv(value)

    @field_validator("ip_allow", "ip_deny", "trusted_proxies", "admin_ip_allow", "admin_ip_deny")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        return check_cidrs(value)

    @field_validator("status_allow", check_fields=False)
    @classmethod
    def _status_cidrs(cls, value: list[str]) -> list[str]:
        return check_cidrs(value)

    @field_validator("jwt_rpm_tiers")
    @classmethod
    def _tiers(cls, value: list[int]) -> list[int]:
        if not value or any(not 1 <= tier <= MAX_RPM for tier in value):
            raise ValueError(f"jwt_rpm_tiers: one or more rates, each 1-{MAX_RPM}")
        return sorted(set(value))

    @field_validator("jwt_audience", "jwt_issuer")
    @classmethod
    def _claim_value(cls, value: str | None) -> str | None:
        if value is not None and not (1 <= len(value) <= 512 and value.isprintable()):
            raise ValueError("must be 1-512 printable characters")
        return value or None

    @model_validator(mode="after")
    def _tls_pair(self) -> ClientAccessSettings:
        if (self.admin_tls_cert is None) != (self.admin_tls_key is None):
            raise ValueError("set both ISHGW_ADMIN_TLS_CERT and ISHGW_ADMIN_TLS_KEY, or neither")
        return self


def client_access_policy(settings: ClientAccessSettings, default_body_mb: int) -> ClientAccessPolicy:
    """The rendered part of these settings."""
    s = settings

    def cls(name: str, rpm: int | None, burst: int, body: int | None, body_t: int, send_t: int) -> ClassLimit:
        anonymous_only = rpm is None
        rate = CLASS_DEFAULT_RPM[name] if rpm is None else rpm
        return ClassLimit(name, rate, burst, body or default_body_mb, body_t, send_t, anonymous_only)

    return ClientAccessPolicy(
        auth_required=s.auth_required,
        key_burst=s.limit_key_burst,
        key_default_rpm=s.key_default_rpm,
        ip_rpm=s.limit_ip_rpm,
        ip_burst=s.limit_ip_burst,
        classes=(
            cls(
                "chat",
                s.limit_chat_rpm,
                s.limit_chat_burst,
                s.chat_max_body_mb,
                s.chat_body_timeout_s,
                s.chat_send_timeout_s,
            ),
            cls(
                "embeddings",
                s.limit_embeddings_rpm,
                s.limit_embeddings_burst,
                s.embeddings_max_body_mb,
                s.embeddings_body_timeout_s,
                s.embeddings_send_timeout_s,
            ),
            cls(
                "uploads",
                s.limit_uploads_rpm,
                s.limit_uploads_burst,
                s.uploads_max_body_mb,
                s.uploads_body_timeout_s,
                s.uploads_send_timeout_s,
            ),
        ),
        conn_per_key=s.limit_conn_per_key,
        conn_per_ip=s.limit_conn_per_ip,
        ip_allow=tuple(s.ip_allow),
        ip_deny=tuple(s.ip_deny),
        trusted_proxies=tuple(s.trusted_proxies),
        forward_client_ip=s.forward_client_ip,
        jwt_files=JwtFiles(
            hs256_secret=str(s.jwt_hs256_secret_file) if s.jwt_hs256_secret_file else None,
            public_keys=str(s.jwt_public_keys_file) if s.jwt_public_keys_file else None,
            jwks=str(s.jwt_jwks_file) if s.jwt_jwks_file else None,
        ),
        jwt_audience=s.jwt_audience,
        jwt_issuer=s.jwt_issuer,
        jwt_leeway_s=s.jwt_leeway_s,
        jwt_default_rpm=s.jwt_default_rpm,
        jwt_rpm_tiers=tuple(s.jwt_rpm_tiers),
        jwt_cache_size=s.jwt_cache_size,
    )
