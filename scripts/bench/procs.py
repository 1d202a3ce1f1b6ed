"""Processes the benchmark starts, and what processes cost: CPU ticks and RSS sampled from /proc.

Every process the driver starts is recorded (pid and start time) in a pid file, so the shell wrapper's
EXIT trap can stop whatever is left even if the driver itself is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    comm: str
    ppid: int
    ticks: int  # utime + stime
    rss: int  # bytes
    start: int  # start time in clock ticks since boot


def read_stat(pid: int) -> ProcStat | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    close = data.rindex(b")")
    fields = data[close + 2 :].split()
    # fields[0] is field 3 (state) of proc(5): ppid=4, utime=14, stime=15, starttime=22, rss=24
    return ProcStat(
        pid=pid,
        comm=data[data.index(b"(") + 1 : close].decode(errors="replace"),
        ppid=int(fields[1]),
        ticks=int(fields[11]) + int(fields[12]),
        rss=int(fields[21]) * PAGE_SIZE,
        start=int(fields[19]),
    )


def all_stats() -> dict[int, ProcStat]:
    stats: dict[int, ProcStat] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None:
                stats[stat.pid] = stat
    return stats


def tree(roots: list[int], stats: dict[int, ProcStat]) -> list[int]:
    """The roots that exist and all their descendants."""
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    out: list[int] = []
    todo = [r for r in roots if r in stats]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def children_named(parent: int, comm: str) -> list[int]:
    return [s.pid for s in all_stats().values() if s.ppid == parent and s.comm == comm]


def vm_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM and friends from /proc/<pid>/status, in bytes."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.startswith("Vm") and value.strip().endswith("kB"):
                out[key] = int(value.split()[0]) * 1024
    return out


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(p) for p in parts[:8]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


@dataclass
class Group:
    """A named set of processes: the roots a callable returns, and their descendants."""

    name: str
    roots: Callable[[], list[int]]
    recursive: bool = True  # the roots' descendants count too


@dataclass
class GroupUsage:
    cpu_cores: float = 0.0
    peak_rss_mb: float = 0.0
    processes: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return {
            "cpu_cores": round(self.cpu_cores, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "processes": self.processes,
        }


@dataclass
class _Window:
    started: float
    machine_start: tuple[int, int]
    first: dict[str, dict[int, int]] = field(default_factory=dict)  # group -> pid -> ticks at first sight
    last: dict[str, dict[int, int]] = field(default_factory=dict)  # group -> pid -> latest ticks
    peak_rss: dict[str, int] = field(default_factory=dict)
    peak_procs: dict[str, int] = field(default_factory=dict)
    result: dict[str, GroupUsage] = field(default_factory=dict)
    machine_busy: float = 0.0  # fraction of all CPUs busy during the window
    others_cores: float = 0.0  # CPU used by processes in no group (other work on the machine)
    seconds: float = 0.0


class Sampler:
    """Samples the groups every `interval` seconds in a thread while a window is open."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.groups: dict[str, Group] = {}
        self._window: _Window | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="proc-sampler", daemon=True)
        self._thread.start()

    def add(self, group: Group) -> None:
        with self._lock:
            self.groups[group.name] = group

    def remove(self, name: str) -> None:
        with self._lock:
            self.groups.pop(name, None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def _sample(self, window: _Window, first: bool = False) -> None:
        stats = all_stats()
        with self._lock:
            groups = list(self.groups.values())
        for group in groups:
            try:
                roots = group.roots()
                pids = tree(roots, stats) if group.recursive else [r for r in roots if r in stats]
            except Exception:  # a group whose roots are not readable right now
                pids = []
            last = window.last.setdefault(group.name, {})
            base = window.first.setdefault(group.name, {})
            rss = 0
            for pid in pids:
                stat = stats[pid]
                rss += stat.rss
                last[pid] = stat.ticks
                if pid not in base:
                    # a process present at the start counts from there; one born later counts from 0
                    base[pid] = stat.ticks if first else 0
            window.peak_rss[group.name] = max(window.peak_rss.get(group.name, 0), rss)
            window.peak_procs[group.name] = max(window.peak_procs.get(group.name, 0), len(pids))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                window = self._window
            if window is not None:
                with contextlib.suppress(Exception):
                    self._sample(window)

    @contextlib.contextmanager
    def window(self) -> Iterator[_Window]:
        """Measure CPU (cores used on average) and peak RSS of every group while the block runs."""
        window = _Window(started=time.monotonic(), machine_start=machine_ticks())
        self._sample(window, first=True)
        with self._lock:
            self._window = window
        try:
            yield window
        finally:
            with self._lock:
                self._window = None
            self._sample(window)
            window.seconds = max(1e-6, time.monotonic() - window.started)
            busy0, total0 = window.machine_start
            busy1, total1 = machine_ticks()
            window.machine_busy = (busy1 - busy0) / max(1, total1 - total0)
            counted: dict[int, float] = {}
            for name in window.last:
                ticks = 0
                for pid, t in window.last[name].items():
                    used = t - window.first[name].get(pid, 0)
                    ticks += used
                    counted[pid] = used / CLK_TCK / window.seconds
                window.result[name] = GroupUsage(
                    cpu_cores=ticks / CLK_TCK / window.seconds,
                    peak_rss_mb=window.peak_rss.get(name, 0) / 2**20,
                    processes=window.peak_procs.get(name, 0),
                )
            cores = os.cpu_count() or 1
            window.others_cores = max(0.0, window.machine_busy * cores - sum(counted.values()))


class Procs:
    """Starts processes in their own session and stops them all, by pid, at the end."""

    def __init__(self, pid_file: Path | None) -> None:
        self.pid_file = pid_file
        self.started: list[subprocess.Popen[bytes]] = []
        self.extra: list[tuple[int, int]] = []  # (pid, start) of daemons we caused (an nginx master)

    def _record(self, pid: int) -> None:
        if self.pid_file is None:
            return
        stat = read_stat(pid)
        if stat is not None:
            with self.pid_file.open("a") as handle:
                handle.write(f"{pid} {stat.start}\n")

    def start(
        self, cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        handle = log.open("ab")
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            handle.close()
        self.started.append(proc)
        self._record(proc.pid)
        return proc

    def adopt(self, pid: int) -> None:
        """A process started on our behalf by another (the controller's nginx master)."""
        stat = read_stat(pid)
        if stat is not None and (pid, stat.start) not in self.extra:
            self.extra.append((pid, stat.start))
            self._record(pid)

    @staticmethod
    def stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal the process group we created for `proc`, then SIGKILL it if it lingers."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        # children that outlived their parent keep the group id
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    @staticmethod
    def stop_pid(pid: int, start: int, sig: int = signal.SIGQUIT, timeout: float = 10.0) -> None:
        """Signal `pid` if it is still the process that started at `start` (no pid reuse), then SIGKILL."""

        def same() -> bool:
            stat = read_stat(pid)
            return stat is not None and stat.start == start

        if not same():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and same():
            time.sleep(0.05)
        if same():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop_group(proc)
        for pid, start in self.extra:
            self.stop_pid(pid, start)
        self.started.clear()
        self.extra.clear()
