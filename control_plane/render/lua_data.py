"""The data the Lua request path loads once per (re)load: routes.json and clients.json. Pure.

nginx/lua/gw/gateway.lua reads both files in init_by_lua (the master, at start and at every reload) and
keeps them as Lua tables its workers inherit: a request looks a name up in a table, never in a file or an
nginx map, and no registry value ever becomes Lua code. Lua tables are case-sensitive, so names are kept
as they are.

routes.json
  endpoints   path -> {family, kind, key: "<family>|<kind>"[, stream_usage: true][, home]} for every
              routed endpoint; stream_usage: a stream that did not ask for its usage is sent asking for it
              (ISHGW_USAGE_ACCOUNTING and ISHGW_STREAM_USAGE on, OpenAI chat and completions); home: the
              named location whose proxy settings the endpoint's own location has (GatewaySpec.home_profile):
              a request routed there goes on in place
  resolve     "<family>|<kind>" -> {name a client may send -> {model, pool, location}}: the model's own
              name, its aliases and Ollama's ":latest" spellings; pool and location "" when no instance
              of the model is available
  served      "<family>|<kind>" and "<family>" -> models with an available pool, sorted
  fallbacks   model -> its fallback chain
  created     the "created" time /v1/models reports
  leaky_prefixes  response header name prefixes the shim servers drop (render/client_access.py)

clients.json (a SECRET_FILES member: key hashes and the HS256 secret)
  required, keys (sha256 -> {id, rpm, expires, enabled, models}), jwt, retry, address_rules,
  jwt_cache_size
  limits      only when some key has a tpm_limit or a budget (gw.limits): keys (id -> {tpm, budget,
              period}), prices (instance -> [USD per 1,000 prompt tokens, per 1,000 completion tokens]),
              seed_file (the controller's budget seed, read by init; control_plane/usage/limits.py)
"""

from __future__ import annotations

import json

from control_plane.providers import Endpoint
from control_plane.render.client_access import LEAKY_PREFIXES, ClientAccessSpec
from control_plane.render.spec import GatewaySpec

Target = dict[str, str]


def _spellings(model: str) -> tuple[str, ...]:
    """Other names a client may use for a model: Ollama reads "llama3" as "llama3:latest" and back."""
    if model.endswith(":latest"):
        return (model.removesuffix(":latest"),)
    return () if ":" in model else (f"{model}:latest",)


def resolution_table(spec: GatewaySpec) -> dict[str, dict[str, Target]]:
    """Per endpoint kind: every name a client may send -> where it goes. Exact model names win over other
    spellings; aliases win over both (as an alias is meant to)."""
    tables: dict[str, dict[str, Target]] = {}
    for pool in spec.pools:
        table = tables.setdefault(f"{pool.family}|{pool.kind}", {})
        available = bool(pool.members)
        table[pool.model] = {
            "model": pool.model,
            "pool": pool.name if available else "",
            "location": f"@{pool.profile.name}" if available else "",
        }
    for table in tables.values():
        for model in list(table):
            for name in _spellings(model):
                table.setdefault(name, table[model])
        for alias, target in spec.aliases:
            if target in table:
                table[alias] = table[target]
    return tables


def _served(spec: GatewaySpec) -> dict[str, list[str]]:
    served: dict[str, set[str]] = {}
    for pool in spec.pools:
        if pool.members:
            served.setdefault(f"{pool.family}|{pool.kind}", set()).add(pool.model)
            served.setdefault(str(pool.family), set()).add(pool.model)
    return {kind: sorted(models) for kind, models in served.items()}


# Endpoints whose streams carry their usage only when asked (stream_options.include_usage): the Responses
# API always reports it, and refuses stream_options.
STREAM_USAGE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def _endpoint(spec: GatewaySpec, e: Endpoint) -> dict[str, object]:
    data: dict[str, object] = {"family": str(e.family), "kind": str(e.kind), "key": f"{e.family}|{e.kind}"}
    server = spec.server
    if server.usage_accounting and server.stream_usage and e.path in STREAM_USAGE_PATHS:
        data["stream_usage"] = True
    home = spec.home_profile(e)
    if home is not None:
        data["home"] = f"@{home.name}"
    return data


