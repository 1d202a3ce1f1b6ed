"""Import and export of the registry: the versioned document, the legacy two-file format and Ollama lists.

Pure functions: nothing here reads files or the database. Every parser validates everything it is given and
raises one ``InvalidInput`` listing all problems, each with a field path such as ``instances[2].weight`` or
``configs.my-inst.weight``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError

from control_plane.errors import InvalidInput
from control_plane.registry import validators as v
from control_plane.registry.models import (
    HealthStatus,
    InstanceConfig,
    InstanceState,
    OperatorStatus,
    ProviderType,
    RoutingConfig,
    is_masked,
    mask_secret,
)
from control_plane.scaling.model import ScalingGroup

DOCUMENT_VERSION = 1
FORMATS = ("json", "yaml")
# A registry document nests a few levels (instances[2].supported_models[0]); anything deeper is refused
# before it reaches code that recurses.
MAX_DEPTH = 32
# ... and holds no more values than a 1 MiB body can spell out: YAML aliases (a billion laughs) are refused
# before strict validation writes the document out as JSON, which would expand them.
MAX_VALUES = 1 << 20
# libyaml's parser: fast, and it refuses absurd nesting itself (PyYAML's pure-Python scanner spends seconds
# on 10,000 nested '[' before it fails).
SAFE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

PROVIDER_ALIASES: dict[str, ProviderType] = {
    "azure_openai": ProviderType.AZURE,
    "azure-openai": ProviderType.AZURE,
    "azureopenai": ProviderType.AZURE,
    "openai-compatible": ProviderType.OPENAI_COMPATIBLE,
    "openai_compat": ProviderType.OPENAI_COMPATIBLE,
    "custom": ProviderType.OPENAI_COMPATIBLE,
    "zhipuai": ProviderType.ZAI,
    "zhipu": ProviderType.ZAI,
    "z.ai": ProviderType.ZAI,
    "z-ai": ProviderType.ZAI,
}
INSTANCE_TYPE_ALIASES = {"embeddings": "embedding", "completion": "chat", "completions": "chat"}
ALIASES: dict[str, Mapping[str, str]] = {
    "provider_type": PROVIDER_ALIASES,
    "instance_type": INSTANCE_TYPE_ALIASES,
}
LIST_FIELDS = ("supported_models", "tags")
CONFIG_FIELDS = frozenset(InstanceConfig.model_fields)
STATE_FIELDS = frozenset(InstanceState.model_fields)

Errors = list[dict[str, str]]
log = logging.getLogger(__name__)


# -- helpers ---------------------------------------------------------------------------------------------


def _path(prefix: str, loc: tuple[int | str, ...] | list[int | str]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += "[key]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(error: Any) -> str:
    msg = str(error.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def _errors(prefix: str, exc: ValidationError, rename: dict[str, str] | None = None) -> Errors:
    out: Errors = []
    for error in exc.errors():
        loc = list(error["loc"])
        if rename and loc and isinstance(loc[0], str):
            loc[0] = rename.get(loc[0], loc[0])
        out.append({"field": _path(prefix, loc), "message": _message(error)})
    return out


def _duplicate(prefix: str, name: str, other: str) -> dict[str, str]:
    return {"field": f"{prefix}.name", "message": f"duplicate instance name {name!r} (also {other})"}


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


# -- the versioned document ------------------------------------------------------------------------------


def export_document(configs: list[InstanceConfig], routing: RoutingConfig) -> dict[str, Any]:
    """The registry as a portable document; literal api keys are masked, references stay readable."""
    exported = []
    for config in configs:
        item = config.model_dump(mode="json")
        item["api_key"] = mask_secret(config.api_key)
        exported.append(item)
    return {"version": DOCUMENT_VERSION, "routing": routing.model_dump(mode="json"), "instances": exported}


def export_groups(document: dict[str, Any], groups: list[ScalingGroup]) -> dict[str, Any]:
    """The document with the scaling groups, when there are any (a registry without them exports as before).
    Their members are instances of the document like any other."""
    if groups:
        document["scaling_groups"] = [group.model_dump(mode="json") for group in groups]
    return document


def parse_groups(doc: dict[str, Any]) -> list[ScalingGroup] | None:
    """The document's ``scaling_groups``, validated strictly as POST /admin/scaling/groups validates one;
    None when it has none (an import leaves groups as they
    are). Errors name ``scaling_groups[i].<field>``."""
    raw = doc.get("scaling_groups")
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidInput(
            [{"field": "scaling_groups", "message": f"must be an array, got {_type_name(raw)}"}]
        )
    errors: Errors = []
    groups: list[ScalingGroup] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(raw):
        prefix = f"scaling_groups[{index}]"
        if not isinstance(item, dict):
            errors.append({"field": prefix, "message": f"must be an object, got {_type_name(item)}"})
            continue
        name = item.get("name")
        if isinstance(name, str) and name in seen:
            message = f"duplicate scaling group name {name!r} (also scaling_groups[{seen[name]}])"
            errors.append({"field": f"{prefix}.name", "message": message})
        elif isinstance(name, str):
            seen[name] = index
        try:
            groups.append(v.validate_strict(ScalingGroup, item))
        except ValidationError as exc:
            errors.extend(_errors(prefix, exc))
    if errors:
        raise InvalidInput(errors)
    return groups


def export_legacy(pairs: list[tuple[InstanceConfig, InstanceState]]) -> dict[str, Any]:
    """The legacy ``instance_configs.json`` / ``instance_states.json`` pair as one object, keyed by instance
    name: what ``parse_legacy`` (POST /admin/instances/migrate) reads back. Literal api keys are masked as in
    ``export_document`` (a masked key imported again keeps the key the gateway has)."""
    configs: dict[str, Any] = {}
    states: dict[str, Any] = {}
    for config, state in pairs:
        item = config.model_dump(mode="json")
        item["api_key"] = mask_secret(config.api_key)
        configs[config.name] = item
        states[config.name] = state.model_dump(mode="json")
    return {"instance_configs": configs, "instance_states": states}


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InvalidInput([{"field": "format", "message": f"format must be one of {', '.join(FORMATS)}"}])


def dump(document: dict[str, Any], fmt: str) -> str:
    """Serialise a document as JSON (indent 2, sorted keys) or YAML."""
    _check_format(fmt)
    if fmt == "json":
        return json.dumps(document, indent=2, sort_keys=True) + "\n"
    return yaml.safe_dump(document, sort_keys=True, default_flow_style=False, allow_unicode=True)


def _members(value: Any) -> list[Any] | None:
    if isinstance(value, dict):
        return list(value.values())
    return value if isinstance(value, list) else None


def nesting_depth(data: Any) -> int:
    """How deeply lists and objects nest in ``data`` (a scalar: 0; a cycle: unbounded). Iterative, and
    each container is measured once: YAML aliases share one object however often it is referenced."""
    depth: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        value, closing = stack.pop()
        members = _members(value)
        if members is None or (id(value) in depth and not closing):
            continue
        if closing:
            open_.discard(id(value))
            depth[id(value)] = 1 + max((depth.get(id(m), 0) for m in members), default=0)
            continue
        if id(value) in open_:
            return sys.maxsize  # a YAML alias to an enclosing node
        open_.add(id(value))
        stack.append((value, True))
        stack.extend((m, False) for m in members)
    return depth.get(id(data), 0)


def expanded_size(data: Any, limit: int) -> int:
    """How many lists, objects and values ``data`` holds with each YAML alias expanded (a shared container
    counts every time it is referenced), measured without expanding: each container once. Past ``limit``
    the count stops at limit + 1; a cycle's back reference counts 1."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        value, closing = stack.pop()
        members = _members(value)
        if members is None:
            continue
        if closing:
            open_.discard(id(value))
            sizes[id(value)] = min(limit + 1, 1 + sum(sizes.get(id(m), 1) for m in members))
            continue
        if id(value) in sizes or id(value) in open_:
            continue
        open_.add(id(value))
        stack.append((value, True))
        stack.extend((m, False) for m in members)
    return sizes.get(id(data), 1)


