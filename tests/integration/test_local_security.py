"""Issue 19, the medium items: what a local user and an admin key holder can no longer do.

The attempts of a local user run as `nobody` (setpriv), against a gateway whose nginx workers run as
www-data, as `deploy` sets them up; the same attempt as www-data is the control that shows the test could
fail. The tests run as root (here and in CI).
"""

from __future__ import annotations

import errno
import grp
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from control_plane.health import logstream
from tests.backends.stub_llm import StubServer
from tests.integration.conftest import start_stub
from tests.integration.gateway import Gateway, wait_for

PYTHON = "/usr/bin/python3"  # readable by every user, unlike the virtualenv under /root or /work
WORKER = ("www-data", "www-data")
LOCAL_USER = ("nobody", "nogroup")

# Connects (a stream socket: a shim) or sends one datagram (the log socket) to argv[1], as the caller's user;
# prints "ok" or the errno.
PROBE = """
import socket, sys
kind = socket.SOCK_STREAM if sys.argv[2] == "stream" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_UNIX, kind)
try:
    if kind == socket.SOCK_STREAM:
        s.connect(sys.argv[1])
    else:
        s.sendto(sys.argv[3].encode(), sys.argv[1])
    print("ok")
except OSError as exc:
    print(exc.errno)
"""


def attempt_as(user: tuple[str, str], path: Path, kind: str, payload: str = "") -> str:
    """The PROBE as ``user``, without root's supplementary groups: "ok" or an errno."""
    command = ["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups", PYTHON, "-c", PROBE]
    result = subprocess.run(
        [*command, str(path), kind, payload], capture_output=True, text=True, timeout=20, check=True
    )
    return result.stdout.strip()


@pytest.fixture
def secure_gateway() -> Iterator[Gateway]:
    """A gateway whose nginx workers run as www-data (deploy's choice as root); probes rest."""
    with Gateway(extra_env={"ISHGW_NGINX_USER": WORKER[0]}) as gw:
        yield gw


def shim_instance(gw: Gateway, name: str, stub: StubServer, api_key: str, **kw: Any) -> None:
    """A credentialed OpenAI-style instance: nginx reaches it through its shim's unix socket."""
    kw.setdefault("health", {"probe_interval_s": 60})
    r = gw.add_instance(
        name=name,
        provider_type="openai_compatible",
        api_base=stub.url + "/v1",
        api_key=api_key,
        supported_models=[kw.pop("model", "m")],
        **kw,
    )
    assert r.status_code == 201, r.text


def last_chat_auth(stub: StubServer) -> str:
    """The Authorization header of the last chat request the backend received (not a probe's)."""
    chats = [r for r in stub.requests() if r["path"].endswith("/chat/completions")]
    return str(chats[-1]["headers"]["authorization"])


def chat(gw: Gateway, model: str = "m") -> int:
    return gw.client.post("/v1/chat/completions", json={"model": model, "messages": []}).status_code


# -- 1. shim sockets ----------------------------------------------------------------------------------


def test_only_the_nginx_workers_reach_the_shim_sockets(
    secure_gateway: Gateway, stubs: dict[str, StubServer]
) -> None:
    gw = secure_gateway
    backend = start_stub(stubs, "cloud")
    shim_instance(gw, "cloud", backend, "sk-provider-key-0001")
    gw.wait_applied()
    assert chat(gw) == 200  # routed through the shim
    assert last_chat_auth(backend) == "Bearer sk-provider-key-0001"

    run = gw.home / "run"
    (sock,) = run.glob("i_*.sock")
    assert attempt_as(LOCAL_USER, sock, "stream") == str(errno.EACCES)
    assert attempt_as(WORKER, sock, "stream") == "ok"  # the control: the workers' group gets through
    info = run.stat()  # nginx makes the socket 0666 itself: the directory keeps others out
    assert stat.S_IMODE(info.st_mode) == 0o710 and info.st_gid == grp.getgrnam(WORKER[1]).gr_gid
    assert chat(gw) == 200  # and the gateway still routes through it
    # The usage drain (issue 12): a local user can neither read nor acknowledge the usage counters.
    assert attempt_as(LOCAL_USER, run / "usage.sock", "stream") == str(errno.EACCES)


