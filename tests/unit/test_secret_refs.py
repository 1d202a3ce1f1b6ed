"""Secret references: where file: and env: may point, what a usable secret is, and that no message ever
holds a fragment of one. Real files, symlinks and a FIFO under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from control_plane import secret_refs
from control_plane.local_access import nginx_workers
from control_plane.secret_refs import SecretPolicy, check_reference, provider_env_names, resolve

CANARY = "CANARY-xyz-0815"


@pytest.fixture
def policy(tmp_path: Path) -> SecretPolicy:
    secrets = tmp_path / "secrets" / "providers"
    secrets.mkdir(parents=True)
    (tmp_path / "outside.key").write_text("sk-outside-0001\n")
    (secrets / "good.key").write_text("sk-good-0001\n")
    (secrets / "multi.key").write_text(f"{CANARY}\nsecond {CANARY}\n")
    (secrets / "to-outside").symlink_to(tmp_path / "outside.key")
    (secrets / "inner").mkdir()
    (secrets / "to-inside").symlink_to(secrets / "good.key")
    os.mkfifo(secrets / "fifo")
    env = tmp_path / "provider.env"
    env.write_text("# provider keys\nOPENAI_KEY=x\nANTHROPIC_KEY=y\nISHGW_ADMIN_API_KEY=z\n")
    environ = {"OPENAI_KEY": "sk-env-0001", "ANTHROPIC_KEY": f"{CANARY} two words", "HOME": "/root"}
    return SecretPolicy((secrets,), env, environ)


def test_provider_env_names_never_include_gateway_settings(policy: SecretPolicy) -> None:
    assert provider_env_names(policy.provider_env) == {"OPENAI_KEY", "ANTHROPIC_KEY"}
    assert provider_env_names(None) == frozenset()
    assert provider_env_names(Path("/nonexistent/provider.env")) == frozenset()


def test_references_inside_the_secret_dirs_resolve(policy: SecretPolicy) -> None:
    secrets = policy.dirs[0]
    assert resolve(f"file:{secrets}/good.key", policy) == ("sk-good-0001", None)
    assert resolve(f"file:{secrets}/inner/../good.key", policy) == ("sk-good-0001", None)
    assert resolve(f"file:{secrets}/to-inside", policy) == ("sk-good-0001", None)
    assert resolve("env:OPENAI_KEY", policy) == ("sk-env-0001", None)
    assert resolve("sk-literal-0001", policy) == ("sk-literal-0001", None)


@pytest.mark.parametrize(
    ("reference", "why"),
    [
        ("file:{tmp}/outside.key", "not inside ISHGW_SECRET_DIRS"),
        ("file:{secrets}/../../outside.key", "not inside ISHGW_SECRET_DIRS"),
        ("file:{secrets}/to-outside", "not inside ISHGW_SECRET_DIRS"),
        ("file:/etc/passwd", "not inside ISHGW_SECRET_DIRS"),
        ("file:{secrets}/fifo", "not a regular file"),
        ("file:{secrets}/missing.key", "cannot be read"),
        ("file:{secrets}/multi.key", "cannot be sent as a header value"),
        ("env:ISHGW_ADMIN_API_KEY", "gateway setting"),
        ("env:HOME", "not defined in"),
        ("env:ANTHROPIC_KEY", "cannot be sent as a header value"),
    ],
)
def test_refused_references_say_why_and_nothing_of_the_secret(
    policy: SecretPolicy, tmp_path: Path, reference: str, why: str
) -> None:
    reference = reference.format(tmp=tmp_path, secrets=policy.dirs[0])
    value, problem = resolve(reference, policy)
    assert value is None and problem is not None and why in problem
    assert CANARY not in problem and "sk-outside" not in problem


def test_the_api_check_accepts_a_file_not_there_yet_and_refuses_what_resolve_refuses(
    policy: SecretPolicy, tmp_path: Path
) -> None:
    secrets = policy.dirs[0]
    assert check_reference(f"file:{secrets}/later.key", policy) is None  # left out until it exists
    assert check_reference(f"file:{secrets}/good.key", policy) is None
    assert check_reference("sk-literal-0001", policy) is None and check_reference(None, policy) is None
    assert "not inside" in (check_reference(f"file:{tmp_path}/outside.key", policy) or "")
    assert "not inside" in (check_reference(f"file:{secrets}/to-outside", policy) or "")
    problem = check_reference(f"file:{secrets}/multi.key", policy) or ""
    assert "header value" in problem and CANARY not in problem
    assert "gateway setting" in (check_reference("env:ISHGW_ADMIN_API_KEY", policy) or "")
    # env: values are read at reconcile time: the API checks the name only.
    assert check_reference("env:ANTHROPIC_KEY", policy) is None


def test_no_secret_dirs_switch_file_references_off(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("sk-0001\n")
    value, problem = resolve(f"file:{tmp_path}/k", SecretPolicy())
    assert value is None and "switched off" in (problem or "")
    assert resolve("env:X", SecretPolicy(environ={"X": "sk-0001"})).value is None


def test_a_file_larger_than_the_limit_is_refused(policy: SecretPolicy) -> None:
    big = policy.dirs[0] / "big.key"
    big.write_text("a" * (secret_refs.MAX_SECRET_FILE + 1))
    assert "larger than" in (resolve(f"file:{big}", policy).problem or "")


def test_workers_are_the_controller_itself_unless_it_is_root() -> None:
    assert nginx_workers("www-data", euid=1000).gid is None
    root = nginx_workers(None, euid=0)  # nginx's own default, named explicitly
    assert root.user == "nobody" and root.group and root.gid is not None
    with pytest.raises(ValueError, match="no user"):
        nginx_workers("no-such-user-here", euid=0)
