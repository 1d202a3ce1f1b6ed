"""What each provider type needs: default base URL, how credentials travel, which client APIs it speaks,
and how a client path maps to the provider's path. Pure data and pure functions."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from control_plane.registry.models import InstanceConfig, ProviderType

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_AZURE_API_VERSION = "2024-10-21"


class ApiFamily(StrEnum):
    """The wire format a client speaks."""

    OPENAI = "openai"
    OLLAMA = "ollama"
    ANTHROPIC = "anthropic"


class Kind(StrEnum):
    CHAT = "chat"
    EMBEDDING = "embedding"


@dataclass(frozen=True)
class Endpoint:
    path: str
    family: ApiFamily
    kind: Kind


# Every client-facing model endpoint the gateway routes by body.
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/v1/chat/completions", ApiFamily.OPENAI, Kind.CHAT),
    Endpoint("/v1/completions", ApiFamily.OPENAI, Kind.CHAT),
    Endpoint("/v1/responses", ApiFamily.OPENAI, Kind.CHAT),
    Endpoint("/v1/embeddings", ApiFamily.OPENAI, Kind.EMBEDDING),
    Endpoint("/api/chat", ApiFamily.OLLAMA, Kind.CHAT),
    Endpoint("/api/generate", ApiFamily.OLLAMA, Kind.CHAT),
    Endpoint("/api/embed", ApiFamily.OLLAMA, Kind.EMBEDDING),
    Endpoint("/api/embeddings", ApiFamily.OLLAMA, Kind.EMBEDDING),
    Endpoint("/v1/messages", ApiFamily.ANTHROPIC, Kind.CHAT),
)


class AuthStyle(StrEnum):
    NONE = "none"
    BEARER = "bearer"
    AZURE = "azure"
    ANTHROPIC = "anthropic"


@dataclass(frozen=True)
class Provider:
    type: ProviderType
    default_base: str | None
    auth: AuthStyle
    families: frozenset[ApiFamily]
    # The path a client's /v1 prefix stands for when api_base has no path.
    default_openai_prefix: str = "/v1"


PROVIDERS: dict[ProviderType, Provider] = {
    p.type: p
    for p in (
        Provider(
            ProviderType.OPENAI, "https://api.openai.com/v1", AuthStyle.BEARER, frozenset({ApiFamily.OPENAI})
        ),
        Provider(ProviderType.AZURE, None, AuthStyle.AZURE, frozenset({ApiFamily.OPENAI})),
        Provider(
            ProviderType.ANTHROPIC,
            "https://api.anthropic.com",
            AuthStyle.ANTHROPIC,
            frozenset({ApiFamily.ANTHROPIC}),
        ),
        Provider(
            ProviderType.OLLAMA,
            "http://127.0.0.1:11434",
            AuthStyle.BEARER,
            frozenset({ApiFamily.OLLAMA, ApiFamily.OPENAI}),
        ),
        Provider(
            ProviderType.VLLM, "http://127.0.0.1:8000/v1", AuthStyle.BEARER, frozenset({ApiFamily.OPENAI})
        ),
        Provider(
            ProviderType.PERPLEXITY,
            "https://api.perplexity.ai",
            AuthStyle.BEARER,
            frozenset({ApiFamily.OPENAI}),
            default_openai_prefix="",
        ),
        Provider(
            ProviderType.ZAI,
            "https://open.bigmodel.cn/api/paas/v4",
            AuthStyle.BEARER,
            frozenset({ApiFamily.OPENAI}),
        ),
        Provider(ProviderType.OPENAI_COMPATIBLE, None, AuthStyle.BEARER, frozenset({ApiFamily.OPENAI})),
    )
}


def provider_of(config: InstanceConfig) -> Provider:
    return PROVIDERS[config.provider_type]


def base_url(config: InstanceConfig) -> str | None:
    return config.api_base or provider_of(config).default_base


def endpoints_for(config: InstanceConfig) -> list[Endpoint]:
    """The client endpoints this instance can answer, by API family and instance type."""
    return list(_endpoints(config.provider_type, config.serves_chat(), config.serves_embeddings()))


@functools.cache
def _endpoints(provider_type: ProviderType, chat: bool, embeddings: bool) -> tuple[Endpoint, ...]:
    families = PROVIDERS[provider_type].families
    return tuple(
        e for e in ENDPOINTS if e.family in families and (chat if e.kind is Kind.CHAT else embeddings)
    )


def auth_headers(config: InstanceConfig, secret: str | None) -> dict[str, str]:
    """Headers that carry the instance's credential, exactly as the provider expects them."""
    style = provider_of(config).auth
    headers: dict[str, str] = {}
    if style is AuthStyle.ANTHROPIC:
        headers["anthropic-version"] = ANTHROPIC_VERSION
    if not secret:
        return headers
    if style is AuthStyle.BEARER:
        headers["Authorization"] = f"Bearer {secret}"
    elif style is AuthStyle.AZURE:
        headers["api-key"] = secret
    elif style is AuthStyle.ANTHROPIC:
        headers["x-api-key"] = secret
    return headers