def _too_deep(what: str) -> InvalidInput:
    # One line, where a parser's RecursionError left some thousand lines of traceback per request.
    log.warning("refused a %s nested more than %d levels deep", what, MAX_DEPTH)
    return InvalidInput([{"field": "body", "message": f"nested more than {MAX_DEPTH} levels deep"}])


def check_depth(data: Any) -> None:
    if nesting_depth(data) > MAX_DEPTH:
        raise _too_deep("document")


def load(text: str, fmt: str) -> dict[str, Any]:
    """Parse JSON or YAML text into an object; anything else is InvalidInput on ``body``."""
    _check_format(fmt)
    try:
        data = json.loads(text) if fmt == "json" else yaml.load(text, Loader=SAFE_LOADER)
    except RecursionError:
        raise _too_deep(f"{fmt} document") from None
    except json.JSONDecodeError as exc:
        # Position only: the document may hold secrets, so no snippet of it goes back.
        message = f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        raise InvalidInput([{"field": "body", "message": message}]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        if "nesting depth" in problem:  # libyaml's own limit
            raise _too_deep("yaml document") from None
        raise InvalidInput([{"field": "body", "message": f"invalid YAML{where}: {problem}"}]) from None
    if not isinstance(data, dict):
        raise InvalidInput(
            [{"field": "body", "message": f"document must be an object, got {_type_name(data)}"}]
        )
    check_depth(data)
    return data


def _restore_key(item: dict[str, Any], existing: dict[str, InstanceConfig]) -> None:
    """A masked key means "keep what the gateway has": the existing key, or none for a new instance."""
    if is_masked(item.get("api_key")):
        name = item.get("name")
        current = existing.get(name) if isinstance(name, str) else None
        item["api_key"] = current.api_key if current is not None else None


def parse_document(
    doc: dict[str, Any], existing: dict[str, InstanceConfig]
) -> tuple[list[InstanceConfig], RoutingConfig | None]:
    """Validate an exported document, as strictly as the admin API's bodies (no string-to-number coercion:
    the OpenAPI schema's types). Routing is None when the document has none.

    ``instances`` is required (an empty list is allowed) so a typo cannot turn a replace-import into
    "delete everything"."""
    errors: Errors = []
    if not isinstance(doc, dict):
        raise InvalidInput([{"field": "body", "message": "document must be an object"}])
    if expanded_size(doc, MAX_VALUES) > MAX_VALUES:
        log.warning("refused a document of more than %d values with its aliases expanded", MAX_VALUES)
        message = f"more than {MAX_VALUES} values once its aliases are expanded"
        raise InvalidInput([{"field": "body", "message": message}])
    for key in doc:
        if key not in ("version", "routing", "instances", "scaling_groups"):
            errors.append({"field": str(key), "message": "unknown top-level key"})
    version = doc.get("version", DOCUMENT_VERSION)
    if isinstance(version, bool) or version != DOCUMENT_VERSION:
        errors.append({"field": "version", "message": f"unsupported document version {version!r}"})

    routing: RoutingConfig | None = None
    raw_routing = doc.get("routing")
    if raw_routing is not None:
        if not isinstance(raw_routing, dict):
            errors.append({"field": "routing", "message": "must be an object"})
        else:
            try:
                routing = v.validate_strict(RoutingConfig, raw_routing)
            except ValidationError as exc:
                errors.extend(_errors("routing", exc))

    configs: list[InstanceConfig] = []
    raw_instances = doc.get("instances")
    if raw_instances is None:
        errors.append({"field": "instances", "message": "required (use [] for none)"})
        raw_instances = []
    elif not isinstance(raw_instances, list):
        errors.append({"field": "instances", "message": f"must be an array, got {_type_name(raw_instances)}"})
        raw_instances = []

    seen: dict[str, int] = {}
    for index, raw in enumerate(raw_instances):
        prefix = f"instances[{index}]"
        if not isinstance(raw, dict):
            errors.append({"field": prefix, "message": f"must be an object, got {_type_name(raw)}"})
            continue
        item = dict(raw)
        _restore_key(item, existing)
        name = item.get("name")
        if isinstance(name, str):
            if name in seen:
                errors.append(_duplicate(prefix, name, f"instances[{seen[name]}]"))
            else:
                seen[name] = index
        try:
            configs.append(v.validate_strict(InstanceConfig, item))
        except ValidationError as exc:
            errors.extend(_errors(prefix, exc))

    if errors:
        raise InvalidInput(errors)
    return configs, routing


# -- the legacy two-file format --------------------------------------------------------------------------


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _normalise_spellings(item: dict[str, Any]) -> None:
    """What older writers spelled otherwise, in place: provider and instance type aliases (any case),
    lists as comma-separated strings."""
    for field, aliases in ALIASES.items():
        value = item.get(field)
        if isinstance(value, str):
            token = value.strip().lower()
            item[field] = aliases.get(token, token)
    for field in LIST_FIELDS:
        if field in item:
            item[field] = _split_csv(item[field])


def _normalise_legacy_config(
    key: str, raw: dict[str, Any], existing: dict[str, InstanceConfig]
) -> dict[str, Any]:
    item = {field: value for field, value in raw.items() if field in CONFIG_FIELDS and value is not None}
    if not item.get("name"):
        item["name"] = key
    _normalise_spellings(item)
    for field, value in list(item.items()):
        # Legacy writers left numbers as "" when unset: treat as "use the default".
        if isinstance(value, str) and not value.strip() and field not in ("name", "api_key", "api_base"):
            del item[field]
        elif isinstance(value, str) and field not in ("name", "api_key"):
            item[field] = value.strip()
    _restore_key(item, existing)
    return item


def _legacy_state(raw: Any) -> InstanceState | None:
    """Observed fields only; a value that no longer validates (an unknown status, say) is dropped."""
    if not isinstance(raw, dict):
        return None
    item = {field: value for field, value in raw.items() if field in STATE_FIELDS and value is not None}
    if item.get("status") not in {s.value for s in OperatorStatus}:
        item.pop("status", None)
    if item.get("health_status") not in {s.value for s in HealthStatus}:
        item.pop("health_status", None)
    while True:
        try:
            return InstanceState.model_validate(item)
        except ValidationError as exc:
            bad = {error["loc"][0] for error in exc.errors() if error["loc"]}
            if not bad & item.keys():
                return InstanceState()
            for field in bad:
                item.pop(str(field), None)


def parse_legacy(
    configs: dict[str, Any], states: dict[str, Any] | None, existing: dict[str, InstanceConfig]
) -> list[tuple[InstanceConfig, InstanceState | None]]:
    """The legacy ``instance_configs.json`` / ``instance_states.json`` pair, both keyed by instance name.

    Configuration is validated strictly (all errors at once, under ``configs.<key>``); state is best effort:
    a state without a matching config is ignored, and fields that do not validate are dropped."""
    if not isinstance(configs, dict):
        raise InvalidInput([{"field": "configs", "message": f"must be an object, got {_type_name(configs)}"}])
    if states is not None and not isinstance(states, dict):
        raise InvalidInput([{"field": "states", "message": f"must be an object, got {_type_name(states)}"}])
    errors: Errors = []
    out: list[tuple[InstanceConfig, InstanceState | None]] = []
    seen: dict[str, str] = {}
    for key, raw in configs.items():
        prefix = f"configs.{key}"
        if not isinstance(raw, dict):
            errors.append({"field": prefix, "message": f"must be an object, got {_type_name(raw)}"})
            continue
        item = _normalise_legacy_config(str(key), raw, existing)
        name = item.get("name")
        if isinstance(name, str):
            if name in seen:
                errors.append(_duplicate(prefix, name, f"configs.{seen[name]}"))
                continue
            seen[name] = str(key)
        try:
            config = InstanceConfig.model_validate(item)
        except ValidationError as exc:
            errors.extend(_errors(prefix, exc))
            continue
        state = None
        if states is not None:
            state = _legacy_state(states.get(key, states.get(config.name)))
        out.append((config, state))
    if errors:
        raise InvalidInput(errors)
    return out


# -- Ollama instance lists -------------------------------------------------------------------------------

OLLAMA_DEFAULT_PORT = 11434


def ollama_name(base_url: str) -> str:
    """A valid instance name from a base URL: ``http://10.0.0.5:11434`` -> ``ollama-10-0-0-5-11434``."""
    parts = urlsplit(base_url)
    host = parts.hostname or "localhost"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", host).strip("-").lower() or "host"
    suffix = f"-{port}"
    return f"ollama-{slug[: 63 - len('ollama-') - len(suffix)].rstrip('-')}{suffix}"


def parse_ollama_list(items: list[Any]) -> list[InstanceConfig]:
    """Ollama instance lists ``[{base_url, name, api_key, instance_type, enabled}]``; other known
    InstanceConfig fields pass through, unknown ones are ignored. Errors use ``items[i].<field>``."""
    if not isinstance(items, list):
        raise InvalidInput([{"field": "items", "message": f"must be an array, got {_type_name(items)}"}])
    errors: Errors = []
    out: list[InstanceConfig] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(items):
        prefix = f"items[{index}]"
        if not isinstance(raw, dict):
            errors.append({"field": prefix, "message": f"must be an object, got {_type_name(raw)}"})
            continue
        base_url = raw.get("base_url", raw.get("api_base"))
        if not isinstance(base_url, str) or not base_url.strip():
            errors.append({"field": f"{prefix}.base_url", "message": "required"})
            continue
        base_url = base_url.strip()
        try:
            base_url = v.check_base_url(base_url)
        except ValueError as exc:
            errors.append({"field": f"{prefix}.base_url", "message": str(exc)})
            continue
        item = {
            field: value
            for field, value in raw.items()
            if field in CONFIG_FIELDS and field not in ("api_base", "provider_type") and value is not None
        }
        item["provider_type"] = ProviderType.OLLAMA
        item["api_base"] = base_url
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            item["name"] = ollama_name(base_url)
        if is_masked(item.get("api_key")):
            item["api_key"] = None
        _normalise_spellings(item)
        name = item["name"]
        if isinstance(name, str):
            if name in seen:
                errors.append(_duplicate(prefix, name, f"items[{seen[name]}]"))
                continue
            seen[name] = index
        try:
            out.append(InstanceConfig.model_validate(item))
        except ValidationError as exc:
            errors.extend(_errors(prefix, exc, rename={"api_base": "base_url"}))
    if errors:
        raise InvalidInput(errors)
    return out
