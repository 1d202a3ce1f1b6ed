"""Boundary checks for every value that can reach nginx configuration.

Each check is a strict allow-list. Rendering escapes again (defence in depth), but a value that
fails here never enters the registry.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)

# The instance-name and model-name rules, unanchored: the one spelling that the registry checks, the OpenAPI
# schema states and the rendered nginx tree matches with (render/nginx.py hands them to the templates).
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
MODEL_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}"
NAME_RE = re.compile(rf"^{NAME_PATTERN}$")
MODEL_RE = re.compile(rf"^{MODEL_PATTERN}$")
DEPLOYMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
API_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:=-]{0,63}$")
HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
URL_PATH_RE = re.compile(r"^(?:/[A-Za-z0-9._~-]*)*$")
# Printable ASCII without space, quotes, backslash, braces, semicolon, '$' (nginx variables), '#'.
SECRET_RE = re.compile(r"^[A-Za-z0-9!%&()*+,./:<=>?@\[\]^_`|~-]{1,1024}$")
SECRET_REF_RE = re.compile(r"^(?:env:[A-Za-z_][A-Za-z0-9_]{0,127}|file:/[A-Za-z0-9._/-]{1,255})$")


def check_name(value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ValueError("must be 1-63 characters of letters, digits, '.', '_' or '-', starting alphanumeric")
    return value


def check_model(value: str) -> str:
    if not MODEL_RE.fullmatch(value):
        raise ValueError(
            "model names are 1-128 characters of letters, digits and . _ : / @ + -, starting alphanumeric"
        )
    return value


def check_deployment(value: str) -> str:
    if not DEPLOYMENT_RE.fullmatch(value):
        raise ValueError("deployment names are 1-64 characters of letters, digits, '.', '_' or '-'")
    return value


def check_api_version(value: str) -> str:
    if not API_VERSION_RE.fullmatch(value):
        raise ValueError("api_version is 1-32 characters of letters, digits, '.', '_' or '-'")
    return value


def check_tag(value: str) -> str:
    if not TAG_RE.fullmatch(value):
        raise ValueError("tags are 1-64 characters of letters, digits and . _ : = -")
    return value


def check_header_name(value: str) -> str:
    if not HEADER_NAME_RE.fullmatch(value):
        raise ValueError("header names are 1-64 characters of letters, digits and '-'")
    return value


def check_secret(value: str) -> str:
    if SECRET_REF_RE.fullmatch(value) or SECRET_RE.fullmatch(value):
        return value
    raise ValueError(
        "api_key must be printable ASCII without spaces, quotes, backslashes, braces, ';', '$' or '#',"
        " or a reference 'env:NAME' / 'file:/path'"
    )


def check_host(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"host {host!r} is not a valid hostname or IP address")
    return host


def check_base_url(value: str) -> str:
    """An http(s) URL with host, optional port and a plain path; nothing else."""
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError("URL must not contain whitespace or control characters")
    if len(value) > 2048:
        raise ValueError("URL is longer than 2048 characters")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError("URL scheme must be http or https")
    if parts.username or parts.password:
        raise ValueError("URL must not carry credentials; use api_key")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ValueError("URL must not have a query or fragment")
    host = parts.hostname
    if not host:
        raise ValueError("URL has no host")
    check_host(host)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"URL port is invalid: {exc}") from None
    if port == 0:
        raise ValueError("URL port must be 1-65535")
    if not URL_PATH_RE.fullmatch(parts.path):
        raise ValueError("URL path may only contain letters, digits and / . _ ~ -")
    return value.rstrip("/") if parts.path not in ("", "/") else f"{parts.scheme}://{parts.netloc}"


def check_cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR") from None


def validate_strict(model: type[M], data: Any) -> M:
    """Validate JSON data exactly as the OpenAPI schema states it: no string-to-number coercion. The admin
    API's bodies, imported documents and client-key updates all pass through here, once."""
    return model.model_validate_json(json.dumps(data, default=str), strict=True)
