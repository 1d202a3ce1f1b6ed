"""Backups of a gateway home: one tar.gz (0600) with a manifest, made while the gateway runs.

Layout of an archive::

    manifest.json            format, versions, database kind, registry key id, sha256 and size of each member
    registry/ishgw.db        SQLite: a consistent copy made with the online backup API
    registry/ishgw.pgdump    PostgreSQL: pg_dump --format=custom
    files/<path>             files of the home: gateway.env, ssl/*; with secrets also provider.env,
                             secrets/admin_api_key, secrets/registry.key, secrets/providers/*

Without secrets an archive holds no key that opens anything: provider keys are sealed in the registry
(registry/sealing.py), the registry key, the admin key (file, or ISHGW_ADMIN_API_KEY in gateway.env) and
provider.env stay out, and a restore needs the registry key already in place (``check_archive`` says so
before anything changes). The TLS private key is in every archive: that is why archives are 0600.

``python -m control_plane.backup create FILE [--with-secrets] | verify FILE | restore FILE | migrate`` with
the controller's settings (deploy-load-balancer.sh backup/restore/update run it with exactly gateway.env).
restore expects the controller stopped; nginx keeps serving, and the controller reconciles it when it
starts. migrate applies pending schema migrations and seals provider keys still in clear.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from control_plane.registry import store as store_module
from control_plane.registry.sealing import RegistryKeyError, load_key, registry_sealer
from control_plane.settings import Settings

FORMAT = "ish-gateway-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SQLITE_MEMBER = "registry/ishgw.db"
PG_MEMBER = "registry/ishgw.pgdump"
SECRET_ENV = ("ISHGW_ADMIN_API_KEY",)  # gateway.env settings that are secrets
# Settings of the home an archive is restored into, not of the one it was made from.
LOCAL_ENV = ("ISHGW_HOME", "ISHGW_VENV", "ISHGW_DB_URL", "ISHGW_REGISTRY_KEY_FILE")
REGISTRY_KEY_MEMBER = "files/secrets/registry.key"
BACKUP_NAME = re.compile(r"^ishgw-\d{8}T\d{6}Z(?:-\d+)?\.tar\.gz$")
MAX_MEMBER_BYTES = 1 << 34

log = logging.getLogger(__name__)


class BackupError(Exception):
    """An archive that cannot be made or restored; the message says why and what to do."""


# -- pure parts ------------------------------------------------------------------------------------------


def gateway_version() -> str:
    try:
        return metadata.version("ish-gateway")
    except metadata.PackageNotFoundError:
        return "unknown"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def env_lines(text: str) -> list[tuple[str | None, str]]:
    """(NAME or None for comments/blank lines, the line) for NAME=value files."""
    out: list[tuple[str | None, str]] = []
    for line in text.splitlines():
        name = line.split("=", 1)[0] if "=" in line and not line.lstrip().startswith("#") else None
        out.append((name, line))
    return out


def without_secrets(gateway_env: str) -> str:
    """gateway.env minus the settings that are secrets."""
    kept = [line for name, line in env_lines(gateway_env) if name not in SECRET_ENV]
    return "\n".join(kept) + "\n"


def merged_gateway_env(archived: str, current: str, with_secrets: bool) -> str:
    """The gateway.env a restore writes: the archive's settings, with this home's own (LOCAL_ENV) and,
    when the archive has no secrets, this home's secret settings."""
    keep = set(LOCAL_ENV) | (set() if with_secrets else set(SECRET_ENV))
    local = {name: line for name, line in env_lines(current) if name in keep}
    out = [line for name, line in env_lines(archived) if name not in keep]
    out += [local[name] for name in sorted(local)]
    return "\n".join(out) + "\n"


def backup_file_name(now: datetime) -> str:
    return f"ishgw-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}.tar.gz"