@dataclass(frozen=True)
class BaseParts:
    """What the renderer reads of an api_base URL."""

    scheme: str
    host: str  # "" when the URL has none
    port: int | None  # None: the scheme's default
    path: str  # without trailing "/"


@functools.lru_cache(maxsize=1 << 16)
def base_parts(base: str) -> BaseParts:
    """An api_base split once: every reconcile asks this of every instance, several times over."""
    parts = urlsplit(base)
    return BaseParts(parts.scheme, parts.hostname or "", parts.port, parts.path.rstrip("/"))


def base_host(config: InstanceConfig) -> str:
    """The host of the instance's base URL ("" when it has none)."""
    base = base_url(config)
    return base_parts(base).host if base else ""


def _base_path(config: InstanceConfig) -> str:
    return base_parts(base_url(config) or "").path


def openai_prefix(config: InstanceConfig) -> str:
    """The provider-side path that a client's ``/v1`` stands for (OpenAI family, not Azure)."""
    base_path = _base_path(config)
    if config.provider_type is ProviderType.OLLAMA:
        return base_path + "/v1"
    return base_path if base_path else provider_of(config).default_openai_prefix


def models_path(config: InstanceConfig) -> str:
    """The provider's model list, by the same path mapping as traffic: what an active probe asks."""
    base_path = _base_path(config)
    match config.provider_type:
        case ProviderType.OLLAMA:
            return base_path + "/api/tags"
        case ProviderType.ANTHROPIC:
            return base_path + "/v1/models"
        case ProviderType.AZURE:
            version = config.api_version or DEFAULT_AZURE_API_VERSION
            return f"{base_path}/openai/models?api-version={version}"
        case _:
            return openai_prefix(config) + "/models"


def upstream_path(config: InstanceConfig, endpoint: Endpoint, deployment: str | None = None) -> str:
    """The provider-side path (with query where needed) for a client endpoint.

    For Azure the deployment is a placeholder filled per request; pass it when known.
    """
    base_path = _base_path(config)
    if config.provider_type is ProviderType.AZURE:
        version = config.api_version or DEFAULT_AZURE_API_VERSION
        suffix = endpoint.path.removeprefix("/v1")
        return f"{base_path}/openai/deployments/{deployment or '{deployment}'}{suffix}?api-version={version}"
    if endpoint.family is ApiFamily.OPENAI:
        return openai_prefix(config) + endpoint.path.removeprefix("/v1")
    return base_path + endpoint.path


def is_direct(config: InstanceConfig, endpoints: list[Endpoint] | None = None) -> bool:
    """True when nginx can proxy straight to the instance: plain HTTP, no credential, paths unchanged.

    Anything else goes through a per-instance shim server that adds credentials, TLS or a path rewrite.
    ``endpoints``: endpoints_for(config), when the caller has it already.
    """
    base = base_url(config)
    if base is None or config.api_key or base_parts(base).scheme != "http":
        return False
    if config.provider_type is ProviderType.ANTHROPIC:
        return False  # it needs the anthropic-version header
    # The paths depend on these alone: a fleet of 10,000 instances has a handful of distinct answers.
    key = (config.provider_type, base, config.api_version, config.instance_type)
    unchanged = _PATHS_UNCHANGED.get(key)
    if unchanged is None:
        unchanged = all(upstream_path(config, e) == e.path for e in (endpoints or endpoints_for(config)))
        if len(_PATHS_UNCHANGED) < MAX_PATHS_UNCHANGED:
            _PATHS_UNCHANGED[key] = unchanged
    return unchanged


MAX_PATHS_UNCHANGED = 1 << 16
_PATHS_UNCHANGED: dict[tuple[ProviderType, str, str | None, str], bool] = {}
