"""Which production features the gateway under test has, switched on where this build has them.

Features come and go with the other issues, so detection is by evidence, not by assumption:
settings fields (environment), admin API routes (openapi.json) and the rendered nginx tree that runs.
Every feature ends up in the report as on / off / not in this build, with how it was switched on.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from control_plane.settings import Settings

HIGH = 10**6  # "set high enough not to bind"

# Boolean settings that switch a production feature on: name pattern -> feature label.
BOOL_FEATURES: tuple[tuple[str, str], ...] = (
    (r"log_stream", "access log stream to the controller"),
    (r"access_log", "access log stream to the controller"),
    (r"probes?_enabled", "active health probes"),
    (r"auth_required|client_(auth|key)|require_(client_)?key|api_keys?_required", "client key check"),
    (r"rate_limit", "rate limits"),
    (r"security_headers|hsts", "security headers"),
)
# Numeric settings that are rate limits: set high so they never bind.
RATE_SETTING = re.compile(r"(^|_)(rate_limit|ratelimit|limit_req|rps|rpm|tpm|burst|limit_conn)(_|$)", re.I)
KEY_ROUTE = re.compile(r"^/admin/(client[-_]?keys|keys|api[-_]keys|clients|consumers)/?$")
KEY_FIELD = re.compile(r"(^|_)(key|secret|token)$", re.I)
LIVE_EVIDENCE: tuple[tuple[str, str], ...] = (
    ("TLS listener (HTTP/1.1 + h2, TLS 1.2/1.3)", r"listen [^;]* ssl"),
    ("Lua model routing (JSON body scan, aliases, pool map)", r"require\(\"gw\.gateway\"\)\.route\(\)"),
    ("retries across instances (proxy_next_upstream)", r"proxy_next_upstream_tries [2-9]"),
    ("access log stream to the controller", r"access_log \"?syslog:"),
    ("rate limits (limit_req / limit_conn)", r"\blimit_(req|conn) "),
    ("client key check in nginx", r"require\(\"gw\.gateway\"\)\.identify\(\)"),
    ("IP allow / deny lists", r"allow \"?127\.0\.0\.0/8"),
    ("security headers", r"add_header (Strict-Transport-Security|X-Content-Type-Options)"),
    ("fallback chains (body rewrite)", r"\"fallbacks\":\{\""),
)


@dataclass
class Feature:
    name: str
    state: str  # "on", "off", "not in this build", "failed"
    how: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _upper_bound(field_name: str) -> float | None:
    info = Settings.model_fields[field_name]
    for meta in info.metadata:
        for attr in ("le", "lt"):
            bound = getattr(meta, attr, None)
            if isinstance(bound, int | float):
                return float(bound)
    return None


# Settings the benchmark pins, with why.
PINNED: dict[str, tuple[str, str]] = {
    "http_redirect": ("false", "plain HTTP serves rather than redirecting: TLS off and on on one gateway"),
    "ip_allow": ("127.0.0.0/8", "IP allow list on; the benchmark's loopback clients are allowed"),
    "ip_deny": ("192.0.2.0/24", "IP deny list on; TEST-NET-1 denied"),
}


def settings_env() -> tuple[dict[str, str], list[str]]:
    """Environment that switches every known feature setting on (limits high); notes on what was set."""
    env: dict[str, str] = {}
    notes: list[str] = []
    for name, info in Settings.model_fields.items():
        annotation = info.annotation
        if name in PINNED:
            value, why = PINNED[name]
            env[f"ISHGW_{name.upper()}"] = value
            notes.append(f"ISHGW_{name.upper()}={value} ({why})")
        elif annotation is bool:
            for pattern, label in BOOL_FEATURES:
                if re.search(pattern, name):
                    env[f"ISHGW_{name.upper()}"] = "true"
                    notes.append(f"ISHGW_{name.upper()}=true ({label})")
                    break
        elif annotation in (int, float) and RATE_SETTING.search(name) and "nofile" not in name:
            bound = _upper_bound(name)
            high = int(min(HIGH, bound)) if bound is not None else HIGH
            env[f"ISHGW_{name.upper()}"] = str(high)
            notes.append(f"ISHGW_{name.upper()}={high} (limit set high)")
    return env, notes


def unknown_settings() -> list[str]:
    """Boolean settings that default to off and that the driver does not know: listed, left alone."""
    known = [p for p, _ in BOOL_FEATURES]
    return [
        name
        for name, info in Settings.model_fields.items()
        if info.annotation is bool and info.default is False and not any(re.search(p, name) for p in known)
    ]


def _resolve(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        node: Any = spec
        for part in ref[2:].split("/"):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        return node if isinstance(node, dict) else {}
    return schema


def _fill(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """A body for a create-key call: required fields filled plausibly, limit-like fields set high."""
    schema = _resolve(schema, spec)
    body: dict[str, Any] = {}
    required = set(schema.get("required", []))
    for name, prop in (schema.get("properties") or {}).items():
        prop = _resolve(prop, spec)
        kind = prop.get("type")
        limit_like = RATE_SETTING.search(name) or re.search(r"budget|quota|limit", name)
        if kind in ("integer", "number") and limit_like:
            maximum = prop.get("maximum")
            body[name] = int(min(HIGH * 1000, maximum)) if isinstance(maximum, int | float) else HIGH
        elif name in required:
            if kind == "string":
                body[name] = prop.get("enum", ["bench-client"])[0]
            elif kind in ("integer", "number"):
                body[name] = prop.get("minimum", 1)
            elif kind == "boolean":
                body[name] = True
            elif kind == "array":
                body[name] = []
    return body


def _find_secret(value: Any) -> str | None:
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str) and KEY_FIELD.search(key) and len(item) >= 16 and "*" not in item:
                return item
        for item in value.values():
            found = _find_secret(item)
            if found:
                return found
    return None


def create_client_key(admin: httpx.Client) -> tuple[str | None, Feature]:
    """Create a client key through the admin API when this build has one; returns (key, feature)."""
    label = "client key check"
    try:
        spec = admin.get("/admin/openapi.json").json()
    except (httpx.HTTPError, ValueError) as exc:
        return None, Feature(label, "failed", f"openapi.json unreadable: {exc}")
    for path, ops in (spec.get("paths") or {}).items():
        if KEY_ROUTE.match(path) and isinstance(ops, dict) and "post" in ops:
            content = (ops["post"].get("requestBody") or {}).get("content", {})
            schema = (content.get("application/json") or {}).get("schema", {})
            body = _fill(schema, spec)
            response = admin.post(path, json=body)
            if response.status_code >= 300 and body != {"name": "bench-client"}:
                body = {"name": "bench-client"}  # the schema was not usable: the least a key needs
                response = admin.post(path, json=body)
            if response.status_code >= 300:
                detail = response.text[:200]
                return None, Feature(
                    label, "failed", f"POST {path} {body} -> {response.status_code} {detail}"
                )
            key = _find_secret(response.json())
            if key is None:
                return None, Feature(label, "failed", f"POST {path}: no key in the answer")
            limits = {k: v for k, v in body.items() if isinstance(v, int) and not isinstance(v, bool)}
            return key, Feature(label, "on", f"POST {path}, key limits {limits or 'default'}")
    return None, Feature(label, "not in this build", "no client-key route in /admin/openapi.json")


def live_features(live_text: str) -> dict[str, bool]:
    return {name: bool(re.search(pattern, live_text)) for name, pattern in LIVE_EVIDENCE}


def rendered_values(live_text: str) -> dict[str, str]:
    """A few rendered values worth printing next to the features."""
    out: dict[str, str] = {}
    if m := re.search(r"proxy_next_upstream_tries (\d+)", live_text):
        out["proxy_next_upstream_tries"] = m.group(1)
    if m := re.search(r"proxy_next_upstream ([^;]+);", live_text):
        out["proxy_next_upstream"] = m.group(1)
    if m := re.search(r"worker_processes ([^;]+);", live_text):
        out["worker_processes"] = m.group(1)
    return out
