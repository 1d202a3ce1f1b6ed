"""Registry value objects: instance configuration (operators own it) apart from state (the system owns it)."""

from __future__ import annotations

import hashlib
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from control_plane.registry import validators as v

Name = Annotated[str, AfterValidator(v.check_name)]
ModelName = Annotated[str, AfterValidator(v.check_model)]
Tag = Annotated[str, AfterValidator(v.check_tag)]
HeaderName = Annotated[str, AfterValidator(v.check_header_name)]


class ProviderType(StrEnum):
    OPENAI = "openai"
    AZURE = "azure"
    ANTHROPIC = "anthropic"
    OLLAMA = "ollama"
    VLLM = "vllm"
    PERPLEXITY = "perplexity"
    ZAI = "zai"
    OPENAI_COMPATIBLE = "openai_compatible"


# Provider types whose instances serve the models their probe lists unless discover_models says otherwise.
DISCOVERING_TYPES = frozenset({ProviderType.OLLAMA, ProviderType.VLLM, ProviderType.OPENAI_COMPATIBLE})


class InstanceType(StrEnum):
    CHAT = "chat"
    EMBEDDING = "embedding"
    BOTH = "both"


class Strategy(StrEnum):
    ROUND_ROBIN = "round_robin"
    WEIGHTED = "weighted"
    LEAST_CONNECTIONS = "least_connections"
    IP_HASH = "ip_hash"
    SESSION = "session"
    RANDOM_TWO = "random_two"
    # Learned (control_plane/routing/weights.py): measurements or prices become weights and tiers.
    LEAST_RESPONSE_TIME = "least_response_time"
    HEALTH_BASED = "health_based"
    PERFORMANCE_BASED = "performance_based"
    COST_OPTIMIZED = "cost_optimized"
    QUALITY_BASED = "quality_based"
    ADAPTIVE = "adaptive"


class OperatorStatus(StrEnum):
    """What an operator sets through the state endpoint."""

    ACTIVE = "active"
    DRAINING = "draining"
    MAINTENANCE = "maintenance"


