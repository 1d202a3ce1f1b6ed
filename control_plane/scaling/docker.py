"""The `docker` driver: model servers as containers, through the Docker Engine API (Docker, or podman's
Docker-API service) over its unix socket with plain HTTP (API 1.41).

Each member is a container named ``ishgw-<gateway>-<member>`` labelled with the gateway, group, member,
index and port that own it; host port 127.0.0.1:{port} is published to the container's port. A controller
that restarts finds its members again by those labels (``refresh``) and adopts them. Stopping is the
engine's graceful stop (SIGTERM, SIGKILL after the grace time), then the container is removed. A container
that is not running any more is removed when it is found, as the command driver forgets an exited process.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from control_plane.scaling.command import STOP_GRACE_S, LaunchError, Member
from control_plane.scaling.model import DockerLaunch, ScalingGroup, substitute

API = "/v1.41"
LABEL = "io.ishgw."
TIMEOUT = aiohttp.ClientTimeout(total=60.0)


def gateway_id(home: Path) -> str:
    """Which gateway owns a container: a short digest of its ISHGW_HOME."""
    return hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]


def socket_path(docker_host: str) -> str:
    if not docker_host.startswith("unix://") or len(docker_host) <= len("unix://"):
        raise ValueError("a unix socket: unix:///path")
    return docker_host[len("unix://") :]


def container_spec(
    group: ScalingGroup, spec: DockerLaunch, gateway: str, index: int, port: int
) -> dict[str, Any]:
    """The Docker API's create body for one member. Pure."""
    name = group.member_name(index)
    inside = spec.container_port or port
    body: dict[str, Any] = {
        "Image": spec.image,
        "Env": [f"{k}={substitute(v, port, name, index)}" for k, v in sorted(spec.env.items())],
        "Labels": {
            f"{LABEL}gateway": gateway,
            f"{LABEL}group": group.name,
            f"{LABEL}member": name,
            f"{LABEL}index": str(index),
            f"{LABEL}port": str(port),
        },
        "ExposedPorts": {f"{inside}/tcp": {}},
        "HostConfig": {
            "PortBindings": {f"{inside}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]},
            "RestartPolicy": {"Name": "no"},
        },
    }
    if spec.command is not None:
        body["Cmd"] = [substitute(arg, port, name, index) for arg in spec.command]
    if spec.gpus is not None:
        count = -1 if spec.gpus == "all" else spec.gpus
        body["HostConfig"]["DeviceRequests"] = [{"Driver": "", "Count": count, "Capabilities": [["gpu"]]}]
    return body


def member_of(container: dict[str, Any], gateway: str) -> Member | None:
    """A member from a container listed by GET /containers/json, or None when it is not one of ours."""
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


class DockerError(Exception):
    pass


class DockerDriver:
    def __init__(self, docker_host: str, home: Path, allowed: frozenset[str] = frozenset()) -> None:
        self.socket = socket_path(docker_host)
        self.gateway = gateway_id(home)
        self.allowed = allowed  # ISHGW_SCALING_IMAGES: the only images it starts
        self._session: aiohttp.ClientSession | None = None
        self._members: dict[str, dict[str, Member]] = {}  # group -> member name -> member (running)
        self.refreshed = False

    # --- the API ----------------------------------------------------------------------------------------
    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket), timeout=TIMEOUT
            )
        return self._session

    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        try:
            async with self._client().request(method, f"http://docker{API}{path}", json=body) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DockerError(f"the Docker API at {self.socket}: {exc}") from None
        try:
            data = json.loads(text) if text else None
        except ValueError:
            data = text
        return response.status, data

    @staticmethod
    def _message(data: Any) -> str:
        return str(data.get("message", data)) if isinstance(data, dict) else str(data)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # --- the driver ---------------------------------------------------------------------------------------
    def refusal(self, group: ScalingGroup) -> str | None:
        assert group.docker is not None
        if group.docker.image not in self.allowed:
            allowed = ", ".join(sorted(self.allowed)) or "nothing (ISHGW_SCALING_IMAGES is empty)"
            return f"{group.docker.image!r} is not one of ISHGW_SCALING_IMAGES: {allowed}"
        return None

    async def refresh(self) -> None:
        """The running containers this gateway owns, by their labels; those that exited are removed."""
        filters = quote(json.dumps({"label": [f"{LABEL}gateway={self.gateway}"]}))
        status, data = await self._call("GET", f"/containers/json?all=true&filters={filters}")
        if status != 200 or not isinstance(data, list):
            raise DockerError(f"listing containers: {status} {self._message(data)}")
        found: dict[str, dict[str, Member]] = {}
        for container in data:
            member = member_of(container, self.gateway)
            if member is None:
                continue
            state = container.get("State")
            if state == "running":
                found.setdefault(member.group, {})[member.name] = member
            elif state in ("exited", "dead"):  # not "created": a launch may be between create and start
                await self._remove(member.started)
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
        body = container_spec(group, group.docker, self.gateway, index, port)
        name = f"ishgw-{self.gateway}-{group.member_name(index)}"
        try:
            status, data = await self._call("POST", f"/containers/create?name={quote(name)}", body)
            if status == 409:  # a leftover of ours with that name (it is not running: refresh saw none)
                await self._remove(name)
                status, data = await self._call("POST", f"/containers/create?name={quote(name)}", body)
            if status != 201:
                raise LaunchError(f"creating the container: {status} {self._message(data)}")
            cid = str(data["Id"])
            status, data = await self._call("POST", f"/containers/{cid}/start")
            if status not in (204, 304):
                await self._remove(cid)
                raise LaunchError(f"starting the container: {status} {self._message(data)}")
        except DockerError as exc:
            raise LaunchError(str(exc)) from None
        log = f"docker logs {cid[:12]}"
        member = Member(group.name, index, group.member_name(index), port, 0, log, cid, driver="docker")
        self._members.setdefault(group.name, {})[member.name] = member
        return member

    async def gone(self, member: Member) -> str | None:
        """Why the member's container is not running, or None while it runs."""
        try:
            status, data = await self._call("GET", f"/containers/{member.started}/json")
        except DockerError as exc:
            return str(exc)
        if status == 404:
            return "its container is gone"
        state = data.get("State", {}) if isinstance(data, dict) else {}
        if status != 200 or not state.get("Running"):
            return f"its container exited (code {state.get('ExitCode')}; {member.log})"
        return None

    async def stop(self, member: Member, grace_s: float = STOP_GRACE_S) -> None:
        """The engine's graceful stop (SIGTERM, SIGKILL after ``grace_s``), then removal."""
        try:
            await self._call("POST", f"/containers/{member.started}/stop?t={int(grace_s)}")
            await self._remove(member.started)
        finally:
            self._members.get(member.group, {}).pop(member.name, None)
            if not self._members.get(member.group):
                self._members.pop(member.group, None)

    async def _remove(self, ref: str) -> None:
        status, data = await self._call("DELETE", f"/containers/{quote(ref)}?force=true")
        if status not in (204, 404):
            raise DockerError(f"removing container {ref[:12]}: {status} {self._message(data)}")

