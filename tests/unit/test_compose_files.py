"""The compose files against the settings they document (pure: no engine)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from control_plane.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = ROOT / "compose" / ".env.example"


def example_lines() -> dict[str, int]:
    """ISHGW_* name -> line number of its (possibly commented) NAME=value line in .env.example."""
    found: dict[str, int] = {}
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        match = re.fullmatch(r"(?:# )?(ISHGW_[A-Z0-9_]+)=.*", line)
        if match:
            found[match.group(1)] = number
    return found


def test_env_example_documents_every_setting_line_by_line() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    documented = example_lines()
    expected = {"ISHGW_" + name.upper() for name in Settings.model_fields}
    assert sorted(expected - set(documented)) == []
    assert sorted(set(documented) - expected) == [], "a line names no setting of the controller"
    for name, number in documented.items():
        comment = lines[number - 2]
        assert comment.startswith("# ") and "=" not in comment.split()[1], f"{name}: no comment line above it"


def test_env_example_active_lines_parse_as_settings() -> None:
    """The uncommented ISHGW_* lines are valid values (no empty NAME=, which is not the default)."""
    active: dict[str, Any] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.startswith("ISHGW_"):
            name, value = line.split("=", 1)
            assert value, f"{name} is empty"
            active[name.removeprefix("ISHGW_").lower()] = value
    Settings(**active)


def test_compose_file_shape() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    assert "profiles" not in services["gateway"]
    assert services["gateway"]["build"]["dockerfile"] == "compose/gateway/Dockerfile"
    assert services["postgres"]["profiles"] == ["postgres"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    assert "gateway-state:/var/lib/ish-gateway" in services["gateway"]["volumes"]
    dockerfile = (ROOT / "compose" / "gateway" / "Dockerfile").read_text()
    assert re.search(r"^FROM debian:bookworm-slim$", dockerfile, re.M)
    assert re.search(r"^HEALTHCHECK [^\n]*\\\n[^\n]*/health", dockerfile, re.M)
