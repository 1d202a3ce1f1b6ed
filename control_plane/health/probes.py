"""What an active probe asks each provider type and how its answer is read. Pure."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import urlsplit

from control_plane import providers
from control_plane.providers import DEFAULT_AZURE_API_VERSION
from control_plane.registry.models import InstanceConfig, ProviderType

LIGHTRAG_TAG = "probe=lightrag"


class Outcome(StrEnum):
    OK = "ok"
    FAIL = "fail"
    CREDENTIAL = "credential_rejected"
    RATE_LIMITED = "rate_limited"


@dataclass(frozen=True)
class ProbeRequest:
    url: str
    headers: dict[str, str]
    models_from: str  # "ollama" | "data" | "none"
    lenient: bool = False  # reachable is enough (no list endpoint)


@dataclass(frozen=True)
class ProbeResult:
    outcome: Outcome
    detail: str
    latency_ms: float
    models: tuple[str, ...] = field(default_factory=tuple)
    retry_after_s: float | None = None


def probe_request(config: InstanceConfig, secret: str | None) -> ProbeRequest | None:
    base = providers.base_url(config)
    if base is None:
        return None
    headers = providers.auth_headers(config, secret)
    parts = urlsplit(base)
    root = f"{parts.scheme}://{parts.netloc}"
    if LIGHTRAG_TAG in config.tags:
        return ProbeRequest(f"{root}/health", headers, "none")
    match config.provider_type:
        case ProviderType.OLLAMA:
            return ProbeRequest(f"{base}/api/tags", headers, "ollama")
        case ProviderType.ANTHROPIC:
            return ProbeRequest(f"{base}/v1/models", headers, "data")
        case ProviderType.AZURE:
            version = config.api_version or DEFAULT_AZURE_API_VERSION
            return ProbeRequest(f"{base}/openai/models?api-version={version}", headers, "data")
        case ProviderType.PERPLEXITY:
            return ProbeRequest(f"{base}/models", headers, "none", lenient=True)
        case ProviderType.VLLM if not parts.path:
            return ProbeRequest(f"{base}/v1/models", headers, "data")
        case _:
            return ProbeRequest(f"{base}/models", headers, "data")


def _models(body: bytes, kind: str) -> tuple[str, ...]:
    try:
        data = json.loads(body)
    except ValueError:
        return ()
    if not isinstance(data, dict):
        return ()
    if kind == "ollama":
        items, key = data.get("models"), "name"
    elif kind == "data":
        items, key = data.get("data"), "id"
    else:
        return ()
    if not isinstance(items, list):
        return ()
    return tuple(sorted({str(i[key]) for i in items if isinstance(i, dict) and isinstance(i.get(key), str)}))


def _lightrag_ok(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and str(data.get("status", "")).lower() in ("healthy", "ok", "up")


def evaluate(
    request: ProbeRequest, status: int, body: bytes, latency_ms: float, retry_after_s: float | None = None
) -> ProbeResult:
    """Read one probe answer."""
    if status in (401, 402, 403):
        return ProbeResult(Outcome.CREDENTIAL, f"HTTP {status}: credential rejected", latency_ms)
    if status == 429:
        return ProbeResult(Outcome.RATE_LIMITED, "HTTP 429", latency_ms, retry_after_s=retry_after_s)
    if status == 200:
        if request.models_from == "none" and request.url.endswith("/health") and not _lightrag_ok(body):
            return ProbeResult(Outcome.FAIL, "health endpoint did not report a healthy status", latency_ms)
        return ProbeResult(Outcome.OK, "HTTP 200", latency_ms, _models(body, request.models_from))
    if request.lenient and status < 500:
        return ProbeResult(Outcome.OK, f"HTTP {status} (reachable)", latency_ms)
    return ProbeResult(Outcome.FAIL, f"HTTP {status}", latency_ms)
