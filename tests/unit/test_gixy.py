"""gixy-ng over a rendered tree from a representative registry: zero findings.

The registry has client keys at several rates (one expired, one model-restricted), HS256 and RS256/ES256
JWT keys, IP allow/deny lists and trusted proxies, HTTPS, and instances of several providers (Ollama,
OpenAI, Azure and Anthropic through their shims, vLLM) with aliases and fallback chains.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from control_plane.nginx_process import write_files
from control_plane.registry.client_keys import ClientKey, hash_key
from control_plane.registry.models import InstanceConfig, InstanceState, RoutingConfig
from control_plane.render.client_access import ClientAccessPolicy, JwtKeys, PublicKey
from control_plane.render.nginx import render
from control_plane.render.spec import ServerSettings, World, build_spec

NOW = datetime(2026, 1, 1, tzinfo=UTC)
# Checks switched off, each for a reason:
SKIPPED_CHECKS = {
    # The ACME challenge location (TLS work) uses try_files to answer 404 for unknown tokens. The check is
    # about the cost of stat() calls without open_file_cache; that location is hit a few times per
    # renewal, and caching open files there could serve a stale challenge token.
    "try_files_is_evil_too",
    # proxy_pass http://$gw_upstream names an upstream{} block, always (a map of the rendered pools with
    # an upstream as default): nginx never resolves a name at request time, so no resolver is needed.
    "missing_resolver",
}


def representative_tree(directory: Path) -> Path:
    configs = [
        InstanceConfig(
            name="ollama-1",
            provider_type="ollama",
            api_base="http://127.0.0.1:11434",
            supported_models=["llama3:8b", "nomic-embed"],
            instance_type="both",
        ),
        InstanceConfig(
            name="vllm-1",
            provider_type="vllm",
            api_base="http://127.0.0.1:8000/v1",
            supported_models=["qwen"],
        ),
        InstanceConfig(
            name="openai-1",
            provider_type="openai",
            api_key="sk-test-0123456789abcdef",
            supported_models=["gpt-4o"],
        ),
        InstanceConfig(
            name="azure-1",
            provider_type="azure",
            api_base="https://contoso.openai.azure.com",
            api_key="azure-key-0123456789",
            model_deployments={"gpt-4o": "gpt4o-prod"},
        ),
        InstanceConfig(
            name="claude-1",
            provider_type="anthropic",
            api_key="sk-ant-0123456789abcdef",
            supported_models=["claude-sonnet"],
        ),
    ]
    routing = RoutingConfig(
        model_aliases={"fast": "qwen", "smart": "gpt-4o"},
        fallbacks={"qwen": ["llama3:8b"], "gpt-4o": ["qwen"]},
    )
    keys = tuple(
        ClientKey(
            id=f"key_{i:016x}",
            name=f"client-{i}",
            key_hash=hash_key(f"ishgw-secret-{i}"),
            key_prefix="ishgw-abcd",
            key_last4="wxyz",
            rpm_limit=rpm,
            allowed_models=models,
            expires_at=expires,
            created_at=NOW,
            updated_at=NOW,
        )
        for i, (rpm, models, expires) in enumerate(
            [
                (60, ["llama3:8b"], None),
                (600, [], NOW + timedelta(days=30)),
                (60, ["gpt-*"], NOW - timedelta(days=1)),
                (0, [], None),
            ]
        )
    )
    world = World(
        instances=tuple((c, InstanceState()) for c in configs),
        routing=routing,
        now=NOW,
        addresses={
            "127.0.0.1": ("127.0.0.1",),
            "api.openai.com": ("10.0.0.1",),
            "contoso.openai.azure.com": ("10.0.0.2",),
            "api.anthropic.com": ("10.0.0.3",),
        },
        secrets={c.name: c.api_key for c in configs if c.api_key},
        client_keys=keys,
        jwt=JwtKeys(
            hs256_secret="s" * 40, public_keys=(PublicKey("RS256", "AAAA"), PublicKey("ES256", "BBBB", "k1"))
        ),
    )
    server = ServerSettings(
        prefix=str(directory),
        run_dir=str(directory / "run"),
        https_port=8443,
        tls_cert=str(directory / "cert.pem"),
        tls_key=str(directory / "key.pem"),
        acme_webroot=str(directory / "acme"),
        status_allow=("10.0.0.0/8",),
        log_server="127.0.0.1:9514",
        access=ClientAccessPolicy(
            ip_allow=("10.0.0.0/8", "192.168.0.0/16", "127.0.0.1/32"),
            ip_deny=("10.66.0.0/16",),
            trusted_proxies=("192.168.1.0/24",),
        ),
    )
    tree = render(build_spec(world, server))
    write_files(directory, tree.files)
    return directory / "nginx.conf"


def test_gixy_reports_nothing(tmp_path: Path) -> None:
    gixy = shutil.which("gixy", path=str(Path(sys.executable).parent))
    if gixy is None:
        pytest.fail("gixy-ng is not installed: pip install -e '.[test]'")
    config = representative_tree(tmp_path)
    done = subprocess.run(
        [gixy, "--format", "json", "--skips", ",".join(sorted(SKIPPED_CHECKS)), str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.stdout.strip(), done.stderr
    findings = json.loads(done.stdout)
    summary = [f"{f['plugin']} ({f['severity']}): {f['reason']}\n{f['config']}" for f in findings]
    assert findings == [], "\n\n".join(summary)
    # gixy read the whole tree (includes), not just the top file.
    assert "limit_req" in (tmp_path / "servers.conf").read_text()
