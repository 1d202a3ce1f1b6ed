"""The `command` driver: model servers as local processes, one per member.

Each member's pid, port, log file and process start time live in ``<home>/scaling/<group>/<member>.json``
(0600): a controller that restarts adopts the processes still running (the start time proves the pid was
not reused) instead of starting them again. Processes run in their own session, never through a shell,
with a small environment (PATH, HOME, LANG and the launch spec's own): no ISHGW_* secret leaks to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from control_plane.scaling.model import ScalingGroup, substitute

PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
STOP_GRACE_S = 10.0


class LaunchError(Exception):
    """A member could not be started (its command, its port); the message says why."""


@dataclass(frozen=True)
class Member:
    group: str
    index: int
    name: str
    port: int
    pid: int
    log: str
    started: str  # /proc/<pid>/stat's start time: the same pid later is the same process (docker: its id)
    driver: str = "command"


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state first), or None: no such process."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def exited(pid: int) -> bool:
    """No such process, or a zombie (exited, not yet reaped by its parent)."""
    fields = _stat(pid)
    return fields is None or fields[0] == "Z"


def alive(member: Member) -> bool:
    return _start_time(member.pid) == member.started and not exited(member.pid)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class CommandDriver:
    def __init__(self, state_dir: Path, allowed: frozenset[str] = frozenset()) -> None:
        self.state_dir = state_dir
        self.allowed = allowed  # ISHGW_SCALING_COMMANDS: the only programs it starts
        self._children: dict[int, asyncio.subprocess.Process] = {}  # started here: reaped here

    def _dir(self, group: str) -> Path:
        path = self.state_dir / group
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def _file(self, member: Member) -> Path:
        return self._dir(member.group) / f"{member.name}.json"

    def refusal(self, group: ScalingGroup) -> str | None:
        """Why this driver will not start the group's command, or None."""
        if group.command is None:
            return "the group has no command launch spec"
        program = group.command.argv[0]
        if program not in self.allowed:
            allowed = ", ".join(sorted(self.allowed)) or "nothing (ISHGW_SCALING_COMMANDS is empty)"
            return f"{program!r} is not one of ISHGW_SCALING_COMMANDS: {allowed}"
        return None

    def pick_port(self, group: ScalingGroup, taken: set[int]) -> int:
        for port in range(group.port_min, group.port_max + 1):
            if port not in taken and port_free(port):
                return port
        raise LaunchError(f"no free port in {group.port_min}-{group.port_max}")

    async def launch(self, group: ScalingGroup, index: int, port: int) -> Member:
        refused = self.refusal(group)
        if refused:
            raise LaunchError(refused)
        name = group.member_name(index)
        spec = group.command
        assert spec is not None  # refusal() said so
        argv = [substitute(arg, port, name, index) for arg in spec.argv]
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.update({k: substitute(val, port, name, index) for k, val in spec.env.items()})
        log_path = self._dir(group.name) / f"{name}.log"
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                env=env,
                cwd=substitute(spec.cwd, port, name, index) if spec.cwd else None,
                start_new_session=True,  # outlives a controller that dies: adopted when it comes back
            )
        except OSError as exc:
            raise LaunchError(f"{argv[0]}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        started = _start_time(process.pid)
        if started is None:
            await process.wait()
            raise LaunchError(f"{argv[0]} exited at once with code {process.returncode} (log {log_path})")
        self._children[process.pid] = process
        member = Member(group.name, index, name, port, process.pid, str(log_path), started)
        path = self._file(member)
        temp = path.with_suffix(".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(member), handle)
        os.replace(temp, path)
        return member

    async def gone(self, member: Member) -> str | None:
        """Why the member's process is not running, or None while it runs."""
        code = self.exit_code(member)
        if code is None and alive(member):
            return None
        return f"exited (code {code}); log {member.log}"

    def exit_code(self, member: Member) -> int | None:
        """The code of a member started here that has exited; None while it runs (or when adopted)."""
        process = self._children.get(member.pid)
        return process.returncode if process is not None else None

    def members(self, group: str) -> list[Member]:
        """The group's members whose process runs; files of those that do not are removed."""
        found = []
        directory = self.state_dir / group
        if not directory.is_dir():
            return []
        for path in sorted(directory.glob("*.json")):
            try:
                member = Member(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                path.unlink(missing_ok=True)
                continue
            if alive(member):
                found.append(member)
            else:
                path.unlink(missing_ok=True)
        return found

    def groups(self) -> list[str]:
        if not self.state_dir.is_dir():
            return []
        return sorted(p.name for p in self.state_dir.iterdir() if p.is_dir())

    async def stop(self, member: Member, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; its state file goes."""
        try:
            if alive(member):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(member.pid, signal.SIGTERM)
                deadline = time.monotonic() + grace_s
                while alive(member) and time.monotonic() < deadline:
                    await self._reap_or_wait(member, deadline - time.monotonic())
                if alive(member):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(member.pid, signal.SIGKILL)
                    await self._reap_or_wait(member, 5.0)
        finally:
            process = self._children.pop(member.pid, None)
            if process is not None and process.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), 5.0)
            self._file(member).unlink(missing_ok=True)

    async def _reap_or_wait(self, member: Member, timeout: float) -> None:
        process = self._children.get(member.pid)
        if process is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), max(0.0, min(timeout, 0.2)))
        else:
            await asyncio.sleep(0.05)
