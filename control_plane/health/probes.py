"""What an active probe asks each provider type and how its answer is read. Pure."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import urlsplit

from control_plane import providers
from control_plane.health.statuses import UNSUPPORTED_STATUSES, Verdict, classify
from control_plane.registry.models import InstanceConfig, ProbeKind, ProviderType


class Outcome(StrEnum):
    OK = "ok"
    FAIL = "fail"
    CREDENTIAL = "credential_rejected"
    RATE_LIMITED = "rate_limited"
    # The instance answered, but not on the probe's path: says nothing about its health.
    UNSUPPORTED = "probe_path_unsupported"


@dataclass(frozen=True)
class ProbeRequest:
    url: str
    headers: dict[str, str]
    models_from: str  # "ollama" | "data" | "none"
    lenient: bool = False  # reachable is enough (no list endpoint)
    reachable: bool = False  # an operator's probe_path: any 2xx is healthy
    lightrag: bool = False  # LightRAG's /health (health.probe_kind): its JSON status must say healthy


@dataclass(frozen=True)
class ProbeResult:
    outcome: Outcome
    detail: str
    latency_ms: float
    models: tuple[str, ...] = field(default_factory=tuple)
    retry_after_s: float | None = None
    http_status: int | None = None  # None: no HTTP answer (connection refused, timeout, TLS)
    listed: bool = False  # the answer was a model list: `models` is the whole of it (may be empty)


def probe_request(config: InstanceConfig, secret: str | None) -> ProbeRequest | None:
    """What to ask: the model list by the same path mapping as traffic (providers.models_path), or the
    operator's ``health.probe_path`` on the instance's origin."""
    base = providers.base_url(config)
    if base is None:
        return None
    headers = providers.auth_headers(config, secret)
    parts = urlsplit(base)
    root = f"{parts.scheme}://{parts.netloc}"
    if config.health.probe_path:
        return ProbeRequest(root + config.health.probe_path, headers, "none", lenient=False, reachable=True)
    if config.health.probe_kind is ProbeKind.LIGHTRAG:
        return ProbeRequest(f"{root}/health", headers, "none", lightrag=True)
    path = providers.models_path(config)
    match config.provider_type:
        case ProviderType.OLLAMA:
            return ProbeRequest(root + path, headers, "ollama")
        case ProviderType.PERPLEXITY:
            return ProbeRequest(root + path, headers, "none", lenient=True)
        case _:
            return ProbeRequest(root + path, headers, "data")


def _models(body: bytes, kind: str) -> tuple[str, ...] | None:
    """The model names of a list answer; None when the body is no such list."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if kind == "ollama":
        items, key = data.get("models"), "name"
    elif kind == "data":
        items, key = data.get("data"), "id"
    else:
        return None
    if not isinstance(items, list):
        return None
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
    result = _outcome(request, status, body, latency_ms, retry_after_s)
    return dataclasses.replace(result, http_status=status)


def _outcome(
    request: ProbeRequest, status: int, body: bytes, latency_ms: float, retry_after_s: float | None
) -> ProbeResult:
    verdict = classify(status)
    if verdict is Verdict.CREDENTIAL:
        return ProbeResult(Outcome.CREDENTIAL, f"HTTP {status}: credential rejected", latency_ms)
    if verdict is Verdict.RATE_LIMITED:
        return ProbeResult(Outcome.RATE_LIMITED, "HTTP 429", latency_ms, retry_after_s=retry_after_s)
    if request.reachable and 200 <= status < 300:
        return ProbeResult(Outcome.OK, f"HTTP {status}", latency_ms)
    if status == 200:
        if request.lightrag and not _lightrag_ok(body):
            return ProbeResult(Outcome.FAIL, "health endpoint did not report a healthy status", latency_ms)
        models = _models(body, request.models_from)
        return ProbeResult(Outcome.OK, "HTTP 200", latency_ms, models or (), listed=models is not None)
    if request.lenient and status < 500:
        return ProbeResult(Outcome.OK, f"HTTP {status} (reachable)", latency_ms)
    if status in UNSUPPORTED_STATUSES:
        return ProbeResult(
            Outcome.UNSUPPORTED,
            f"HTTP {status} from {urlsplit(request.url).path}: the probe path is not served here "
            "(set health.probe_path); traffic decides this instance's health",
            latency_ms,
        )
    return ProbeResult(Outcome.FAIL, f"HTTP {status}", latency_ms)