class HealthStatus(StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class ProbeKind(StrEnum):
    """What an active probe asks an instance (health.probe_path, when set, comes first)."""

    MODEL_LIST = "model_list"  # its model list, by the same path mapping as traffic
    LIGHTRAG = "lightrag"  # LightRAG's GET /health: healthy when its JSON status says so


# The free-form tags that chose a probe before health.probe_kind: still accepted on input and import, and
# turned into the field (the tag itself is not kept).
LEGACY_PROBE_TAGS = {"probe=lightrag": ProbeKind.LIGHTRAG}


class HealthPolicy(BaseModel):
    """Per-instance health thresholds; the defaults suit most fleets."""

    model_config = ConfigDict(extra="forbid")

    probe_interval_s: float = Field(default=10.0, ge=0.5, le=3600)
    probe_timeout_s: float = Field(default=5.0, ge=0.2, le=120)
    rise: int = Field(default=2, ge=1, le=100, description="Successes before healthy")
    fall: int = Field(default=3, ge=1, le=100, description="Failures before unhealthy")
    breaker_consecutive_failures: int = Field(default=5, ge=1, le=1000)
    breaker_error_rate: float = Field(default=0.5, gt=0, le=1)
    breaker_window_s: float = Field(default=30.0, ge=1, le=3600)
    breaker_min_requests: int = Field(default=20, ge=1, le=100_000)
    breaker_cooldown_s: float = Field(default=15.0, ge=0.5, le=3600)
    breaker_half_open_successes: int = Field(default=3, ge=1, le=1000)
    latency_factor: float = Field(
        default=10.0, ge=1.5, le=1000, description="Open when p50 > factor x baseline"
    )
    latency_floor_ms: float = Field(
        default=1000.0, ge=0, le=600_000, description="Ignore degradation below this"
    )
    probe_path: str | None = Field(
        default=None,
        max_length=256,
        pattern=r"^/[A-Za-z0-9._~!$&'()*+,;=:@/?%-]*$",
        description="Path (and query) probed on the instance's origin instead of its model list; "
        "any 2xx answer is healthy",
    )
    probe_kind: ProbeKind = Field(
        default=ProbeKind.MODEL_LIST,
        description="model_list: the probe asks the instance's model list; lightrag: LightRAG's GET /health, "
        "healthy when its status says so (formerly the tag probe=lightrag, still accepted)",
    )


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class InstanceConfig(BaseModel):
    """What an operator configures. Every field that can reach nginx is validated here."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Name
    provider_type: ProviderType
    api_key: str | None = Field(
        default=None,
        description="Literal key, or a reference env:NAME (a name $ISHGW_HOME/provider.env defines, never"
        " ISHGW_*) / file:/path (a file inside ISHGW_SECRET_DIRS)",
    )
    api_base: str | None = Field(default=None, description="Provider default when empty")
    api_version: str | None = None
    priority: int = Field(default=1, ge=0, le=100, description="Lower is preferred")
    weight: int = Field(default=1, ge=1, le=1000)
    max_tpm: int = Field(default=0, ge=0, le=10**10, description="0: unlimited")
    max_rpm: int = Field(default=0, ge=0, le=10**8, description="0: unlimited")
    max_input_tokens: int = Field(default=0, ge=0, le=10**8)
    supported_models: list[ModelName] = Field(default_factory=list, max_length=512)
    model_deployments: dict[ModelName, str] = Field(default_factory=dict, max_length=512)
    enabled: bool = True
    timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    retry_count: int = Field(default=2, ge=0, le=10)
    instance_type: InstanceType = InstanceType.CHAT
    max_concurrent_requests: int = Field(default=0, ge=0, le=100_000, description="0: unlimited")
    cost_per_1k_tokens: float = Field(
        default=0.0, ge=0, le=10_000, description="USD per 1,000 tokens, prompt and completion alike"
    )
    input_cost_per_1k_tokens: float | None = Field(
        default=None, ge=0, le=10_000, description="USD per 1,000 prompt tokens; unset: cost_per_1k_tokens"
    )
    output_cost_per_1k_tokens: float | None = Field(
        default=None,
        ge=0,
        le=10_000,
        description="USD per 1,000 completion tokens; unset: cost_per_1k_tokens",
    )
    quality_score: float = Field(default=0.0, ge=0, le=100)
    tags: list[Tag] = Field(default_factory=list, max_length=32)
    health: HealthPolicy = Field(default_factory=HealthPolicy)
    discover_models: bool | None = Field(
        default=None,
        description="Also serve the models the probe finds (/api/tags, /v1/models); unset: true for "
        "ollama, vllm and openai_compatible, false otherwise",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_probe_tag(cls, data: Any) -> Any:
        """A legacy probe tag (LEGACY_PROBE_TAGS) becomes health.probe_kind; a probe_kind given too wins."""
        return with_legacy_probe_tags(data)

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: str | None) -> str | None:
        return None if value in (None, "") else v.check_secret(value)

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, value: str | None) -> str | None:
        return None if value in (None, "") else v.check_base_url(value)

    @field_validator("api_version")
    @classmethod
    def _api_version(cls, value: str | None) -> str | None:
        return None if value in (None, "") else v.check_api_version(value)

    @field_validator("model_deployments")
    @classmethod
    def _deployments(cls, value: dict[str, str]) -> dict[str, str]:
        for deployment in value.values():
            v.check_deployment(deployment)
        return value

    def models(self) -> list[str]:
        """Models this instance serves: supported_models plus any deployment-mapped model."""
        seen = dict.fromkeys([*self.supported_models, *self.model_deployments])
        return list(seen)

    def discovers(self) -> bool:
        """Whether the models its probe lists join its pools (discover_models, or the type's default)."""
        if self.discover_models is not None:
            return self.discover_models
        return self.provider_type in DISCOVERING_TYPES

    def serves_chat(self) -> bool:
        return self.instance_type in (InstanceType.CHAT, InstanceType.BOTH)

    def serves_embeddings(self) -> bool:
        return self.instance_type in (InstanceType.EMBEDDING, InstanceType.BOTH)


def with_legacy_probe_tags(data: Any) -> Any:
    """Raw configuration data with a legacy probe tag turned into health.probe_kind; anything else, or
    data that is no object, unchanged (validation reports what is wrong with it)."""
    if not isinstance(data, dict) or not isinstance(data.get("tags"), list):
        return data
    legacy = [LEGACY_PROBE_TAGS[t] for t in data["tags"] if isinstance(t, str) and t in LEGACY_PROBE_TAGS]
    if not legacy:
        return data
    health = data.get("health")
    if health is None:
        health = {"probe_kind": legacy[0]}
    elif isinstance(health, dict):
        health = {"probe_kind": legacy[0], **health}
    elif isinstance(health, HealthPolicy) and health.probe_kind is ProbeKind.MODEL_LIST:
        health = health.model_copy(update={"probe_kind": legacy[0]})
    tags = [t for t in data["tags"] if not (isinstance(t, str) and t in LEGACY_PROBE_TAGS)]
    return {**data, "tags": tags, "health": health}


# Fields that may appear in a partial update (everything but the name).
UPDATABLE_FIELDS = frozenset(InstanceConfig.model_fields) - {"name"}


class ObservedState(BaseModel):
    """What the controller observes of an instance: probes, the access-log stream, drained usage. Written
    by the health tracker only, stored as JSON beside the operator's status; nothing here is configuration
    or follows from other fields."""

    model_config = ConfigDict(extra="ignore")

    health_status: HealthStatus = HealthStatus.UNKNOWN
    error_count: int = 0
    last_error: str | None = None
    last_error_time: datetime | None = None
    rate_limited_until: datetime | None = None
    # Its own max_rpm / max_tpm reached (the controller's measure): out of its pools until then.
    rate_budget_until: datetime | None = None
    current_tpm: int = 0
    current_rpm: int = 0
    total_requests: int = 0
    successful_requests: int = 0
    last_used: datetime | None = None
    avg_latency_ms: float = 0.0
    discovered_models: list[str] = Field(default_factory=list)
    breaker_state: BreakerState = BreakerState.CLOSED
    breaker_open_until: datetime | None = None
    # Set when the instance rejected its credential (401/402/403); holds until the configuration changes
    # (quarantine_config no longer matches) or a probe succeeds.
    quarantined_reason: str | None = None
    quarantine_config: str | None = None
    unhealthy_since: datetime | None = None
    last_probe_at: datetime | None = None
    probe_latency_ms: float | None = None


OBSERVED_FIELDS = frozenset(ObservedState.model_fields)


class InstanceState(ObservedState):
    """An instance's state as it is read: the operator's status (stored apart from what is observed), the
    observed fields, and what follows from them and the configuration (set by ``read_state``, never
    stored). Never written by configuration changes."""

    status: OperatorStatus = OperatorStatus.ACTIVE
    connection_status: str = "unknown"
    utilization_percentage: float = 0.0
    updated_at: datetime | None = None  # the last write of the state's row


def connection_status(health: HealthStatus) -> str:
    if health is HealthStatus.HEALTHY:
        return "connected"
    return "disconnected" if health is HealthStatus.UNHEALTHY else "unknown"


def read_state(
    observed: ObservedState, status: OperatorStatus, updated_at: datetime | None, max_rpm: int
) -> InstanceState:
    """The state as the API and the renderer see it: the stored parts and what derives from them."""
    return InstanceState.model_construct(
        **dict(observed),
        status=status,
        connection_status=connection_status(observed.health_status),
        utilization_percentage=round(100 * observed.current_rpm / max_rpm, 1) if max_rpm else 0.0,
        updated_at=updated_at,
    )


class StateUpdate(BaseModel):
    """What an operator may set on state (PUT /admin/instances/{name}/state)."""

    model_config = ConfigDict(extra="forbid")

    status: OperatorStatus


class RewardWeights(BaseModel):
    """adaptive: how much success, speed and low price count in an instance's reward."""

    model_config = ConfigDict(extra="forbid")

    success: float = Field(default=1.0, ge=0, le=100)
    latency: float = Field(default=1.0, ge=0, le=100)
    cost: float = Field(default=0.0, ge=0, le=100)


class RoutingConfig(BaseModel):
    """Gateway-wide routing: aliases, per-model strategy, session header."""

    model_config = ConfigDict(extra="forbid")

    model_aliases: dict[ModelName, ModelName] = Field(default_factory=dict, max_length=1024)
    default_strategy: Strategy = Strategy.WEIGHTED
    strategies: dict[ModelName, Strategy] = Field(default_factory=dict, max_length=1024)
    session_header: HeaderName = "X-Session-ID"
    # model -> models to try, in order, when it has no available instance (same API family and kind).
    fallbacks: dict[ModelName, list[ModelName]] = Field(default_factory=dict, max_length=1024)
    # Learned strategies (least_response_time, health_based, performance_based, adaptive): how often weights
    # are recomputed, and how far a share of traffic must move before new weights are applied (a reload).
    weights_interval_s: float = Field(default=10.0, ge=0.5, le=3600)
    weights_min_change: float = Field(default=0.2, ge=0, le=10)
    weights_window_s: float = Field(
        default=60.0, ge=1, le=3600, description="Measurements older than this do not count"
    )
    explore_share: float = Field(
        default=0.05, ge=0.0, le=0.5, description="adaptive: the least share of traffic spent exploring"
    )
    reward: RewardWeights = Field(default_factory=lambda: RewardWeights())


def config_fingerprint(config: InstanceConfig) -> str:
    """Changes whenever the operator changes anything in the instance's configuration. A field added since
    fingerprints were first stored counts only when it differs from its default: an upgrade leaves the
    fingerprint of an unchanged configuration (and so a quarantine that holds until it changes) as it was."""
    added = {"health": {"probe_kind"}} if config.health.probe_kind is ProbeKind.MODEL_LIST else None
    return hashlib.sha256(config.model_dump_json(exclude=added).encode()).hexdigest()[:16]


def mask_secret(value: str | None) -> str | None:
    """Secrets never leave in clear: references stay readable, literals keep their last 4 characters."""
    if value is None:
        return None
    if v.SECRET_REF_RE.fullmatch(value):
        return value
    return "****" + value[-4:] if len(value) >= 12 else "****"


def is_masked(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("****")