# -- 2. the log stream ----------------------------------------------------------------------------------


def forged_429(gw: Gateway, retry_after: str) -> str:
    """The attack's datagram: a 429 with a long Retry-After for the (only) instance's shim address."""
    address = f"unix:{next((gw.home / 'run').glob('i_*.sock'))}"
    return logstream.format_line(
        msec=f"{time.time():.3f}", status="429", upstream_addr=address, upstream_status="429",
        retry_after=retry_after, pool="p", request_id="forged",
    ).decode()  # fmt: skip


def rate_limited_until(gw: Gateway, name: str) -> float | None:
    value = gw.admin.get(f"/admin/instances/{name}/health").json()["rate_limited_until"]
    return datetime.fromisoformat(value).timestamp() if value else None


def in_pool(gw: Gateway, name: str) -> bool:
    return any(name in pool["instances"] for pool in gw.status()["pools"])


def test_only_nginx_writes_to_the_log_stream(secure_gateway: Gateway, stubs: dict[str, StubServer]) -> None:
    gw = secure_gateway
    shim_instance(gw, "cloud", start_stub(stubs, "cloud"), "sk-provider-key-0001")
    gw.wait_applied()
    log_socket = gw.home / "run" / "log.sock"
    forged = forged_429(gw, "600")
    for _ in range(5):
        assert attempt_as(LOCAL_USER, log_socket, "dgram", forged) == str(errno.EACCES)
    assert attempt_as(WORKER, log_socket, "dgram", "not a log line") == "ok"  # the control
    info = log_socket.stat()
    assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == grp.getgrnam(WORKER[1]).gr_gid
    assert chat(gw) == 200  # nginx's own lines still arrive:
    wait_for(lambda: gw.admin.get("/admin/instances/cloud").json()["state"]["total_requests"] >= 1)
    assert rate_limited_until(gw, "cloud") is None and in_pool(gw, "cloud")


def test_retry_after_is_capped_and_the_operator_lifts_a_rate_limit(
    gateway: Gateway, stubs: dict[str, StubServer]
) -> None:
    gw = gateway
    backend = start_stub(stubs, "cloud")
    shim_instance(gw, "cloud", backend, "sk-provider-key-0001")
    gw.wait_applied()
    for lift in ("state", "check"):
        backend.set_mode("status", status=429, retry_after="600")
        told = time.time()
        assert chat(gw) == 429
        until = wait_for(lambda: rate_limited_until(gw, "cloud"), what="rate limited")
        assert told + 300 - 5 <= until <= time.time() + 300  # ISHGW_MAX_RETRY_AFTER_S, not 600
        wait_for(lambda: not in_pool(gw, "cloud"), what="out of the pool")
        backend.set_mode("ok")
        if lift == "state":
            r = gw.admin.put("/admin/instances/cloud/state", json={"status": "active"})
            assert r.status_code == 200 and r.json()["rate_limited_until"] is None
        else:
            r = gw.admin.post("/admin/instances/cloud/check")
            assert r.status_code == 200 and r.json()["outcome"] == "ok", r.text
        assert rate_limited_until(gw, "cloud") is None
        wait_for(lambda: in_pool(gw, "cloud"), timeout=5, what="back in the pool")
        gw.wait_applied()
        assert chat(gw) == 200
    log = (gw.home / "controller.log").read_text()
    assert log.count("instance cloud: rate limit until") == 2 and "lifted by the operator" in log


# -- 3. secret references --------------------------------------------------------------------------------


CANARY = "CANARY-xyz-4711"


@pytest.fixture
def secrets_gateway() -> Iterator[Gateway]:
    """provider.env defines GOOD_KEY (and the controller has it in its environment, as deploy does)."""
    home = Path(tempfile.mkdtemp(prefix="ishgw-", dir="/tmp"))
    (home / "provider.env").write_text("GOOD_KEY=sk-from-env-0001\nISHGW_ADMIN_API_KEY=nope\n")
    with Gateway(home=home, extra_env={"GOOD_KEY": "sk-from-env-0001"}) as gw:
        yield gw


def field_errors(response: Any) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {e["field"]: e["message"] for e in response.json()["detail"]}


