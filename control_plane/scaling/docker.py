"""The `docker` driver: model servers as containers, through the `docker` Python SDK against the Docker
Engine API (Docker, or podman's Docker-API service) on its unix socket (API 1.41).

Each member is a container named ``ishgw-<gateway>-<member>`` labelled with the gateway, group, member,
index and port that own it; host port 127.0.0.1:{port} is published to the container's port. A controller
that restarts finds its members again by those labels (``refresh``) and adopts them. Stopping is the
engine's graceful stop (SIGTERM, SIGKILL after the grace time), then the container is removed. A container
that is not running any more is removed when it is found, as the command driver forgets an exited process.

The SDK blocks: every call runs in a thread (``asyncio.to_thread``), on one client per driver. The client is
made with a fixed API version, so making it does not reach the engine: a machine without Docker only
notices when a docker group needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.types import DeviceRequest

from control_plane.scaling.command import STOP_GRACE_S, LaunchError, Member
from control_plane.scaling.model import DockerLaunch, ScalingGroup, substitute

API_VERSION = "1.41"
LABEL = "io.ishgw."
TIMEOUT_S = 60  # each API call; a stop waits its grace time on top (the SDK adds it)
CONFLICT = 409

P = ParamSpec("P")
T = TypeVar("T")


def gateway_id(home: Path) -> str:
    """Which gateway owns a container: a short digest of its ISHGW_HOME."""
    return hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]


def socket_path(docker_host: str) -> str:
    if not docker_host.startswith("unix://") or len(docker_host) <= len("unix://"):
        raise ValueError("a unix socket: unix:///path")
    return docker_host[len("unix://") :]


def container_name(gateway: str, group: ScalingGroup, index: int) -> str:
    return f"ishgw-{gateway}-{group.member_name(index)}"


def container_spec(
    group: ScalingGroup, spec: DockerLaunch, gateway: str, index: int, port: int
) -> dict[str, Any]:
    """The keyword arguments of the SDK's ``containers.create`` for one member (its name apart). Pure."""
    name = group.member_name(index)
    inside = spec.container_port or port
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "command": None if spec.command is None else [substitute(a, port, name, index) for a in spec.command],
        "environment": [f"{k}={substitute(v, port, name, index)}" for k, v in sorted(spec.env.items())],
        "labels": {
            f"{LABEL}gateway": gateway,
            f"{LABEL}group": group.name,
            f"{LABEL}member": name,
            f"{LABEL}index": str(index),
            f"{LABEL}port": str(port),
        },
        "ports": {f"{inside}/tcp": ("127.0.0.1", port)},
        "restart_policy": {"Name": "no"},
    }
    if spec.gpus is not None:
        count = -1 if spec.gpus == "all" else spec.gpus
        kwargs["device_requests"] = [DeviceRequest(driver="", count=count, capabilities=[["gpu"]])]
    return kwargs


def member_of(container: dict[str, Any], gateway: str) -> Member | None:
    """A member from a container as the engine lists it (its attributes), or None when it is not ours."""
    labels = container.get("Labels") or {}
    if labels.get(f"{LABEL}gateway") != gateway:
        return None
    try:
        index, port = int(labels[f"{LABEL}index"]), int(labels[f"{LABEL}port"])
        group, name = str(labels[f"{LABEL}group"]), str(labels[f"{LABEL}member"])
    except (KeyError, ValueError):
        return None
    cid = str(container.get("Id", ""))
    return Member(group, index, name, port, 0, f"docker logs {cid[:12]}", cid, driver="docker")


def explain(exc: Exception) -> str:
    """What the engine said (its message), else the exception."""
    if isinstance(exc, APIError) and exc.explanation:
        return f"{exc.status_code} {exc.explanation}"
    return str(exc) or type(exc).__name__


class DockerError(Exception):
    pass


# What the SDK raises when the engine fails or cannot be reached (it does not wrap connection errors).
ENGINE_ERRORS = (DockerException, requests.RequestException, OSError)