def routes_data(spec: GatewaySpec) -> dict[str, object]:
    return {
        "endpoints": {e.path: _endpoint(spec, e) for e in spec.endpoints},
        "resolve": resolution_table(spec),
        "served": _served(spec),
        "fallbacks": {model: list(chain) for model, chain in spec.fallbacks},
        "created": 1700000000 + spec.generation,
        "leaky_prefixes": list(LEAKY_PREFIXES),
    }


def _keys(access: ClientAccessSpec) -> dict[str, object]:
    return {
        key.key_hash: {
            "id": key.id,
            "rpm": key.rpm,
            "expires": key.expires,
            "enabled": key.enabled,
            "models": list(key.models),
        }
        for key in access.keys
    }


def _jwt(access: ClientAccessSpec) -> dict[str, object] | None:
    if access.jwt is None:
        return None
    policy = access.policy
    return {
        "hs256": access.jwt.hs256_secret or "",
        "keys": [
            {"alg": k.alg, "spki": k.spki_b64, **({"kid": k.kid} if k.kid else {})}
            for k in access.jwt.public_keys
        ],
        "audience": policy.jwt_audience or "",
        "issuer": policy.jwt_issuer or "",
        "leeway": policy.jwt_leeway_s,
        "default_rpm": policy.jwt_default_rpm,
        "tiers": sorted(set(policy.jwt_rpm_tiers)),
    }


BUDGET_SEED_FILE = "budget-seed.json"  # in the prefix: control_plane/usage/limits.py writes it


def limits_data(spec: GatewaySpec) -> dict[str, object] | None:
    """The keys' limits gw.limits enforces, or None when no key has one."""
    keys: dict[str, object] = {}
    for key in spec.access.keys:
        if key.limited:
            keys[key.id] = {
                **({"tpm": key.tpm} if key.tpm else {}),
                **({"budget": key.budget_usd, "period": key.budget_period} if key.budget_usd else {}),
            }
    if not keys:
        return None
    return {
        "keys": keys,
        "prices": {name: [prompt, completion] for name, prompt, completion in spec.prices},
        "seed_file": f"{spec.server.prefix.rstrip('/')}/{BUDGET_SEED_FILE}",
    }


def clients_data(access: ClientAccessSpec, limits: dict[str, object] | None = None) -> dict[str, object]:
    """What gw.identity, gw.limits and the 429 answers read. Optional parts are absent rather than null."""
    policy = access.policy
    data: dict[str, object] = {
        "required": policy.auth_required,
        "keys": _keys(access),
        "address_rules": bool(policy.ip_allow or policy.ip_deny),
        "jwt_cache_size": policy.jwt_cache_size,
        "retry": {
            "ip": policy.ip_rpm,
            "classes": {
                c.name: {"rpm": c.rpm, "all": not c.anonymous_only, "setting": c.setting}
                for c in policy.classes
            },
            "paths": dict(access.class_of_path),
            "conn_key": policy.conn_per_key,
            "conn_ip": policy.conn_per_ip,
        },
    }
    jwt = _jwt(access)
    if jwt is not None:
        data["jwt"] = jwt
    if limits is not None:
        data["limits"] = limits
    return data


def json_text(value: object) -> str:
    """Stable (sorted keys), ASCII JSON: the same registry renders the same bytes."""
    return json.dumps(value, ensure_ascii=True, sort_keys=True, separators=(",", ":")) + "\n"


def data_files(spec: GatewaySpec) -> dict[str, str]:
    return {
        "routes.json": json_text(routes_data(spec)),
        "clients.json": json_text(clients_data(spec.access, limits_data(spec))),
    }
