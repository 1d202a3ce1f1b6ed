"""Scaling groups (operators configure them) and scaling events (the controller records them). Values only."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from control_plane.registry.models import (
    HealthPolicy,
    InstanceConfig,
    InstanceType,
    ModelName,
    Name,
    ProviderType,
)

PLACEHOLDERS = ("{port}", "{name}", "{index}")
# Instance names of a group's members: "<group>-<index>"; a group's name leaves room for the suffix.
MAX_GROUP_NAME = 56


class Threshold(BaseModel):
    """Scale out while the value is above `scale_out_above`; scale in only while below `scale_in_below`."""

    model_config = ConfigDict(extra="forbid")

    scale_out_above: float = Field(ge=0)
    scale_in_below: float = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Threshold:
        if self.scale_in_below >= self.scale_out_above:
            raise ValueError("scale_in_below must be lower than scale_out_above (a band, or the group flaps)")
        return self


class Triggers(BaseModel):
    """What is measured against thresholds; a trigger left out is not watched."""

    model_config = ConfigDict(extra="forbid")

    utilisation: Threshold | None = Field(
        default=None,
        description="Estimated in-flight requests / (members x max_concurrent_requests), or requests per"
        " minute / (members x max_rpm) when the template sets only max_rpm",
    )
    p95_latency_ms: Threshold | None = None
    error_rate: Threshold | None = Field(default=None, description="Failed upstream attempts / attempts, 0-1")
    queue_depth: Threshold | None = Field(
        default=None,
        description="Requests waiting per serving member, where the backend reports it: the mean of vLLM's"
        " vllm:num_requests_waiting over the members' /metrics (a member without it is left out)",
    )
    unhealthy_instances: Threshold | None = None

    def watched(self) -> dict[str, Threshold]:
        return {name: t for name in TRIGGERS if (t := getattr(self, name)) is not None}


TRIGGERS = ("utilisation", "p95_latency_ms", "error_rate", "queue_depth", "unhealthy_instances")


def check_argv(value: list[str]) -> list[str]:
    for item in value:
        if len(item) > 4096 or "\x00" in item:
            raise ValueError("each argument is at most 4096 characters, without NUL")
    return value


def check_env(value: dict[str, str]) -> dict[str, str]:
    for name, text in value.items():
        if not name or "=" in name or "\x00" in name + text or len(text) > 4096:
            raise ValueError("names without '=', values at most 4096 characters, no NUL")
    return value


class CommandLaunch(BaseModel):
    """The `command` driver's launch spec: argv and environment, with {port}, {name} and {index} replaced.
    Never run through a shell."""

    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(min_length=1, max_length=128)
    env: dict[str, str] = Field(default_factory=dict, max_length=128)
    cwd: str | None = Field(default=None, max_length=4096)

    @field_validator("argv")
    @classmethod
    def _argv(cls, value: list[str]) -> list[str]:
        return check_argv(value)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return check_env(value)


IMAGE_RE = r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$"


class DockerLaunch(BaseModel):
    """The `docker` driver's launch spec: a container of ``image`` with ``command`` (the image's own when
    left out) and ``env``, {port}, {name} and {index} replaced; 127.0.0.1:{port} on the host is published to
    ``container_port`` (the server listens on {port} inside too when left out)."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(pattern=IMAGE_RE, description="One of ISHGW_SCALING_IMAGES")
    command: list[str] | None = Field(default=None, min_length=1, max_length=128)
    env: dict[str, str] = Field(default_factory=dict, max_length=128)
    container_port: int | None = Field(default=None, ge=1, le=65535)
    gpus: int | Literal["all"] | None = Field(
        default=None, description="GPUs requested (device_requests): a count, or all; none: no GPU"
    )

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else check_argv(value)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return check_env(value)

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError("a count from 1 to 64, or all")
        return value


