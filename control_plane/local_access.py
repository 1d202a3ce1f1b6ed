"""Who on this host may reach the gateway's unix sockets: the nginx workers and root, nobody else.

The shim sockets (run/i_*.sock) carry requests that nginx sends on with a provider's credential, and the
log socket (run/log.sock) feeds passive health. nginx makes its listening unix sockets mode 0666 itself, so
the directory holding them is what keeps other local users out: owned by the controller, group of the nginx
workers, mode 0710 (they may traverse it, nobody else may, nobody may list it). Effects only.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

# nginx's own choice for its workers when the master runs as root and no `user` is given (Debian's build).
NGINX_DEFAULT_USER = "nobody"


@dataclass(frozen=True)
class Workers:
    """The identity of the nginx worker processes, as rendered into nginx.conf's `user` directive."""

    user: str | None
    group: str | None  # rendered only when the master runs as root
    gid: int | None  # None: the workers run as the controller's own user (owner-only modes are enough)


def _group_of(user: str) -> tuple[str, int]:
    """nginx's default group for `user NAME;` is the group called NAME; without one, the user's own."""
    try:
        return user, grp.getgrnam(user).gr_gid
    except KeyError:
        pass
    try:
        gid = pwd.getpwnam(user).pw_gid
    except KeyError:
        raise ValueError(f"ISHGW_NGINX_USER: there is no user {user!r} on this host") from None
    return grp.getgrgid(gid).gr_name, gid


def nginx_workers(nginx_user: str | None, euid: int | None = None) -> Workers:
    """As root, nginx switches its workers to ``nginx_user`` (or nobody): name it and its group explicitly,
    so that the directory permissions below follow the same identity. Otherwise the workers are us."""
    if (os.geteuid() if euid is None else euid) != 0:
        return Workers(nginx_user, None, None)
    user = nginx_user or NGINX_DEFAULT_USER
    group, gid = _group_of(user)
    return Workers(user, group, gid)


def prepare_socket_dir(path: Path, gid: int | None) -> None:
    """The directory of the unix sockets: 0710 with the workers' group, or 0700 when they are us."""
    path.mkdir(parents=True, exist_ok=True)
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, 0o710 if gid is not None else 0o700)
