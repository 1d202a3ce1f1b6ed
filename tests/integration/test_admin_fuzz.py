"""schemathesis against the admin API's own OpenAPI document, on a real controller (SQLite store, nginx).

Every operation gets positive and negative examples; every response is checked: no 5xx, status codes,
content types, headers and bodies as documented, missing auth refused. Bounded: ~25 examples per
operation (well under 90 s for the whole module).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from control_plane.api.openapi import build_openapi
from tests.integration.gateway import Gateway

# The coverage phase of the import (four media types, a deep document schema) alone sends ~2100 requests:
# it gets the fuzzing phase only, to keep the module bounded.
CONFIG = SchemathesisConfig.from_dict(
    {"operations": [{"include-operation-id": "import_config", "phases": {"coverage": {"enabled": False}}}]}
)
SCHEMA = schemathesis.openapi.from_dict(build_openapi(), config=CONFIG)
# "A schema-valid request was rejected": the import documents and migrations reject instance names that
# repeat within one document (422), which JSON Schema's uniqueItems cannot express (items differ).
NO_POSITIVE_ACCEPTANCE = frozenset({"import_config", "migrate_instances"})


def references_a_secret(case: schemathesis.Case) -> bool:
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
def test_admin_api_conforms_to_its_openapi(case: schemathesis.Case, controller: Gateway) -> None:
    operation_id = case.operation.definition.raw.get("operationId")
    positive = operation_id not in NO_POSITIVE_ACCEPTANCE and not references_a_secret(case)
    excluded = [] if positive else [positive_data_acceptance]
    case.call_and_validate(
        base_url=str(controller.admin.base_url).rstrip("/"),
        headers={"X-Admin-API-Key": controller.admin_key},
        excluded_checks=excluded,
        timeout=30,
    )