class InstanceTemplate(BaseModel):
    """What each member is registered as; its api_base is http://127.0.0.1:{port}{api_path}."""

    model_config = ConfigDict(extra="forbid")

    provider_type: ProviderType = ProviderType.OPENAI_COMPATIBLE
    api_path: str = Field(default="", max_length=128, pattern=r"^(/[A-Za-z0-9._~-]+)*$")

    @field_validator("api_path")
    @classmethod
    def _no_dot_segments(cls, value: str) -> str:
        if any(part in (".", "..") for part in value.split("/")):
            raise ValueError("api_path has no '.' or '..' segment")
        return value

    instance_type: InstanceType = InstanceType.CHAT
    weight: int = Field(default=1, ge=1, le=1000)
    priority: int = Field(default=1, ge=0, le=100)
    max_concurrent_requests: int = Field(default=0, ge=0, le=100_000)
    max_rpm: int = Field(default=0, ge=0, le=10**8)
    timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    health: HealthPolicy = Field(default_factory=HealthPolicy)


class ScalingGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    models: list[ModelName] = Field(min_length=1, max_length=64)
    template: InstanceTemplate = Field(default_factory=InstanceTemplate)
    driver: Literal["command", "docker"] = "command"
    command: CommandLaunch | None = Field(default=None, description="The launch spec of driver command")
    docker: DockerLaunch | None = Field(default=None, description="The launch spec of driver docker")
    min_instances: int = Field(default=1, ge=0, le=1000)
    max_instances: int = Field(default=4, ge=1, le=1000)
    cooldown_out_s: float = Field(default=120.0, ge=0, le=86_400)
    cooldown_in_s: float = Field(default=300.0, ge=0, le=86_400)
    evaluation_interval_s: float = Field(default=60.0, ge=0.2, le=3600)
    sustain_s: float = Field(default=60.0, ge=0, le=86_400, description="How long a trigger holds first")
    window_s: float = Field(default=60.0, ge=1, le=3600, description="The traffic window triggers measure")
    triggers: Triggers = Field(default_factory=Triggers)
    predictive: bool = Field(default=False, description="Scale out ahead of the utilisation threshold")
    predictive_window_s: float = Field(default=600.0, ge=10, le=86_400)
    ready_timeout_s: float = Field(default=120.0, ge=1, le=3600, description="Launch to first healthy probe")
    drain_timeout_s: float = Field(default=120.0, ge=0, le=86_400, description="Longest wait for in-flight")
    port_min: int = Field(default=20000, ge=1024, le=65535)
    port_max: int = Field(default=20999, ge=1024, le=65535)

    @field_validator("name")
    @classmethod
    def _short(cls, value: str) -> str:
        if len(value) > MAX_GROUP_NAME:
            raise ValueError(f"at most {MAX_GROUP_NAME} characters (members are named <group>-<index>)")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> ScalingGroup:
        if getattr(self, self.driver) is None:
            raise ValueError(f"driver {self.driver} needs its launch spec {self.driver!r}")
        other = "docker" if self.driver == "command" else "command"
        if getattr(self, other) is not None:
            raise ValueError(f"{other!r} is the launch spec of driver {other}, not of driver {self.driver}")
        if self.min_instances > self.max_instances:
            raise ValueError("min_instances must not exceed max_instances")
        if self.port_min > self.port_max:
            raise ValueError("port_min must not exceed port_max")
        if self.port_max - self.port_min + 1 < self.max_instances:
            raise ValueError("the port range must hold max_instances ports")
        return self

    def member_name(self, index: int) -> str:
        return f"{self.name}-{index}"

    def member_config(self, index: int, port: int) -> InstanceConfig:
        t = self.template
        return InstanceConfig(
            name=self.member_name(index),
            provider_type=t.provider_type,
            api_base=f"http://127.0.0.1:{port}{t.api_path}",
            supported_models=list(self.models),
            instance_type=t.instance_type,
            weight=t.weight,
            priority=t.priority,
            max_concurrent_requests=t.max_concurrent_requests,
            max_rpm=t.max_rpm,
            timeout_seconds=t.timeout_seconds,
            health=t.health,
            tags=[f"scaling_group={self.name}"],
        )


def substitute(text: str, port: int, name: str, index: int) -> str:
    """The launch spec's placeholders, replaced literally (no format mini-language, no attribute access)."""
    return text.replace("{port}", str(port)).replace("{name}", name).replace("{index}", str(index))
