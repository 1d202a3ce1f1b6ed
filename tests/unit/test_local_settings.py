"""The settings of issue 19's local-user items: the log stream's address, secret directories, the cap."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from control_plane.settings import Settings


def test_the_log_stream_defaults_to_a_unix_socket_in_the_run_dir(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    assert settings.log_address == f"unix:{tmp_path}/run/log.sock"
    assert Settings(home=tmp_path, run_dir=tmp_path / "r").log_address == f"unix:{tmp_path}/r/log.sock"
    assert Settings(home=tmp_path, log_listen="127.0.0.1:9514").log_address == "127.0.0.1:9514"
    assert Settings(home=tmp_path, log_listen="unix:/run/x/log.sock").log_address == "unix:/run/x/log.sock"


@pytest.mark.parametrize("value", ["0.0.0.0:9514", "unix:relative.sock", "unix:/a b", "unix:/" + "a" * 101])
def test_the_log_stream_stays_on_this_host(value: str) -> None:
    with pytest.raises(ValidationError):
        Settings(log_listen=value)


def test_secret_dirs_and_the_retry_after_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(home=tmp_path)
    assert settings.secret_directories == [tmp_path / "secrets" / "providers"]
    assert settings.max_retry_after_s == 300
    monkeypatch.setenv("ISHGW_SECRET_DIRS", "/etc/ish/keys, /run/secrets")
    policy = Settings(home=tmp_path).secret_policy()
    assert policy.dirs == (Path("/etc/ish/keys"), Path("/run/secrets"))
    assert policy.provider_env == tmp_path / "provider.env"