class DockerDriver:
    def __init__(self, docker_host: str, home: Path, allowed: frozenset[str] = frozenset()) -> None:
        self.socket = socket_path(docker_host)
        self.gateway = gateway_id(home)
        self.allowed = allowed  # ISHGW_SCALING_IMAGES: the only images it starts
        self.client = docker.DockerClient(base_url=docker_host, version=API_VERSION, timeout=TIMEOUT_S)
        self._members: dict[str, dict[str, Member]] = {}  # group -> member name -> member (running)
        self.refreshed = False

    # --- the engine, in a thread ------------------------------------------------------------------------
    async def _call(self, what: str, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        except ENGINE_ERRORS as exc:
            raise DockerError(f"{what} (the Docker API at {self.socket}): {explain(exc)}") from None

    def _list(self) -> list[dict[str, Any]]:
        found = self.client.containers.list(
            all=True, filters={"label": [f"{LABEL}gateway={self.gateway}"]}, sparse=True
        )
        return [c.attrs for c in found]

    def _create(self, name: str, kwargs: dict[str, Any]) -> Container:
        try:
            return self.client.containers.create(name=name, **kwargs)
        except APIError as exc:
            if exc.status_code != CONFLICT:
                raise
        # A leftover of ours with that name (it is not running: refresh saw none): removed, then again.
        self._remove(name)
        return self.client.containers.create(name=name, **kwargs)

    def _start(self, container: Container) -> None:
        try:
            container.start()
        except ENGINE_ERRORS:
            self._remove(container.id or "")
            raise

    def _state(self, ref: str) -> dict[str, Any] | None:
        """The container's State, or None when there is no such container."""
        try:
            attrs = self.client.api.inspect_container(ref)
        except NotFound:
            return None
        state = attrs.get("State") if isinstance(attrs, dict) else None
        return state if isinstance(state, dict) else {}

    def _stop(self, ref: str, grace_s: int) -> None:
        with contextlib.suppress(APIError):  # gone already, or a stop refused: the forced removal kills it
            self.client.api.stop(ref, timeout=grace_s)
        self._remove(ref)

    def _remove(self, ref: str) -> None:
        with contextlib.suppress(NotFound):
            self.client.api.remove_container(ref, force=True)

    async def close(self) -> None:
        self.client.close()

    # --- the driver ---------------------------------------------------------------------------------------
    def refusal(self, group: ScalingGroup) -> str | None:
        assert group.docker is not None
        if group.docker.image not in self.allowed:
            allowed = ", ".join(sorted(self.allowed)) or "nothing (ISHGW_SCALING_IMAGES is empty)"
            return f"{group.docker.image!r} is not one of ISHGW_SCALING_IMAGES: {allowed}"
        return None

    async def refresh(self) -> None:
        """The running containers this gateway owns, by their labels; those that exited are removed."""
        listed = await self._call("listing containers", self._list)
        found: dict[str, dict[str, Member]] = {}
        for container in listed:
            member = member_of(container, self.gateway)
            if member is None:
                continue
            state = container.get("State")
            if state == "running":
                found.setdefault(member.group, {})[member.name] = member
            elif state in ("exited", "dead"):  # not "created": a launch may be between create and start
                await self._call(f"removing container {member.started[:12]}", self._remove, member.started)
        self._members = found
        self.refreshed = True

    def members(self, group: str) -> list[Member]:
        return sorted(self._members.get(group, {}).values(), key=lambda m: m.index)

    def groups(self) -> list[str]:
        return sorted(self._members)

    async def launch(self, group: ScalingGroup, index: int, port: int) -> Member:
        refused = self.refusal(group)
        if refused:
            raise LaunchError(refused)
        assert group.docker is not None
        kwargs = container_spec(group, group.docker, self.gateway, index, port)
        name = container_name(self.gateway, group, index)
        try:
            container = await asyncio.to_thread(self._create, name, kwargs)
        except ImageNotFound as exc:
            raise LaunchError(f"the image {group.docker.image!r} is missing: {explain(exc)}") from None
        except ENGINE_ERRORS as exc:
            raise LaunchError(f"creating the container: {explain(exc)}") from None
        cid = str(container.id)
        try:
            await asyncio.to_thread(self._start, container)
        except ENGINE_ERRORS as exc:
            raise LaunchError(f"starting the container: {explain(exc)}") from None
        log = f"docker logs {cid[:12]}"
        member = Member(group.name, index, group.member_name(index), port, 0, log, cid, driver="docker")
        self._members.setdefault(group.name, {})[member.name] = member
        return member

    async def gone(self, member: Member) -> str | None:
        """Why the member's container is not running, or None while it runs."""
        try:
            state = await self._call("inspecting the container", self._state, member.started)
        except DockerError as exc:
            return str(exc)
        if state is None:
            return "its container is gone"
        if not state.get("Running"):
            return f"its container exited (code {state.get('ExitCode')}; {member.log})"
        return None

    async def stop(self, member: Member, grace_s: float = STOP_GRACE_S) -> None:
        """The engine's graceful stop (SIGTERM, SIGKILL after ``grace_s``), then removal."""
        try:
            what = f"stopping container {member.started[:12]}"
            await self._call(what, self._stop, member.started, int(grace_s))
        finally:
            self._members.get(member.group, {}).pop(member.name, None)
            if not self._members.get(member.group):
                self._members.pop(member.group, None)
