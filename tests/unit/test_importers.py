"""Import/export of the registry: the versioned document, legacy files and Ollama lists."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_plane.errors import InvalidInput
from control_plane.registry import importers
from control_plane.registry import validators as v
from control_plane.registry.models import (
    HealthStatus,
    InstanceConfig,
    InstanceState,
    InstanceType,
    OperatorStatus,
    ProbeKind,
    ProviderType,
    RoutingConfig,
    Strategy,
    mask_secret,
)

LITERAL_KEY = "sk-proj-abcdefghijklmnop1234"


def fields(exc: pytest.ExceptionInfo[InvalidInput]) -> set[str]:
    return {error["field"] for error in exc.value.errors}


def messages(exc: pytest.ExceptionInfo[InvalidInput]) -> dict[str, str]:
    return {error["field"]: error["message"] for error in exc.value.errors}


@pytest.fixture
def configs() -> list[InstanceConfig]:
    return [
        InstanceConfig(
            name="azure-east",
            provider_type=ProviderType.AZURE,
            api_key=LITERAL_KEY,
            api_base="https://east.openai.azure.com",
            api_version="2024-06-01",
            priority=1,
            weight=5,
            max_tpm=240_000,
            max_rpm=1_440,
            supported_models=["gpt-4o", "gpt-4o-mini"],
            model_deployments={"gpt-4o": "gpt4o-prod"},
            tags=["region=east", "tier:gold"],
            cost_per_1k_tokens=0.005,
            quality_score=92.5,
        ),
        InstanceConfig(
            name="anthropic-main",
            provider_type=ProviderType.ANTHROPIC,
            api_key="env:ANTHROPIC_API_KEY",
            supported_models=["claude-3-5-sonnet-20241022"],
            instance_type=InstanceType.CHAT,
        ),
        InstanceConfig(
            name="ollama-local",
            provider_type=ProviderType.OLLAMA,
            api_base="http://127.0.0.1:11434",
            supported_models=["llama3.1:8b", "nomic-embed-text"],
            instance_type=InstanceType.BOTH,
            enabled=False,
            timeout_seconds=30.5,
        ),
        InstanceConfig(name="short-key", provider_type=ProviderType.OPENAI, api_key="sk-short"),
    ]


@pytest.fixture
def routing() -> RoutingConfig:
    return RoutingConfig(
        model_aliases={"gpt4": "gpt-4o", "sonnet": "claude-3-5-sonnet-20241022"},
        default_strategy=Strategy.LEAST_CONNECTIONS,
        strategies={"gpt-4o": Strategy.SESSION},
        session_header="X-Conversation-Id",
    )


# -- export / dump / load / parse ----------------------------------------------------------------------------


def test_export_masks_literal_keys_and_keeps_references(
    configs: list[InstanceConfig], routing: RoutingConfig
) -> None:
    doc = importers.export_document(configs, routing)
    assert doc["version"] == 1
    assert doc["routing"] == routing.model_dump(mode="json")
    keys = {item["name"]: item["api_key"] for item in doc["instances"]}
    assert keys == {
        "azure-east": "****1234",
        "anthropic-main": "env:ANTHROPIC_API_KEY",
        "ollama-local": None,
        "short-key": "****",
    }
    assert LITERAL_KEY not in json.dumps(doc)
    # The input objects are not modified.
    assert configs[0].api_key == LITERAL_KEY


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_round_trip_restores_keys(fmt: str, configs: list[InstanceConfig], routing: RoutingConfig) -> None:
    text = importers.dump(importers.export_document(configs, routing), fmt)
    assert LITERAL_KEY not in text
    parsed, parsed_routing = importers.parse_document(importers.load(text, fmt), {c.name: c for c in configs})
    assert parsed == configs
    assert parsed_routing == routing


def test_dump_json_is_indented_and_sorted(configs: list[InstanceConfig], routing: RoutingConfig) -> None:
    text = importers.dump(importers.export_document(configs, routing), "json")
    assert text.startswith('{\n  "instances": [')
    top = list(json.loads(text))
    assert top == sorted(top)


def test_dump_yaml_is_safe_yaml(configs: list[InstanceConfig], routing: RoutingConfig) -> None:
    text = importers.dump(importers.export_document(configs, routing), "yaml")
    assert "!!python" not in text
    assert yaml.safe_load(text)["version"] == 1


def test_masked_key_for_new_instance_becomes_none() -> None:
    doc = {
        "version": 1,
        "instances": [{"name": "brand-new", "provider_type": "openai", "api_key": "****9999"}],
    }
    parsed, routing = importers.parse_document(doc, {})
    assert parsed[0].api_key is None
    assert routing is None


def test_clear_key_in_document_replaces_existing() -> None:
    existing = {"a": InstanceConfig(name="a", provider_type=ProviderType.OPENAI, api_key=LITERAL_KEY)}
    doc = {
        "version": 1,
        "instances": [{"name": "a", "provider_type": "openai", "api_key": "sk-new-key-0000"}],
    }
    parsed, _ = importers.parse_document(doc, existing)
    assert parsed[0].api_key == "sk-new-key-0000"


def test_empty_instances_allowed_but_required() -> None:
    assert importers.parse_document({"version": 1, "instances": []}, {}) == ([], None)
    with pytest.raises(InvalidInput) as exc:
        importers.parse_document({"version": 1, "routing": {}}, {})
    assert fields(exc) == {"instances"}


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        ("{not json", "json"),
        ("[1, 2]", "json"),
        ('"just a string"', "json"),
        ("key: [unclosed", "yaml"),
        ("- a\n- b\n", "yaml"),
        ("", "yaml"),
        ("!!python/object:os.system {}", "yaml"),
    ],
)
def test_load_rejects_bad_bodies(text: str, fmt: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        importers.load(text, fmt)
    assert fields(exc) == {"body"}


def test_unknown_format_rejected() -> None:
    with pytest.raises(InvalidInput) as exc:
        importers.load("{}", "toml")
    assert fields(exc) == {"format"}
    with pytest.raises(InvalidInput):
        importers.dump({}, "xml")


def test_errors_are_aggregated_with_field_paths() -> None:
    doc: dict[str, Any] = {
        "version": 1,
        "routing": {"default_strategy": "fastest", "session_header": "X Bad"},
        "instances": [
            {"name": "ok", "provider_type": "openai"},
            {"name": "bad weight", "provider_type": "openai", "weight": 0},
            {"name": "c", "provider_type": "nope", "weight": 0, "supported_models": ["ok", "bad model"]},
            {"name": "ok", "provider_type": "openai"},
            "not-an-object",
            {
                "name": "d",
                "provider_type": "openai",
                "api_base": "ftp://x",
                "model_deployments": {"m": "bad dep"},
            },
            {"name": "e", "provider_type": "openai", "surprise": 1},
        ],
        "extra": True,
    }
    with pytest.raises(InvalidInput) as exc:
        importers.parse_document(doc, {})
    got = messages(exc)
    assert set(got) == {
        "extra",
        "routing.default_strategy",
        "routing.session_header",
        "instances[1].name",
        "instances[1].weight",
        "instances[2].provider_type",
        "instances[2].weight",
        "instances[2].supported_models[1]",
        "instances[3].name",
        "instances[4]",
        "instances[5].api_base",
        "instances[5].model_deployments",
        "instances[6].surprise",
    }
    assert "duplicate" in got["instances[3].name"]
    assert got["instances[1].weight"] == "Input should be greater than or equal to 1"
    assert got["instances[5].api_base"] == "URL scheme must be http or https"
    assert not any(message.startswith("Value error") for message in got.values())
    assert "instances[1].weight" in str(exc.value)


def test_unsupported_version() -> None:
    with pytest.raises(InvalidInput) as exc:
        importers.parse_document({"version": 2, "instances": []}, {})
    assert fields(exc) == {"version"}


def test_bad_dict_key_reported() -> None:
    doc = {
        "version": 1,
        "instances": [{"name": "a", "provider_type": "openai", "model_deployments": {"b m": "d"}}],
    }
    with pytest.raises(InvalidInput) as exc:
        importers.parse_document(doc, {})
    assert fields(exc) == {"instances[0].model_deployments.b m[key]"}


# -- legacy ------------------------------------------------------------------------------------------------

LEGACY_CONFIGS: dict[str, Any] = {
    "azure-gpt4": {
        "name": "azure-gpt4",
        "provider_type": "azure_openai",
        "api_key": "0123456789abcdef0123456789abcdef",
        "api_base": "https://my-res.openai.azure.com/",
        "api_version": "2024-02-15-preview",
        "priority": "1",
        "weight": "3",
        "max_tpm": "120000",
        "max_rpm": 720,
        "max_input_tokens": None,
        "supported_models": "gpt-4, gpt-4-32k ,gpt-35-turbo,",
        "model_deployments": {"gpt-4": "gpt4-deploy"},
        "enabled": "true",
        "timeout_seconds": "60",
        "retry_count": 3,
        "rate_limit_enabled": True,
        "created_at": "2023-11-02T10:00:00",
        "instance_type": "chat",
    },
    "local-llm": {
        "provider_type": "openai-compatible",
        "api_base": "http://10.1.2.3:8000/v1",
        "api_key": "",
        "supported_models": ["mistral-7b-instruct"],
        "weight": 2.0,
    },
    "glm": {
        "name": "glm-4-prod",
        "provider_type": "ZhipuAI",
        "api_key": "env:ZHIPU_KEY",
        "supported_models": [],
    },
    "custom-one": {
        "provider_type": "custom",
        "api_base": "https://llm.internal.example.com",
        "enabled": False,
    },
    "embedder": {"provider_type": "ollama", "api_base": "http://gpu1:11434", "instance_type": "embeddings"},
}

LEGACY_STATES: dict[str, Any] = {
    "azure-gpt4": {
        "status": "healthy",  # an old status value: not an OperatorStatus, dropped
        "health_status": "healthy",
        "error_count": 2,
        "last_error": "timeout",
        "last_error_time": "2024-05-01T12:00:00+00:00",
        "total_requests": 1000,
        "successful_requests": "998",
        "current_tpm": 500,
        "avg_latency_ms": 812.5,
        "rate_limited_until": None,
        "last_used": 1714564800,
        "some_internal_counter": 7,
    },
    "local-llm": {"status": "maintenance", "health_status": "sideways", "error_count": "many"},
    "glm-4-prod": {"status": "draining"},
    "ghost": {"status": "active"},
    "custom-one": "garbage",
}


def test_parse_legacy_sample() -> None:
    result = importers.parse_legacy(LEGACY_CONFIGS, LEGACY_STATES, {})
    by_name = {config.name: (config, state) for config, state in result}
    assert [config.name for config, _ in result] == [
        "azure-gpt4",
        "local-llm",
        "glm-4-prod",
        "custom-one",
        "embedder",
    ]

    azure, azure_state = by_name["azure-gpt4"]
    assert azure.provider_type is ProviderType.AZURE
    assert azure.api_base == "https://my-res.openai.azure.com"
    assert (azure.priority, azure.weight, azure.max_tpm, azure.max_rpm) == (1, 3, 120_000, 720)
    assert azure.max_input_tokens == 0
    assert azure.supported_models == ["gpt-4", "gpt-4-32k", "gpt-35-turbo"]
    assert azure.model_deployments == {"gpt-4": "gpt4-deploy"}
    assert azure.timeout_seconds == 60.0
    assert azure.api_key == "0123456789abcdef0123456789abcdef"
    assert azure_state is not None
    assert azure_state.status is OperatorStatus.ACTIVE  # unknown value dropped -> default
    assert azure_state.health_status is HealthStatus.HEALTHY
    assert (azure_state.error_count, azure_state.total_requests, azure_state.successful_requests) == (
        2,
        1000,
        998,
    )
    assert azure_state.last_error == "timeout"
    assert azure_state.last_error_time is not None and azure_state.last_error_time.year == 2024
    assert azure_state.last_used is not None

    local, local_state = by_name["local-llm"]
    assert local.provider_type is ProviderType.OPENAI_COMPATIBLE
    assert local.api_key is None
    assert local.weight == 2
    assert local_state is not None
    assert local_state.status is OperatorStatus.MAINTENANCE
    assert local_state.health_status is HealthStatus.UNKNOWN
    assert local_state.error_count == 0

    glm, glm_state = by_name["glm-4-prod"]
    assert glm.provider_type is ProviderType.ZAI
    assert glm_state is not None and glm_state.status is OperatorStatus.DRAINING

    custom, custom_state = by_name["custom-one"]
    assert custom.provider_type is ProviderType.OPENAI_COMPATIBLE and custom.enabled is False
    assert custom_state is None

    embedder, embedder_state = by_name["embedder"]
    assert embedder.instance_type is InstanceType.EMBEDDING
    assert embedder_state is None


def test_parse_legacy_without_states() -> None:
    result = importers.parse_legacy(LEGACY_CONFIGS, None, {})
    assert all(state is None for _, state in result)


def test_parse_legacy_masked_key_keeps_existing() -> None:
    existing = {"a": InstanceConfig(name="a", provider_type=ProviderType.OPENAI, api_key=LITERAL_KEY)}
    configs = {
        "a": {"provider_type": "openai", "api_key": mask_secret(LITERAL_KEY)},
        "b": {"provider_type": "openai", "api_key": "****"},
    }
    result = importers.parse_legacy(configs, None, existing)
    assert [config.api_key for config, _ in result] == [LITERAL_KEY, None]


def test_parse_legacy_collects_all_errors() -> None:
    configs: dict[str, Any] = {
        "my-inst": {"provider_type": "openai", "weight": "heavy", "priority": 500},
        "bad name!": {"provider_type": "openai"},
        "no-type": {"api_base": "http://x:1"},
        "weird": {"provider_type": "mystery", "timeout_seconds": -1},
        "dup-a": {"name": "same", "provider_type": "openai"},
        "dup-b": {"name": "same", "provider_type": "openai"},
        "listy": ["not", "an", "object"],
        "fine": {"provider_type": "vllm"},
    }
    with pytest.raises(InvalidInput) as exc:
        importers.parse_legacy(configs, {}, {})
    got = messages(exc)
    assert set(got) == {
        "configs.my-inst.weight",
        "configs.my-inst.priority",
        "configs.bad name!.name",
        "configs.no-type.provider_type",
        "configs.weird.provider_type",
        "configs.weird.timeout_seconds",
        "configs.dup-b.name",
        "configs.listy",
    }
    assert "unable to parse string as an integer" in got["configs.my-inst.weight"]
    assert got["configs.no-type.provider_type"] == "Field required"


def test_parse_legacy_rejects_non_objects() -> None:
    with pytest.raises(InvalidInput) as exc:
        importers.parse_legacy([], None, {})  # type: ignore[arg-type]
    assert fields(exc) == {"configs"}
    with pytest.raises(InvalidInput) as exc:
        importers.parse_legacy({}, [], {})  # type: ignore[arg-type]
    assert fields(exc) == {"states"}


# -- Ollama lists ------------------------------------------------------------------------------------------


def test_parse_ollama_list() -> None:
    items = [
        {
            "base_url": "http://10.0.0.5:11434",
            "name": "",
            "api_key": None,
            "instance_type": "chat",
            "enabled": True,
        },
        {
            "base_url": "http://gpu-box.lan:11434/",
            "name": "gpu-box",
            "instance_type": "embedding",
            "enabled": False,
        },
        {"base_url": "https://ollama.example.com", "api_key": "secret-token-123456", "instance_type": "both"},
        {"base_url": "http://[fd00::1]:8080", "models": ["ignored"]},
    ]
    result = importers.parse_ollama_list(items)
    assert [c.name for c in result] == [
        "ollama-10-0-0-5-11434",
        "gpu-box",
        "ollama-ollama-example-com-443",
        "ollama-fd00-1-8080",
    ]
    assert all(c.provider_type is ProviderType.OLLAMA for c in result)
    assert result[0].api_base == "http://10.0.0.5:11434"
    assert result[1].api_base == "http://gpu-box.lan:11434"
    assert result[1].instance_type is InstanceType.EMBEDDING and result[1].enabled is False
    assert result[2].api_key == "secret-token-123456"
    assert result[2].instance_type is InstanceType.BOTH
    assert result[3].instance_type is InstanceType.CHAT and result[3].enabled is True


def test_parse_ollama_list_errors() -> None:
    items: list[Any] = [
        {"name": "no-url"},
        {"base_url": "ftp://host:21"},
        {"base_url": "http://h:1", "instance_type": "vision", "name": "x"},
        {"base_url": "http://h:1"},
        {"base_url": "http://h:1"},
        42,
    ]
    with pytest.raises(InvalidInput) as exc:
        importers.parse_ollama_list(items)
    assert fields(exc) == {
        "items[0].base_url",
        "items[1].base_url",
        "items[2].instance_type",
        "items[4].name",
        "items[5]",
    }
    with pytest.raises(InvalidInput):
        importers.parse_ollama_list({"base_url": "http://h:1"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("http://localhost:11434", "ollama-localhost-11434"),
        ("http://LOCALHOST", "ollama-localhost-80"),
        ("http://[::1]:11434", "ollama-1-11434"),
        ("http://" + "a" * 63 + ".example.com:11434", "ollama-" + "a" * 50 + "-11434"),
    ],
)
def test_ollama_name(url: str, name: str) -> None:
    derived = importers.ollama_name(url)
    assert derived == name
    assert v.NAME_RE.match(derived)


# -- properties --------------------------------------------------------------------------------------------

names = st.from_regex(v.NAME_RE, fullmatch=True)
models = st.from_regex(v.MODEL_RE, fullmatch=True)
secrets = st.one_of(
    st.none(),
    st.from_regex(v.SECRET_RE, fullmatch=True),
    st.from_regex(v.SECRET_REF_RE, fullmatch=True),
)
bases = st.sampled_from(
    [
        None,
        "http://127.0.0.1:11434",
        "https://api.openai.com/v1",
        "http://[::1]:8000",
        "https://a.b-c.example/x_y",
    ]
)
floats = st.floats(min_value=0, max_value=10_000, allow_nan=False, allow_infinity=False)

instance_configs = st.builds(
    InstanceConfig,
    name=names,
    provider_type=st.sampled_from(ProviderType),
    api_key=secrets,
    api_base=bases,
    api_version=st.one_of(st.none(), st.from_regex(v.API_VERSION_RE, fullmatch=True)),
    priority=st.integers(0, 100),
    weight=st.integers(1, 1000),
    max_tpm=st.integers(0, 10**10),
    max_rpm=st.integers(0, 10**8),
    max_input_tokens=st.integers(0, 10**8),
    supported_models=st.lists(models, max_size=4),
    model_deployments=st.dictionaries(models, st.from_regex(v.DEPLOYMENT_RE, fullmatch=True), max_size=3),
    enabled=st.booleans(),
    timeout_seconds=st.floats(min_value=0, max_value=3600, exclude_min=True, allow_nan=False),
    retry_count=st.integers(0, 10),
    instance_type=st.sampled_from(InstanceType),
    max_concurrent_requests=st.integers(0, 100_000),
    cost_per_1k_tokens=floats,
    quality_score=st.floats(min_value=0, max_value=100, allow_nan=False),
    tags=st.lists(st.from_regex(v.TAG_RE, fullmatch=True), max_size=4),
)
routings = st.builds(
    RoutingConfig,
    model_aliases=st.dictionaries(models, models, max_size=3),
    default_strategy=st.sampled_from(Strategy),
    strategies=st.dictionaries(models, st.sampled_from(Strategy), max_size=3),
    session_header=st.from_regex(v.HEADER_NAME_RE, fullmatch=True),
)
config_lists = st.lists(instance_configs, max_size=5, unique_by=lambda c: c.name)
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(configs=config_lists, routing=routings, fmt=st.sampled_from(["json", "yaml"]))
def test_property_round_trip(configs: list[InstanceConfig], routing: RoutingConfig, fmt: str) -> None:
    text = importers.dump(importers.export_document(configs, routing), fmt)
    parsed, parsed_routing = importers.parse_document(importers.load(text, fmt), {c.name: c for c in configs})
    assert parsed == configs
    assert parsed_routing == routing


@PROPERTY
@given(configs=config_lists)
def test_property_export_never_leaks_literal_keys(configs: list[InstanceConfig]) -> None:
    doc = importers.export_document(configs, RoutingConfig())
    for config, item in zip(configs, doc["instances"], strict=True):
        key = config.api_key
        if key is None or v.SECRET_REF_RE.match(key):
            assert item["api_key"] == key
        else:
            assert item["api_key"].startswith("****")
            assert len(item["api_key"]) <= 8
    # Import without the gateway's keys: literal keys are gone, references survive.
    parsed, _ = importers.parse_document(doc, {})
    for config, back in zip(configs, parsed, strict=True):
        expected = config.api_key if config.api_key and v.SECRET_REF_RE.match(config.api_key) else None
        assert back.api_key == expected


@PROPERTY
@given(configs=config_lists)
def test_property_legacy_accepts_stringified_values(configs: list[InstanceConfig]) -> None:
    legacy: dict[str, Any] = {}
    for config in configs:
        raw = config.model_dump(mode="json")
        for field in ("priority", "weight", "max_tpm", "max_rpm", "retry_count", "timeout_seconds"):
            raw[field] = str(raw[field])
        raw["enabled"] = str(raw["enabled"]).lower()
        raw["supported_models"] = ",".join(raw["supported_models"])
        raw["legacy_only_field"] = "ignored"
        del raw["name"]
        legacy[config.name] = raw
    result = importers.parse_legacy(legacy, None, {})
    assert [config for config, _ in result] == configs


@PROPERTY
@given(state=st.builds(InstanceState, last_error=st.one_of(st.none(), st.text(max_size=20))))
def test_property_legacy_state_round_trip(state: InstanceState) -> None:
    result = importers.parse_legacy(
        {"a": {"provider_type": "openai"}}, {"a": state.model_dump(mode="json")}, {}
    )
    assert result[0][1] == state


@PROPERTY
@given(
    junk=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8), st.lists, max_leaves=5)
)
def test_property_parse_document_only_raises_invalid_input(junk: Any) -> None:
    for doc in ({"version": 1, "instances": junk}, {"version": 1, "instances": [junk], "routing": junk}):
        try:
            importers.parse_document(doc, {})
        except InvalidInput as exc:
            assert exc.errors and all(set(e) == {"field", "message"} for e in exc.errors)


def test_documents_are_typed_strictly_in_one_pass() -> None:
    """As strict as the admin API (no string-to-number coercion), and every problem reported at once."""
    doc = {
        "version": 1,
        "routing": {"default_strategy": "weighted", "session_header": 5},
        "instances": [
            {"name": "a", "provider_type": "openai", "weight": "5"},
            {"name": "b", "provider_type": "openai", "weight": 0, "enabled": "yes"},
            {"name": "c", "provider_type": "openai", "supported_models": ["ok", 7]},
        ],
    }
    with pytest.raises(InvalidInput) as exc:
        importers.parse_document(doc, {})
    assert fields(exc) == {
        "routing.session_header",
        "instances[0].weight",
        "instances[1].weight",
        "instances[1].enabled",
        "instances[2].supported_models[1]",
    }
    fine = {"version": 1, "instances": [{"name": "a", "provider_type": "openai", "weight": 5}]}
    assert importers.parse_document(fine, {})[0][0].weight == 5


def test_the_legacy_probe_tag_becomes_the_field_in_every_import() -> None:
    item = {"name": "rag", "provider_type": "openai_compatible", "api_base": "http://h:9621"}
    tagged = {**item, "tags": ["probe=lightrag", "team"]}
    document, _ = importers.parse_document({"version": 1, "instances": [tagged]}, {})
    legacy = importers.parse_legacy({"rag": {**item, "tags": "probe=lightrag, team"}}, None, {})
    ollama = importers.parse_ollama_list(
        [{"base_url": "http://h:9621", "name": "rag", "tags": "probe=lightrag,team"}]
    )
    for config in (document[0], legacy[0][0], ollama[0]):
        assert config.health.probe_kind is ProbeKind.LIGHTRAG and config.tags == ["team"]
    exported = importers.export_document(document, RoutingConfig())["instances"][0]
    assert exported["health"]["probe_kind"] == "lightrag" and exported["tags"] == ["team"]
    assert importers.parse_document({"version": 1, "instances": [exported]}, {})[0] == document


def test_spellings_are_normalised_by_one_rule_for_legacy_and_ollama_lists() -> None:
    legacy = importers.parse_legacy(
        {
            "x": {
                "provider_type": "Azure-OpenAI",
                "api_base": "https://h",
                "instance_type": " Embeddings ",
                "supported_models": "a, b,,c",
            }
        },
        None,
        {},
    )[0][0]
    assert legacy.provider_type is ProviderType.AZURE and legacy.instance_type is InstanceType.EMBEDDING
    assert legacy.supported_models == ["a", "b", "c"]
    ollama = importers.parse_ollama_list(
        [{"base_url": "http://h:1", "instance_type": "COMPLETIONS", "supported_models": "a, b,,c"}]
    )[0]
    assert ollama.instance_type is InstanceType.CHAT and ollama.supported_models == ["a", "b", "c"]


def test_aliases_expanding_past_the_limit_are_refused_before_validation() -> None:
    """Strict validation writes the document out as JSON, which would expand YAML aliases: a billion laughs
    is refused at once instead, on ``body``; shared containers are measured once, not expanded."""
    text = "a: &a [" + ", ".join(["lol"] * 9) + "]\n"
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]\n"
    for last in ("version: 1\ninstances: []\n", "version: 1\ninstances: *i\n", "instances: [{tags: *i}]\n"):
        doc = importers.load(text + last, "yaml")
        assert importers.expanded_size(doc, importers.MAX_VALUES) == importers.MAX_VALUES + 1
        with pytest.raises(InvalidInput) as exc:
            importers.parse_document(doc, {})
        assert fields(exc) == {"body"}
    shared = [1, 2, 3]
    assert importers.expanded_size({"x": [shared, shared], "y": "z"}, 100) == 1 + (1 + 4 + 4) + 1
    assert importers.expanded_size("scalar", 100) == 1
