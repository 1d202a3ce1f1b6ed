"""The drivers a scaling group can name, behind one face: each group's members are started and stopped by
its own driver (``group.driver``), each member by the driver that started it (``member.driver``)."""

from __future__ import annotations

from control_plane.scaling.command import CommandDriver, LaunchError, Member
from control_plane.scaling.docker import DockerDriver, DockerError
from control_plane.scaling.model import ScalingGroup


class Drivers:
    def __init__(self, command: CommandDriver, docker: DockerDriver | None = None) -> None:
        self.command = command
        self.docker = docker

    def refusal(self, group: ScalingGroup) -> str | None:
        if group.driver == "docker":
            if self.docker is None:
                return "the docker driver is off: ISHGW_DOCKER_HOST is not a unix socket"
            return self.docker.refusal(group)
        return self.command.refusal(group)

    def field(self, group: ScalingGroup) -> str:
        """The field a refusal is about."""
        return "docker.image" if group.driver == "docker" else "command.argv.0"

    async def refresh(self) -> None:
        """What the engine runs now (the command driver reads its state files on each call)."""
        if self.docker is not None:
            await self.docker.refresh()

    def members(self, group: str) -> list[Member]:
        found = self.command.members(group)
        if self.docker is not None:
            found += self.docker.members(group)
        return found

    def groups(self) -> list[str]:
        names = set(self.command.groups())
        if self.docker is not None:
            names.update(self.docker.groups())
        return sorted(names)

    def pick_port(self, group: ScalingGroup, taken: set[int]) -> int:
        return self.command.pick_port(group, taken)

    async def launch(self, group: ScalingGroup, index: int, port: int) -> Member:
        if group.driver == "docker":
            if self.docker is None:
                raise LaunchError("the docker driver is off: ISHGW_DOCKER_HOST is not a unix socket")
            return await self.docker.launch(group, index, port)
        return await self.command.launch(group, index, port)

    async def gone(self, member: Member) -> str | None:
        if member.driver == "docker":
            return "the docker driver is off" if self.docker is None else await self.docker.gone(member)
        return await self.command.gone(member)

    async def stop(self, member: Member) -> None:
        if member.driver == "docker":
            if self.docker is not None:
                try:
                    await self.docker.stop(member)
                except DockerError as exc:
                    raise LaunchError(str(exc)) from None
            return
        await self.command.stop(member)

    async def close(self) -> None:
        if self.docker is not None:
            await self.docker.close()
