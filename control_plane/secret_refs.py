"""Provider secret references (api_key "env:NAME" / "file:/path"): where they may point, and reading them.

An admin key holder must not be able to send arbitrary files or the controller's own settings to a URL of
their choice, so a reference is honoured only where root put provider secrets: ``file:`` paths inside
ISHGW_SECRET_DIRS (after symlinks and '..' are resolved, checked again on the opened file), ``env:`` names
that ``$ISHGW_HOME/provider.env`` defines (never ISHGW_*). A value must also be usable as a header value.
No message here ever holds a fragment of a secret.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from control_plane.registry import validators as v

MAX_SECRET_FILE = 64 * 1024
_ENV_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=")  # as deploy reads it (read_env_file)
RESERVED_ENV_PREFIX = "ISHGW_"


@dataclass(frozen=True)
class SecretPolicy:
    """Where references may point. The default allows none (literal keys only)."""

    dirs: tuple[Path, ...] = ()
    provider_env: Path | None = None
    environ: Mapping[str, str] = field(default_factory=dict)


class Resolved(NamedTuple):
    value: str | None
    problem: str | None  # why the reference cannot be used; never holds the secret


def provider_env_names(path: Path | None) -> frozenset[str]:
    """The names provider.env defines (NAME=value lines, as deploy reads them), ISHGW_* excluded."""
    if path is None:
        return frozenset()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return frozenset()
    names = (m.group(1) for line in text.splitlines() if (m := _ENV_LINE.match(line)))
    return frozenset(n for n in names if not n.startswith(RESERVED_ENV_PREFIX))


def _inside(path: str, dirs: tuple[Path, ...]) -> bool:
    real = Path(path)
    return any(real.is_relative_to(os.path.realpath(d)) for d in dirs)


def check_env_name(name: str, policy: SecretPolicy) -> str | None:
    if name.startswith(RESERVED_ENV_PREFIX):
        return f"env:{name} is a gateway setting, not a provider credential"
    if name not in provider_env_names(policy.provider_env):
        return f"env:{name} is not defined in {policy.provider_env or 'provider.env'}"
    return None


def check_file_path(path: str, policy: SecretPolicy) -> str | None:
    if not policy.dirs:
        return "file: references are switched off (ISHGW_SECRET_DIRS is empty)"
    if not _inside(os.path.realpath(path), policy.dirs):
        return f"file:{path} is not inside ISHGW_SECRET_DIRS ({', '.join(map(str, policy.dirs))})"
    return None


def usable(value: str) -> str | None:
    """Why a secret cannot be sent as a header value, or None. Says nothing about the value itself."""
    if not value:
        return "is empty"
    if not v.SECRET_RE.fullmatch(value):
        return (
            "cannot be sent as a header value (it must be one line of printable ASCII without spaces,"
            " quotes, backslashes, braces, ';', '$' or '#')"
        )
    return None


def _read_file(path: str, policy: SecretPolicy) -> Resolved:
    """Open, then check where the opened file really is (a symlink swapped after a check changes
    nothing), that it is a regular file (a FIFO would block), and read at most MAX_SECRET_FILE bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        return Resolved(None, f"file:{path} cannot be read ({exc.strerror})")
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
        if not _inside(real, policy.dirs):
            return Resolved(None, f"file:{path} is not inside ISHGW_SECRET_DIRS")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return Resolved(None, f"file:{path} is not a regular file")
        raw = os.read(fd, MAX_SECRET_FILE + 1)
    except OSError as exc:
        return Resolved(None, f"file:{path} cannot be read ({exc.strerror})")
    finally:
        os.close(fd)
    if len(raw) > MAX_SECRET_FILE:
        return Resolved(None, f"file:{path} is larger than {MAX_SECRET_FILE} bytes")
    return Resolved(raw.decode("utf-8", errors="replace").strip(), None)


def _fetch(value: str, policy: SecretPolicy) -> Resolved:
    if value.startswith("env:"):
        name = value[4:]
        problem = check_env_name(name, policy)
        if problem is not None:
            return Resolved(None, problem)
        secret = policy.environ.get(name)
        if secret is None:
            return Resolved(None, f"env:{name} is not set in the controller's environment (run deploy)")
        return Resolved(secret.strip(), None)
    if value.startswith("file:"):
        path = value[5:]
        problem = check_file_path(path, policy)
        return Resolved(None, problem) if problem else _read_file(path, policy)
    return Resolved(value, None)


def resolve(value: str, policy: SecretPolicy) -> Resolved:
    """A literal key is itself; a reference is checked and read now (a file may change at any time)."""
    fetched = _fetch(value, policy)
    if fetched.value is None:
        return fetched
    problem = usable(fetched.value)
    if problem is not None:
        what = value if value.startswith(("env:", "file:")) else "api_key"
        return Resolved(None, f"{what} {problem}")
    return fetched


def check_reference(value: str | None, policy: SecretPolicy) -> str | None:
    """The admin API's check of an api_key: a reference must point where references may point, and a
    file that exists already must hold a usable secret. A file not there yet is accepted (the instance is
    left out with that reason until it is). Returns the problem, or None."""
    if value is None or not value.startswith(("env:", "file:")):
        return None
    if value.startswith("env:"):
        return check_env_name(value[4:], policy)
    path = value[5:]
    problem = check_file_path(path, policy)
    if problem is not None or not os.path.lexists(path):
        return problem
    return resolve(value, policy).problem