def test_secret_references_stay_where_provider_secrets_live(
    secrets_gateway: Gateway, stubs: dict[str, StubServer]
) -> None:
    gw = secrets_gateway
    backend = start_stub(stubs, "cloud")
    secrets = gw.home / "secrets" / "providers"
    assert stat.S_IMODE(secrets.stat().st_mode) == stat.S_IMODE(secrets.parent.stat().st_mode) == 0o700
    (secrets / "escape").symlink_to("/etc/passwd")
    refused = {
        "file:/etc/passwd": "not inside ISHGW_SECRET_DIRS",
        f"file:{secrets}/../../provider.env": "not inside ISHGW_SECRET_DIRS",
        f"file:{secrets}/escape": "not inside ISHGW_SECRET_DIRS",
        "env:ISHGW_ADMIN_API_KEY": "gateway setting",
        "env:HOME": "not defined in",
    }
    for reference, why in refused.items():
        body = {"name": "x", "provider_type": "openai", "api_key": reference, "supported_models": ["m"]}
        assert why in field_errors(gw.admin.post("/admin/instances", json=body))["api_key"], reference
    document = {"instances": [{"name": "x", "provider_type": "openai", "api_key": "file:/etc/shadow"}]}
    assert "instances[0].api_key" in field_errors(gw.admin.post("/admin/config/import", json=document))
    assert gw.admin.get("/admin/instances").json()["instances"] == []  # nothing changed

    (secrets / "cloud.key").write_text("sk-from-file-0001\n")
    shim_instance(gw, "cloud", backend, f"file:{secrets}/cloud.key")
    shim_instance(gw, "envy", start_stub(stubs, "envy"), "env:GOOD_KEY", model="e")
    gw.wait_applied()
    assert chat(gw) == 200 and chat(gw, "e") == 200
    assert last_chat_auth(backend) == "Bearer sk-from-file-0001"
    assert last_chat_auth(stubs["envy"]) == "Bearer sk-from-env-0001"


def test_a_secret_that_is_no_header_value_excludes_its_instance_only(
    secrets_gateway: Gateway, stubs: dict[str, StubServer]
) -> None:
    gw = secrets_gateway
    secrets = gw.home / "secrets" / "providers"
    key_file = secrets / "cloud.key"
    key_file.write_text("sk-from-file-0001\n")
    shim_instance(gw, "cloud", start_stub(stubs, "cloud"), f"file:{key_file}")
    gw.wait_applied()
    assert chat(gw) == 200

    # The file changes behind the API's back: a multi-line secret.
    key_file.write_text(f"{CANARY}-first-line\n{CANARY} second line\n")
    reload = gw.admin.post("/admin/reload")
    assert reload.status_code == 200, reload.text  # the render goes on without the instance
    reason = gw.status()["excluded"]["cloud"]
    assert "cannot be sent as a header value" in reason
    assert chat(gw) == 503
    # Later changes still apply, and the API refuses the same file for another instance, naming the field.
    shim_instance(gw, "other", start_stub(stubs, "other"), "sk-literal-key-0002", model="o")
    gw.wait_applied()
    assert chat(gw, "o") == 200
    body = {"name": "y", "provider_type": "openai", "api_key": f"file:{key_file}", "supported_models": ["m"]}
    errors = field_errors(gw.admin.post("/admin/instances", json=body))
    assert "header value" in errors["api_key"]

    # No fragment of the secret anywhere an operator or a local user could look.
    seen = {
        "/admin/status": gw.admin.get("/admin/status").text,
        "/admin/instances": gw.admin.get("/admin/instances").text,
        "/admin/instances/cloud/health": gw.admin.get("/admin/instances/cloud/health").text,
        "/admin/audit": gw.admin.get("/admin/audit").text,
        "/admin/reload": reload.text,
        "controller.log": (gw.home / "controller.log").read_text(errors="replace"),
        "error.log": (gw.home / "nginx" / "logs" / "error.log").read_text(errors="replace"),
    }
    for tree in (gw.home / "nginx" / "generations").iterdir():
        for path in tree.rglob("*"):
            if path.is_file():
                seen[str(path)] = path.read_text(errors="replace")
    assert [where for where, text in seen.items() if "CANARY" in text] == []
