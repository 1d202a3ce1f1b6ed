"""The client access policy as plain values: client keys and JWT keys, limits, IP filters. Pure, like
build_spec. (Once called "the secure edge": the nginx files it renders keep that name.)

build_client_access(world parts, policy) -> ClientAccessSpec; the templates (edge.conf.j2, edge.j2) and the
generated clients.json (render/lua_data.py) render it. nginx runs limit_req in the preaccess phase, before
the body is read, so the client's identity for the per-key limits comes from gw.gateway.identify
(rewrite_by_lua) over the request headers: ``$gw_client_id`` (the key id) and ``$gw_client_rpm`` (its
rate). Keys are grouped by rate: one limit_req_zone per distinct rate, keyed by a map that is the key id
only for keys of that rate.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from control_plane.providers import Endpoint, Kind

if TYPE_CHECKING:
    from control_plane.registry.client_keys import ClientKey

CLASSES = ("chat", "embeddings", "uploads")
# The status nginx's limit zones refuse with (limit_req_status, limit_conn_status), which error_page hands
# to @gw_limited, whose answer is the 429. Not 429 itself: an endpoint's location also proxies (the router's
# home profile, servers.conf), where an instance's 429 goes to the profile's 429 chain. No provider sends it.
LIMITED_STATUS = 439
# Upstream response headers that tell a client which provider, account, deployment or proxy answered.
# nginx hides Server, Date, X-Pad and X-Accel-* itself; LEAKY_PREFIXES are removed by gw.gateway.hide_headers.
LEAKY_HEADERS = (
    "openai-organization",
    "openai-processing-ms",
    "openai-version",
    "openai-project",
    "openai-model",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "anthropic-organization-id",
    "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-limit",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-limit",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-limit",
    "anthropic-ratelimit-output-tokens-remaining",
    "anthropic-ratelimit-output-tokens-reset",
    "request-id",
    "cf-ray",
    "cf-cache-status",
    "server",
    "x-powered-by",
    "via",
    "alt-svc",
    "set-cookie",
    "azureml-model-session",
    "apim-request-id",
    "x-ms-region",
    "x-ms-client-request-id",
    "x-ms-deployment-name",
    "x-ms-rai-invoked",
    "x-envoy-upstream-service-time",
    "strict-transport-security",
    # hop-by-hop (RFC 9110 7.6.1) beyond Connection/Transfer-Encoding, which nginx handles itself
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "trailer",
    "upgrade",
)
LEAKY_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "openai-", "x-ms-", "x-envoy-", "cf-", "x-kong-")
# Request headers that are hop-by-hop, or credentials meant for a proxy: never forwarded upstream.
HOP_BY_HOP_REQUEST = ("Keep-Alive", "TE", "Trailer", "Upgrade", "Proxy-Connection", "Proxy-Authorization")
# Request headers of the client that are none of a provider's business: its cookies, the gateway's admin
# key, and its own claims about its address (the gateway sends its own view, or none).
PRIVATE_REQUEST = ("Cookie", "X-Admin-API-Key", "Forwarded", "X-Forwarded-Host")


@dataclass(frozen=True)
class ClassLimit:
    """Limits of one endpoint class (chat, embeddings, uploads). The rate counts per client (key, or IP
    without one); a default rate (``anonymous_only``) binds only requests without a valid key."""

    name: str
    rpm: int
    burst: int
    body_mb: int
    body_timeout_s: int
    send_timeout_s: int
    anonymous_only: bool = True

    @property
    def setting(self) -> str:
        return f"ISHGW_LIMIT_{self.name.upper()}_RPM"


# What a class limit is when its ISHGW_LIMIT_<CLASS>_RPM is unset (then it binds anonymous traffic only).
CLASS_DEFAULT_RPM = {"chat": 3000, "embeddings": 12000, "uploads": 120}
DEFAULT_CLASSES = (
    ClassLimit("chat", CLASS_DEFAULT_RPM["chat"], 300, 16, 60, 300),
    ClassLimit("embeddings", CLASS_DEFAULT_RPM["embeddings"], 1000, 16, 60, 60),
    ClassLimit("uploads", CLASS_DEFAULT_RPM["uploads"], 20, 16, 300, 60),
)


@dataclass(frozen=True)
class JwtFiles:
    hs256_secret: str | None = None
    public_keys: str | None = None
    jwks: str | None = None

    @property
    def any(self) -> bool:
        return bool(self.hs256_secret or self.public_keys or self.jwks)


@dataclass(frozen=True)
class ClientAccessPolicy:
    """The settings the client access policy renders from (ISHGW_*; see client_access_settings.py)."""

    auth_required: bool = True
    key_burst: int = 10
    key_default_rpm: int = 0  # for keys without their own rpm_limit
    ip_rpm: int = 6000
    ip_burst: int = 500
    classes: tuple[ClassLimit, ...] = DEFAULT_CLASSES
    conn_per_key: int = 256
    conn_per_ip: int = 512
    ip_allow: tuple[str, ...] = ()
    ip_deny: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    forward_client_ip: bool = True  # X-Forwarded-For / X-Real-IP: $remote_addr, else none
    jwt_files: JwtFiles = JwtFiles()
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: int = 30
    jwt_default_rpm: int = 600
    jwt_rpm_tiers: tuple[int, ...] = (60, 600, 6000)
    jwt_cache_size: int = 10000  # verdicts per nginx worker (resty.lrucache)

    def limit(self, name: str) -> ClassLimit:
        return next(c for c in self.classes if c.name == name)


@dataclass(frozen=True)
class PublicKey:
    """A JWT verification key as gw.crypto loads it: SPKI DER (d2i_PUBKEY), base64."""

    alg: str  # RS256 | ES256
    spki_b64: str
    kid: str | None = None


@dataclass(frozen=True)
class JwtKeys:
    """JWT key material read from the configured files (effects fill it in; see jwt_keys.py)."""

    hs256_secret: str | None = None
    public_keys: tuple[PublicKey, ...] = ()

    @property
    def usable(self) -> bool:
        return bool(self.hs256_secret or self.public_keys)


@dataclass(frozen=True)
class RenderedKey:
    id: str
    key_hash: str
    models: tuple[str, ...]
    rpm: int
    expires: int  # epoch seconds; 0: never
    enabled: bool
    tpm: int = 0  # tokens per minute (gw.limits); 0: none
    budget_usd: float = 0.0  # per budget_period (gw.limits); 0: none
    budget_period: str = "month"

    @property
    def limited(self) -> bool:
        """The key has a limit gw.limits enforces (a disabled key is refused before any limit)."""
        return self.enabled and (self.tpm > 0 or self.budget_usd > 0)


@dataclass(frozen=True)
class ClientAccessSpec:
    policy: ClientAccessPolicy = ClientAccessPolicy()
    keys: tuple[RenderedKey, ...] = ()
    jwt: JwtKeys | None = None
    # Rates (requests per minute) with a per-key limit_req zone each: the keys' own and the JWT tiers.
    key_rates: tuple[int, ...] = ()
    class_of_path: tuple[tuple[str, str], ...] = field(default=())

    @property
    def token_limits(self) -> bool:
        """Some key has a tpm_limit or a budget: nginx counts usage for them even with
        ISHGW_USAGE_ACCOUNTING off."""
        return any(k.limited for k in self.keys)

    def class_limit(self, path: str) -> ClassLimit | None:
        name = dict(self.class_of_path).get(path)
        return self.policy.limit(name) if name else None

    def kind_limit(self, kind: Kind) -> ClassLimit:
        """The class limit of a proxy profile's kind (its named location's limits and send_timeout)."""
        return self.policy.limit(kind_class(kind))

    @property
    def leaky_headers(self) -> tuple[str, ...]:
        return LEAKY_HEADERS

    @property
    def hop_by_hop_request(self) -> tuple[str, ...]:
        return HOP_BY_HOP_REQUEST

    @property
    def private_request(self) -> tuple[str, ...]:
        return PRIVATE_REQUEST

    @property
    def address_refused(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """The data-plane address rules (ISHGW_IP_DENY first, then ISHGW_IP_ALLOW, then deny all when an
        allow list exists) as a geo block: (default, ((cidr, "1" refused | "0" allowed), ...)). geo takes
        the most specific match, so an allowed network inside a denied one is marked refused."""
        return address_geo(self.policy.ip_allow, self.policy.ip_deny)


def address_geo(allow: Iterable[str], deny: Iterable[str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    allow, deny = tuple(allow), tuple(deny)
    denied = [ipaddress.ip_network(cidr, strict=False) for cidr in deny]

    def inside_denied(cidr: str) -> bool:
        net = ipaddress.ip_network(cidr, strict=False)
        return any(net.version == d.version and net.subnet_of(d) for d in denied)  # type: ignore[arg-type]

    entries = {cidr: "1" if inside_denied(cidr) else "0" for cidr in allow}
    entries.update((cidr, "1") for cidr in deny)
    return ("1" if allow else "0"), tuple(entries.items())


def kind_class(kind: Kind) -> str:
    """chat or embeddings by what an endpoint or pool of this kind does. No routed endpoint takes uploads
    (multipart) yet: the uploads class is configured and rendered for the day one does."""
    return "embeddings" if kind is Kind.EMBEDDING else "chat"


def endpoint_class(endpoint: Endpoint) -> str:
    return kind_class(endpoint.kind)


def _epoch(value: datetime | None) -> int:
    return int(value.timestamp()) if value is not None else 0


def build_client_access(
    policy: ClientAccessPolicy, keys: Iterable[ClientKey], jwt: JwtKeys | None, endpoints: Iterable[Endpoint]
) -> ClientAccessSpec:
    rendered = tuple(
        sorted(
            (
                RenderedKey(
                    id=key.id,
                    key_hash=key.key_hash,
                    models=tuple(key.allowed_models),
                    rpm=policy.key_default_rpm if key.rpm_limit is None else key.rpm_limit,
                    expires=_epoch(key.expires_at),
                    enabled=key.enabled,
                    tpm=key.tpm_limit,
                    budget_usd=key.max_budget_usd,
                    budget_period=key.budget_period,
                )
                for key in keys
            ),
            key=lambda k: k.id,
        )
    )
    jwt = jwt if jwt is not None and jwt.usable else None
    rates = {k.rpm for k in rendered if k.enabled and k.rpm > 0}
    if jwt is not None:
        rates |= set(policy.jwt_rpm_tiers)
        if policy.jwt_default_rpm:
            rates.add(policy.jwt_default_rpm)
    return ClientAccessSpec(
        policy=policy,
        keys=rendered,
        jwt=jwt,
        key_rates=tuple(sorted(rates)),
        class_of_path=tuple(sorted((e.path, endpoint_class(e)) for e in endpoints)),
    )


def limits_in_force(policy: ClientAccessPolicy) -> dict[str, object]:
    """The gateway's own limits as /admin/status and `deploy-load-balancer.sh status` show them."""
    anonymous: dict[str, object] = {"per_address_rpm": policy.ip_rpm, "concurrent": policy.conn_per_ip}
    keyed: dict[str, object] = {
        "per_key_rpm": "the key's rpm_limit (0: none)",
        "burst": policy.key_burst,
        "concurrent": policy.conn_per_key,
    }
    for c in policy.classes:
        anonymous[f"{c.name}_rpm"] = c.rpm
        if not c.anonymous_only:
            keyed[f"{c.name}_rpm"] = c.rpm
    return {"with_valid_key": keyed, "without_valid_key": anonymous}
