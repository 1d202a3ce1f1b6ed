"""The only place that touches nginx: write a candidate tree, `nginx -t` it, swap it in atomically, signal.

Layout under ``prefix``:
    generations/<checksum>/   one rendered tree per checksum (files 0600, directory 0700)
    live -> generations/<checksum>   what nginx runs (nginx is started with -c live/nginx.conf)
    nginx.pid, logs/error.log, tmp/
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from control_plane.errors import ReloadFailed
from control_plane.render.nginx import RenderedTree
from control_plane.render.spec import GENERATIONS_DIR, USAGE_SOCKET

TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
# What nginx listens on in the run directory (render.spec: the shims' and the usage drain's), never the
# controller's own log socket.
NGINX_SOCKETS = ("i_*.sock", USAGE_SOCKET)
LIVE_STREAK = 3  # fresh connections in a row that must answer with the new checksum


@dataclass(frozen=True)
class TestResult:
    ok: bool
    output: str


def children(parent: int) -> list[int]:
    """Pids whose parent is ``parent`` (from /proc/<pid>/stat)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
    return found


def worker_count(worker_processes: str) -> int:
    """nginx's number of workers for a `worker_processes` value ("auto": one per CPU)."""
    return (os.cpu_count() or 1) if worker_processes == "auto" else int(worker_processes)


def health_url(listen_address: str, http_port: int) -> str:
    """Where the controller asks nginx which tree it serves (loopback when nginx listens on every address)."""
    host = "127.0.0.1" if listen_address in ("0.0.0.0", "*", "::") else listen_address
    return f"http://{host}:{http_port}/health"


def write_files(directory: Path, files: dict[str, str]) -> None:
    """A rendered tree's files (names may hold subdirectories: lua/gw/...) into a fresh ``directory``:
    files 0600, directories 0700 (some hold credentials)."""
    for name, text in files.items():
        (directory / name).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)


class NginxProcess:
    """The reconciler's NginxControl (control_plane/reconciler.py) in production."""

    def __init__(
        self,
        prefix: Path,
        binary: str = "nginx",
        generations_kept: int = 5,
        run_dir: Path | None = None,
        health: str | None = None,
        workers: int = 1,
    ) -> None:
        self.prefix = prefix
        self.run_dir = run_dir  # where nginx listens on unix sockets (the shims', the usage drain's)
        self.binary = binary
        self.generations_kept = generations_kept
        self.health = health  # nginx's /health URL (health_url), which confirm() asks
        self.workers = workers  # how many workers a loaded configuration runs (worker_count)

    @property
    def generations(self) -> Path:
        return self.prefix / GENERATIONS_DIR

    @property
    def live(self) -> Path:
        return self.prefix / "live"

    @property
    def pid_file(self) -> Path:
        return self.prefix / "nginx.pid"

    @property
    def error_log(self) -> Path:
        return self.prefix / "logs" / "error.log"

    def prepare(self) -> None:
        for path in (self.prefix, self.generations, self.prefix / "logs", self.prefix / "tmp"):
            path.mkdir(parents=True, exist_ok=True)
        for name in TEMP_DIRS:
            (self.prefix / "tmp" / name).mkdir(exist_ok=True)
        os.chmod(self.generations, 0o700)

    def running_checksum(self) -> str | None:
        """The checksum of the tree nginx runs, if nginx runs."""
        if self.master_pid() is None:
            return None
        with contextlib.suppress(OSError):
            return os.readlink(self.live).rsplit("/", 1)[-1]
        return None

    def master_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def write_candidate(self, tree: RenderedTree) -> Path:
        """Write the tree into its own generation directory (atomically: temp dir, then rename)."""
        final = self.generations / tree.checksum
        if final.is_dir():
            os.utime(final)
            return final
        temp = self.generations / f".tmp-{tree.checksum}-{os.getpid()}"
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(mode=0o700)
        write_files(temp, tree.files)
        os.replace(temp, final)
        return final

    async def _run(self, *args: str) -> TestResult:
        proc = await asyncio.create_subprocess_exec(
            self.binary,
            "-p",
            str(self.prefix) + "/",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        return TestResult(proc.returncode == 0, out.decode(errors="replace").strip())

    async def test(self, directory: Path) -> TestResult:
        return await self._run("-t", "-q", "-c", str(directory / "nginx.conf"))

    def swap(self, checksum: str) -> None:
        """Point `live` at the generation, atomically (rename of a fresh symlink)."""
        temp = self.prefix / f".live-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        temp.symlink_to(Path("generations") / checksum)
        os.replace(temp, self.live)

    def accepting_workers(self) -> int | None:
        """How many of the master's children may still take a request: all but the old workers shutting
        down after a reload (a child just forked, still titled as the master, counts). None: no master."""
        master = self.master_pid()
        if master is None:
            return None
        count = 0
        for child in children(master):
            with contextlib.suppress(OSError):  # exited meanwhile
                title = Path(f"/proc/{child}/cmdline").read_bytes()
                count += bool(title) and b"shutting down" not in title
        return count

    async def signal_reload(self) -> None:
        """HUP the running master, or start nginx (daemonised, so it outlives the controller)."""
        pid = self.master_pid()
        if pid is not None:
            os.kill(pid, signal.SIGHUP)
            return
        self.remove_stale_sockets()
        result = await self._run("-c", str(self.live / "nginx.conf"))
        if not result.ok:
            raise ReloadFailed(f"nginx did not start: {result.output}")

    async def confirm(self, checksum: str, timeout_s: float) -> bool:
        """True once nginx answers /health with ``checksum`` on several fresh connections in a row and every
        old worker has begun to shut down; False when that is not so within ``timeout_s``."""
        if self.health is None:
            raise ValueError("NginxProcess.confirm needs the health URL nginx answers on")
        # Live means also that no old worker still takes requests: after a HUP the master forks the new
        # workers, then tells the old ones to stop, and until an old worker has handled that it still
        # answers on its keep-alive connections with the old configuration (read your writes would break).
        deadline = time.monotonic() + timeout_s
        streak = 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
            while time.monotonic() < deadline:
                seen = None
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    async with session.get(self.health, headers={"Connection": "close"}) as response:
                        seen = (await response.json(content_type=None)).get("checksum")
                streak = streak + 1 if seen == checksum else 0
                if streak >= LIVE_STREAK and self.accepting_workers() in (None, self.workers):
                    return True
                await asyncio.sleep(0.01 if streak else 0.02)
        return False

    def remove_stale_sockets(self) -> None:
        """The unix sockets an nginx killed with SIGKILL left behind (no master runs: nothing listens on
        them); binding them again would fail with "Address already in use"."""
        if self.run_dir is None or self.master_pid() is not None:
            return
        for pattern in NGINX_SOCKETS:
            for path in self.run_dir.glob(pattern):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink(missing_ok=True)

    async def stop(self, graceful: bool = True, timeout: float = 10.0) -> None:
        pid = self.master_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGQUIT if graceful else signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + timeout
        while self.master_pid() is not None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self.master_pid() is not None:
            os.kill(pid, signal.SIGKILL)

    def prune(self, keep_also: str | None = None) -> None:
        """Keep the newest generations and the live one; remove the rest."""
        live = self.running_checksum() or keep_also
        entries = sorted(
            (p for p in self.generations.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in entries[self.generations_kept :]:
            if old.name not in (live, keep_also):
                shutil.rmtree(old, ignore_errors=True)

    def error_log_tail(self, lines: int = 5) -> str:
        try:
            return "\n".join(self.error_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
