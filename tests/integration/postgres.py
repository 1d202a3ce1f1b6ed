"""A real PostgreSQL server for the test session (initdb + pg_ctl on a free loopback port)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ports import free_port


def _pg_bin_dir() -> Path | None:
    def version(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if os.access(Path(candidate) / "initdb", os.X_OK) and os.access(Path(candidate) / "pg_ctl", os.X_OK):
            return Path(candidate)
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    return None


def _unavailable(reason: str) -> None:
    """Skip locally; in CI (CI=true) a missing PostgreSQL is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL required in CI: {reason}")
    pytest.skip(f"PostgreSQL unavailable: {reason}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """initdb + pg_ctl start on 127.0.0.1:<free port>; yields the admin URL (database ``postgres``)."""
    bin_dir = _pg_bin_dir()
    if bin_dir is None:
        _unavailable("initdb/pg_ctl not found")
        raise AssertionError("unreachable")
    prefix: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="ishgw-pg-"))
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        try:
            pg_user = pwd.getpwnam("postgres")
        except KeyError:
            pg_user = None
        if runuser is None or pg_user is None:
            shutil.rmtree(base, ignore_errors=True)
            _unavailable("running as root without runuser or a 'postgres' user")
            raise AssertionError("unreachable")
        os.chown(base, pg_user.pw_uid, pg_user.pw_gid)
        prefix = [runuser, "-u", "postgres", "--"]
    data = base / "data"
    log = base / "postgres.log"
    port = free_port()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120, check=False)

    init = run(
        str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"
    )
    if init.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"initdb failed: {init.stdout}\n{init.stderr}")
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
    )
    start = run(
        str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"
    )
    if start.returncode != 0:
        details = log.read_text() if log.exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed: {start.stdout}\n{start.stderr}\n{details}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(base, ignore_errors=True)


def pg_admin(admin_url: str, statement: str) -> None:
    import psycopg

    dsn = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement.encode())