def to_prune(names: Iterable[str], keep: int) -> list[str]:
    """The periodic backups beyond the newest ``keep`` (names sort by time); other files are not ours."""
    ours = sorted(name for name in names if BACKUP_NAME.fullmatch(name))
    return ours[: max(0, len(ours) - keep)]


# What a restore may write under the home: nothing else (not the nginx tree, not pid files), whatever an
# archive's manifest says.
HOME_MEMBERS = frozenset(
    {"files/gateway.env", "files/provider.env", "files/secrets/admin_api_key", REGISTRY_KEY_MEMBER}
)


def safe_member(name: str) -> bool:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or str(path) != name:
        return False
    parts = path.parts
    return (
        name in (MANIFEST, SQLITE_MEMBER, PG_MEMBER)
        or name in HOME_MEMBERS
        or (len(parts) == 3 and parts[:2] == ("files", "ssl"))
        or (len(parts) > 3 and parts[:3] == ("files", "secrets", "providers"))
    )


@dataclass(frozen=True)
class Expect:
    """What the home an archive is restored into needs: the schema it understands, its database kind and
    (for archives without secrets) the id of its registry key, None when it has none."""

    schema_version: int
    database: str
    local_key_id: str | None
    key_path: str


def check_manifest(manifest: Any, digests: dict[str, tuple[str, int]], expect: Expect) -> list[str]:
    """Every reason the archive cannot be restored here (empty: it can). ``digests``: member -> (sha256,
    size) of what the archive really holds, the manifest excluded."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return ["not an ISH Gateway backup (its manifest.json does not say format ish-gateway-backup)"]
    problems: list[str] = []
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        problems.append(f"archive format version {version!r}: this gateway reads up to {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [*problems, "the manifest lists no files"]
    for name in sorted(set(files) - set(digests)):
        problems.append(f"{name}: listed in the manifest, missing from the archive")
    for name in sorted(set(digests) - set(files)):
        problems.append(f"{name}: in the archive, not in the manifest")
    for name in sorted(set(files) & set(digests)):
        listed = files[name]
        if not isinstance(listed, dict) or listed.get("sha256") != digests[name][0]:
            problems.append(f"{name}: checksum mismatch (the archive is damaged or was altered)")
    schema = manifest.get("schema_version")
    if not isinstance(schema, int) or schema > expect.schema_version:
        problems.append(
            f"registry schema {schema!r} is newer than this gateway's ({expect.schema_version}): update first"
        )
    if manifest.get("database") != expect.database:
        problems.append(
            f"the archive holds a {manifest.get('database')} registry; this gateway uses {expect.database}"
        )
    member = SQLITE_MEMBER if expect.database == "sqlite" else PG_MEMBER
    if member not in files:
        problems.append(f"the archive has no registry ({member})")
    key_id = manifest.get("registry_key_id")
    if manifest.get("with_secrets"):
        if key_id is not None and REGISTRY_KEY_MEMBER not in files:
            problems.append(f"the manifest says with secrets, but {REGISTRY_KEY_MEMBER} is missing")
    elif key_id is not None and expect.local_key_id != key_id:
        have = f"holds key {expect.local_key_id}" if expect.local_key_id else "does not exist"
        problems.append(
            f"this backup was made without secrets: restoring it needs registry key {key_id} at"
            f" {expect.key_path}, which {have} (use a backup made with --with-secrets, or put the key back)"
        )
    return problems


# -- effects: making an archive --------------------------------------------------------------------------


def home_files(settings: Settings, with_secrets: bool) -> dict[str, Path]:
    """member name -> file of the home that goes into the archive."""
    home = settings.home
    chosen: dict[str, Path] = {}
    candidates = [home / "gateway.env", *sorted((home / "ssl").glob("*"))]
    if with_secrets:
        candidates += [home / "provider.env", settings.admin_key_file]
        providers = home / "secrets" / "providers"
        candidates += sorted(p for p in providers.rglob("*") if p.is_file()) if providers.is_dir() else []
    for path in candidates:
        name = "files/" + path.relative_to(home).as_posix()
        if path.is_file() and not path.is_symlink() and safe_member(name):
            chosen[name] = path
    if with_secrets and settings.registry_key_path.is_file():
        chosen[REGISTRY_KEY_MEMBER] = settings.registry_key_path
    return chosen


def sqlite_path(settings: Settings) -> Path | None:
    url = store_module.normalise_url(settings.database_url)
    if url.get_backend_name() != "sqlite":
        return None
    return Path(os.path.abspath(url.database or ""))


def libpq(settings: Settings) -> tuple[str, dict[str, str]]:
    """The libpq URL without its password, and the environment that carries the password (never argv,
    which every local user can read)."""
    url = store_module.normalise_url(settings.database_url).set(drivername="postgresql")
    env = dict(os.environ)
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    return url.set(password=None).render_as_string(hide_password=False), env


def _snapshot_sqlite(source: Path, target: Path) -> tuple[int, str | None, int]:
    """A consistent copy while the controller writes (the online backup API copies one snapshot), and
    (schema version, registry key id, instance count) of that copy."""
    src = sqlite3.connect(source, timeout=store_module.SQLITE_BUSY_TIMEOUT_MS / 1000)
    dst = sqlite3.connect(target)
    try:
        with dst:
            src.backup(dst)
        tables = {row[0] for row in dst.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_migrations" not in tables:
            return 0, None, 0
        version = dst.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] or 0
        raw = dst.execute(
            "SELECT value FROM settings WHERE key = ?", (store_module.REGISTRY_KEY_ID,)
        ).fetchone()
        count = dst.execute("SELECT count(*) FROM instances").fetchone()[0]
        return int(version), (str(json.loads(raw[0])) if raw else None), int(count)
    finally:
        dst.close()
        src.close()


def _registry_facts(settings: Settings) -> tuple[int, str | None, int]:
    """(schema version, registry key id, instance count) of the live registry; reads only."""
    store = store_module.Store(settings.database_url)
    try:
        version = store.schema_version()
        if version == 0:
            return 0, None, 0
        return version, store.registry_key_id(), store.instance_count()
    finally:
        store.close()


def _run(command: list[str], what: str, **kwargs: Any) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
    except FileNotFoundError:
        raise BackupError(f"{command[0]} is not installed (apt-get install postgresql-client)") from None
    if result.returncode != 0:
        raise BackupError(f"{what} failed: {result.stderr.strip()[-500:]}")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o600, int(mtime)
    tar.addfile(info, io.BytesIO(data))


def create(settings: Settings, target: Path, with_secrets: bool) -> dict[str, Any]:
    """Write the archive to ``target`` (0600, atomically); returns its manifest."""
    target = target.absolute()
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.now(UTC)
    members: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".backup-") as work:
        db = sqlite_path(settings)
        if db is not None:
            if not db.is_file():
                raise BackupError(f"no registry at {db}")
            schema, key_id, count = _snapshot_sqlite(db, Path(work) / "ishgw.db")
            members[SQLITE_MEMBER] = (Path(work) / "ishgw.db").read_bytes()
            database = "sqlite"
        else:
            schema, key_id, count = _registry_facts(settings)
            dump = Path(work) / "ishgw.pgdump"
            url, env = libpq(settings)
            _run(["pg_dump", "--format=custom", "--no-owner", f"--file={dump}", url], "pg_dump", env=env)
            members[PG_MEMBER] = dump.read_bytes()
            database = "postgresql"
    for name, path in home_files(settings, with_secrets).items():
        data = path.read_bytes()
        if name == "files/gateway.env" and not with_secrets:
            data = without_secrets(data.decode()).encode()
        members[name] = data
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gateway_version": gateway_version(),
        "schema_version": schema,
        "created_at": now.isoformat(timespec="seconds"),
        "database": database,
        "instances": count,
        "with_secrets": with_secrets,
        "registry_key_id": key_id,
        "files": {
            name: {"sha256": sha256(data), "size": len(data)} for name, data in sorted(members.items())
        },
    }
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".backup-", suffix=".tar.gz")
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            _add_bytes(tar, MANIFEST, json.dumps(manifest, indent=2).encode(), now.timestamp())
            for name, data in sorted(members.items()):
                _add_bytes(tar, name, data, now.timestamp())
        os.chmod(temp, 0o600)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return manifest


# -- effects: reading and restoring ----------------------------------------------------------------------


@dataclass
class Archive:
    manifest: dict[str, Any]
    members: dict[str, bytes]


def _inflate(path: Path) -> bytes:
    """The tar inside the gzip file, inflated whole before any member is read: damage anywhere is then found
    by zlib or by the CRC in gzip's trailer, never taken for a foreign archive (tarfile stops reading before
    the trailer, so a flipped byte could otherwise surface as a garbled manifest)."""
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        raise BackupError(f"{path}: not a gzip tar archive")
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise BackupError(f"{path}: the archive is damaged ({exc})") from None


def read_archive(path: Path) -> Archive:
    """Every member in memory (archives are small: a registry and a few files); refuses what is not a
    gzip tar of regular files with safe names."""
    if not path.is_file():
        raise BackupError(f"{path}: no such file")
    try:
        tar = tarfile.open(fileobj=io.BytesIO(_inflate(path)), mode="r:")  # noqa: SIM115 (closed below)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BackupError(f"{path}: not a gzip tar archive ({exc})") from None
    members: dict[str, bytes] = {}
    try:
        with tar:
            for info in tar:
                if not info.isfile() or not safe_member(info.name) or info.size > MAX_MEMBER_BYTES:
                    raise BackupError(f"{path}: unexpected member {info.name!r}: not an ISH Gateway backup")
                if info.name in members:
                    raise BackupError(f"{path}: member {info.name!r} appears twice")
                handle = tar.extractfile(info)
                members[info.name] = handle.read() if handle else b""
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise BackupError(f"{path}: the archive is damaged ({exc})") from None
    raw = members.pop(MANIFEST, None)
    if raw is None:
        raise BackupError(f"{path}: no manifest.json: not an ISH Gateway backup")
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise BackupError(f"{path}: manifest.json is not JSON: not an ISH Gateway backup") from None
    return Archive(manifest, members)


def expectation(settings: Settings) -> Expect:
    schema = max(version for version, _ in store_module.MIGRATIONS)
    database = "sqlite" if sqlite_path(settings) is not None else "postgresql"
    try:
        local = load_key(settings.registry_key_path).key_id
    except (FileNotFoundError, RegistryKeyError):
        local = None
    return Expect(schema, database, local, str(settings.registry_key_path))


def verify(settings: Settings, path: Path) -> Archive:
    archive = read_archive(path)
    digests = {name: (sha256(data), len(data)) for name, data in archive.members.items()}
    problems = check_manifest(archive.manifest, digests, expectation(settings))
    if problems:
        raise BackupError(f"{path} cannot be restored:\n  " + "\n  ".join(problems))
    return archive


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(temp, mode)
    os.replace(temp, path)


def _restore_registry(settings: Settings, archive: Archive) -> None:
    db = sqlite_path(settings)
    if db is not None:
        # The controller is stopped: no connection holds the WAL. The new file replaces the old in one rename;
        # a -wal/-shm of the old file must not be applied to the new one.
        _write_atomic(db.with_name(db.name + ".restore"), archive.members[SQLITE_MEMBER], 0o600)
        for suffix in ("-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(db) + suffix)
        os.replace(db.with_name(db.name + ".restore"), db)
        return
    with tempfile.NamedTemporaryFile(suffix=".pgdump") as dump:
        dump.write(archive.members[PG_MEMBER])
        dump.flush()
        url, env = libpq(settings)
        _run(
            [
                "pg_restore",
                "--clean",
                "--if-exists",
                "--no-owner",
                "--single-transaction",
                f"--dbname={url}",
                dump.name,
            ],
            "pg_restore",
            env=env,
        )


def restore(settings: Settings, path: Path) -> dict[str, Any]:
    """Verify, then put the registry and the files in place. The controller must be stopped."""
    archive = verify(settings, path)
    with_secrets = bool(archive.manifest.get("with_secrets"))
    home = settings.home
    _restore_registry(settings, archive)  # first: the step most likely to fail, and atomic
    for name, data in sorted(archive.members.items()):
        if not name.startswith("files/"):
            continue
        if name == REGISTRY_KEY_MEMBER:
            _write_atomic(settings.registry_key_path, data, 0o600)
            continue
        target = home / name[len("files/") :]
        if name == "files/gateway.env":
            current = target.read_text() if target.is_file() else ""
            data = merged_gateway_env(data.decode(), current, with_secrets).encode()
        public = name.startswith("files/ssl/") and not name.endswith("key.pem")
        _write_atomic(target, data, 0o644 if public else 0o600)
    return archive.manifest


# -- periodic backups (the controller) -------------------------------------------------------------------


def periodic(settings: Settings, now: datetime) -> Path:
    """One backup without secrets into <home>/backups, then the oldest beyond ISHGW_BACKUP_KEEP go."""
    directory = settings.backup_dir
    directory.mkdir(exist_ok=True, mode=0o700)
    target = directory / backup_file_name(now)
    create(settings, target, with_secrets=False)
    for name in to_prune(os.listdir(directory), settings.backup_keep):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / name)
    return target


async def run_periodic(settings: Settings) -> None:
    """The controller's backup job (ISHGW_BACKUP_INTERVAL_H > 0): a failed backup is logged, the next one
    is tried on time."""
    interval = settings.backup_interval_h * 3600
    while True:
        await asyncio.sleep(interval)
        try:
            made = await asyncio.to_thread(periodic, settings, datetime.now(UTC))
        except (OSError, BackupError, SQLAlchemyError, sqlite3.Error) as exc:
            log.error("periodic backup failed: %s", exc)
        else:
            log.info("periodic backup %s", made)


def migrate(settings: Settings) -> tuple[int, int]:
    """(schema version, provider keys sealed now)."""
    store = store_module.Store(settings.database_url)
    try:
        version = store.migrate()
        sealed = store.attach_sealer(registry_sealer(settings.registry_key_path, store.registry_key_id()))
        return version, sealed
    finally:
        store.close()


@contextlib.contextmanager
def _quiet_errors() -> Iterator[None]:
    try:
        yield
    except (BackupError, RegistryKeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m control_plane.backup")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("create")
    make.add_argument("file", type=Path)
    make.add_argument("--with-secrets", action="store_true")
    for name in ("verify", "restore"):
        sub.add_parser(name).add_argument("file", type=Path)
    sub.add_parser("migrate")
    args = parser.parse_args(argv)
    settings = Settings()
    with _quiet_errors():
        if args.command == "create":
            manifest = create(settings, args.file, args.with_secrets)
            secrets = "with secrets" if args.with_secrets else "without secrets"
            print(
                f"{args.file}: {manifest['instances']} instances, {len(manifest['files'])} files, {secrets}"
            )
        elif args.command == "verify":
            manifest = verify(settings, args.file).manifest
            print(
                f"{args.file}: ok (made {manifest.get('created_at')} by {manifest.get('gateway_version')},"
                f" {manifest.get('instances')} instances, with_secrets={manifest.get('with_secrets')})"
            )
        elif args.command == "migrate":
            version, sealed = migrate(settings)
            print(f"registry schema {version}; {sealed} provider keys encrypted now")
        else:
            restore(settings, args.file)
            print(f"{args.file}: restored into {settings.home}")


if __name__ == "__main__":
    main()
