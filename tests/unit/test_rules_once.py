"""Each rule two places use is defined once in Python and reaches nginx and Lua as rendered data (issue 18
item 1): a template, Lua module or second Python module that spells one by hand fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from control_plane.health import statuses
from control_plane.registry import validators as v
from control_plane.registry.models import InstanceConfig, ProviderType
from control_plane.render.client_access import LEAKY_PREFIXES
from control_plane.render.nginx import render
from control_plane.render.quoting import UnsafeValue, nginx_map_regex
from tests.unit.test_render import spec_for

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = sorted((ROOT / "nginx" / "templates").glob("*.j2"))
LUA = sorted((ROOT / "nginx" / "lua" / "gw").glob("*.lua"))
PYTHON = sorted((ROOT / "control_plane").rglob("*.py"))


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _spelled(paths: list[Path], needle: str, owner: Path | None = None) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths if p != owner and needle in _text(p)]


def _status_set(codes: frozenset[int]) -> re.Pattern[str]:
    """The codes listed together on one line, in any order, in any notation (a tuple, a set, Lua's or)."""
    lookaheads = "".join(rf"(?=.*\b{code}\b)" for code in sorted(codes))
    return re.compile(rf"^{lookaheads}.*$", re.MULTILINE)


def test_the_model_and_name_rules_are_spelled_once() -> None:
    owner = ROOT / "control_plane" / "registry" / "validators.py"
    for pattern in (v.MODEL_PATTERN, v.NAME_PATTERN):
        assert _spelled(TEMPLATES + LUA + PYTHON, pattern, owner) == [], pattern
        # The character class without its length, as a hand-written copy with another bound would have it.
        body = pattern[: pattern.rindex("{")]
        assert _spelled(TEMPLATES + LUA + PYTHON, body, owner) == [], body


def test_leaked_header_prefixes_are_spelled_once() -> None:
    owner = ROOT / "control_plane" / "render" / "client_access.py"
    for prefix in LEAKY_PREFIXES:
        for quoted in (f'"{prefix}"', f"'{prefix}'", f"[[{prefix}]]"):
            assert _spelled(TEMPLATES + LUA + PYTHON, quoted, owner) == [], quoted


@pytest.mark.parametrize(
    "codes", [statuses.CREDENTIAL_STATUSES, statuses.UNSUPPORTED_STATUSES], ids=["credential", "unsupported"]
)
def test_status_sets_are_spelled_once(codes: frozenset[int]) -> None:
    owner = ROOT / "control_plane" / "health" / "statuses.py"
    found = re.compile(_status_set(codes).pattern, re.MULTILINE)
    spelled = [
        f"{p.relative_to(ROOT)}: {m.group(0).strip()}"
        for p in TEMPLATES + LUA + PYTHON
        if p != owner
        for m in found.finditer(_text(p))
        if not m.group(0).lstrip().startswith(("#", "--", "{#"))
    ]
    assert spelled == []


@pytest.mark.parametrize(
    ("status", "verdict"),
    [(None, "failure"), (500, "failure"), (503, "failure"), (429, "rate_limited")]
    + [(code, "credential") for code in sorted(statuses.CREDENTIAL_STATUSES)]
    + [(code, "ok") for code in (200, 201, 204, 301, 400, 404, 405, 413, 422, 499)],
)
def test_classify_reads_the_one_table(status: int | None, verdict: str) -> None:
    assert statuses.classify(status) == verdict


def test_the_rendered_tree_carries_the_python_values() -> None:
    config = InstanceConfig(name="a", provider_type=ProviderType.OPENAI, api_key="sk-test-000000")
    tree = render(spec_for([config]))
    rendered = re.search(r'^\s*"~\^\(\?<model>(.*)\)\$" \$model;$', tree.files["edge.conf"], re.MULTILINE)
    assert rendered is not None and rendered.group(1) == v.MODEL_PATTERN
    assert json.loads(tree.files["routes.json"])["leaky_prefixes"] == list(LEAKY_PREFIXES)
    # gw.gateway takes the prefixes from the data file, and matches them as plain text.
    gateway = _text(ROOT / "nginx" / "lua" / "gw" / "gateway.lua")
    assert "routes.leaky_prefixes" in gateway


def test_map_regex_refuses_what_could_leave_its_string() -> None:
    assert nginx_map_regex("[a-z]{1,3}", "x") == '"~^(?<x>[a-z]{1,3})$" '.strip()
    assert nginx_map_regex('a"b', "x") == '"~^(?<x>a\\"b)$"'
    for pattern, group in (("a$b", "x"), ("a\nb", "x"), ("a", "X>"), ("a", "")):
        with pytest.raises(UnsafeValue):
            nginx_map_regex(pattern, group)
