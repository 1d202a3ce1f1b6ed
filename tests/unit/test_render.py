"""render(spec): deterministic, quoted, and no registry content can add a directive (crossplane parse)."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import string
import tempfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import crossplane
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from control_plane.health.logstream import FIELDS, LOG_FIELDS
from control_plane.registry.models import InstanceConfig, InstanceState, RoutingConfig
from control_plane.render.lua_data import resolution_table, routes_data
from control_plane.render.nginx import (
    NGINX_DIR,
    SECRET_FILES,
    ZONE_MIN_MB,
    ZONE_NAME,
    render,
    zone_budget,
    zone_size_mb,
)
from control_plane.render.quoting import UnsafeValue, nginx_quote
from control_plane.render.spec import MAX_429_LEVELS, ProxyProfile, ServerSettings, World, build_spec

SERVER = ServerSettings(prefix="/p", run_dir="/r", http_port=8080)
NOW = datetime(2026, 1, 1, tzinfo=UTC)
# The proxy_common macro in servers.conf.j2 (12 of them from edge.j2); usage accounting (off by default)
# adds Accept-Encoding; X-ISHGW-Model only in a profile with an Azure member (model_header).
PROXY_HEADERS_PER_LOCATION = 18
LOCATIONS_PER_PROFILE = 1  # the body is rewritten by Lua (alias or fallback), not by a second location


def locations_of(profile: ProxyProfile) -> int:
    """A profile that retries has each location again per level of 429s whose Retry-After it keeps."""
    return LOCATIONS_PER_PROFILE * (1 + profile.levels_429)


def spec_for(configs: list[InstanceConfig], routing: RoutingConfig | None = None):  # type: ignore[no-untyped-def]
    world = World(
        instances=tuple((c, InstanceState()) for c in configs),
        routing=routing or RoutingConfig(),
        now=NOW,
        addresses={"127.0.0.1": ("127.0.0.1",), "api.example.com": ("10.1.1.1",)},
        secrets={c.name: c.api_key for c in configs if c.api_key},
    )
    return build_spec(world, SERVER)


def parse_directives(files: dict[str, str]) -> Counter[str]:
    """Every directive name in the rendered tree, counted (crossplane parses each file)."""
    counts: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            if name.endswith(".conf"):
                (Path(tmp) / name).write_text(text)
        for name in files:
            if not name.endswith(".conf"):
                continue
            parsed = crossplane.parse(str(Path(tmp) / name), single=True, check_ctx=False, check_args=False)
            assert parsed["errors"] == [], parsed["errors"]

            def walk(block: list[dict[str, object]]) -> None:
                for d in block:
                    counts[str(d["directive"])] += 1
                    walk(d.get("block", []))  # type: ignore[arg-type]

            walk(parsed["config"][0]["parsed"])
    return counts


@pytest.mark.parametrize("char", [*string.punctuation, " ", "é", "\u2028"])
def test_quote_every_special_character(char: str) -> None:
    if char == "$":
        with pytest.raises(UnsafeValue):
            nginx_quote(f"a{char}b")
        return
    quoted = nginx_quote(f"a{char}b")
    assert quoted.startswith('"') and quoted.endswith('"')
    inner = quoted[1:-1]
    # No unescaped quote can end the token early.
    assert '"' not in inner.replace('\\"', "")


@pytest.mark.parametrize("char", ["\n", "\r", "\t", "\x00", "\x7f"])
def test_quote_refuses_control_characters(char: str) -> None:
    with pytest.raises(UnsafeValue) as refused:
        nginx_quote(f"Bearer CANARY-secret{char}b")
    assert "CANARY" not in str(refused.value)  # the value may be a credential: never in the message


def test_render_is_deterministic_and_checksummed() -> None:
    configs = [
        InstanceConfig(
            name="a", provider_type="ollama", api_base="http://127.0.0.1:1", supported_models=["m"]
        ),
        InstanceConfig(
            name="o",
            provider_type="openai",
            api_base="https://api.example.com/v1",
            api_key="sk-1234567890abc",
            supported_models=["g"],
        ),
    ]
    first, second = render(spec_for(configs)), render(spec_for(list(reversed(configs))))
    assert first == second
    assert f"checksum: {first.checksum}" in first.files["nginx.conf"]
    assert '"checksum":"' + first.checksum in first.files["servers.conf"]
    assert "sk-1234567890abc" in first.files["shims.conf"]
    assert all(
        "sk-1234567890abc" not in text for name, text in first.files.items() if name not in SECRET_FILES
    )


def test_every_pool_shares_one_upstream_zone_sized_from_its_servers() -> None:
    configs = [
        InstanceConfig(
            name=f"i{i}", provider_type="ollama", api_base=f"http://127.0.0.1:{1 + i}", supported_models=[m]
        )
        for i, m in enumerate(["a", "a", "b", "c", "c", "c"])
    ]
    spec = spec_for(configs)
    pools = render(spec).files["pools.conf"]
    zones = re.findall(r"^ +zone (.*);$", pools, flags=re.MULTILINE)
    upstreams = [p for p in spec.pools if p.members]
    servers = sum(len(p.members) for p in upstreams)
    assert len(zones) == len(upstreams) == pools.count("\nupstream p_")
    assert set(zones) == {f"{ZONE_NAME} {zone_size_mb(servers, len(upstreams))}m"}


@pytest.mark.parametrize("servers", [0, 1, 10, 999, 1_000, 10_000, 10_001, 100_000])
def test_the_upstream_zone_holds_its_budget_in_power_of_two_steps(servers: int) -> None:
    upstreams = max(1, servers // 10)
    size = zone_size_mb(servers, upstreams)
    assert size >= ZONE_MIN_MB and size & (size - 1) == 0
    assert size * 2**20 >= zone_budget(servers, upstreams)
    assert size == ZONE_MIN_MB or (size // 2) * 2**20 < zone_budget(servers, upstreams)  # the smallest step
    # What nginx 1.22's slab took, measured: ~930 bytes a server at most, ~170 an upstream, 35 KiB base.
    assert zone_budget(servers, upstreams) >= 1.25 * (35 * 1024 + 930 * servers + 170 * upstreams)


def test_a_health_change_keeps_the_zone_size() -> None:
    """One server more or less (an instance going down or coming back) renders the same size, but at a
    step's edge."""
    sizes = {zone_size_mb(servers, 1_000) for servers in range(9_900, 10_101)}
    assert sizes == {16}


def test_state_only_change_keeps_checksum() -> None:
    config = InstanceConfig(
        name="a", provider_type="ollama", api_base="http://127.0.0.1:1", supported_models=["m"]
    )
    base = spec_for([config])
    world = World(
        instances=((config, InstanceState(total_requests=99, avg_latency_ms=3.0)),),
        routing=RoutingConfig(),
        now=NOW,
        addresses={"127.0.0.1": ("127.0.0.1",)},
    )
    assert render(build_spec(world, SERVER)).checksum == render(base).checksum


def test_routes_data_marks_unavailable_models() -> None:
    configs = [
        InstanceConfig(
            name="a", provider_type="ollama", api_base="http://127.0.0.1:1", supported_models=["up"]
        ),
        InstanceConfig(
            name="b",
            provider_type="ollama",
            api_base="http://127.0.0.1:1",
            supported_models=["down"],
            enabled=False,
        ),
    ]
    data = routes_data(spec_for(configs))
    resolve = data["resolve"]
    assert isinstance(resolve, dict)
    up = resolve["ollama|chat"]["up"]
    assert up["pool"].startswith("p_") and up["location"].startswith("@x_ollama_chat_")
    assert up["model"] == "up"
    assert resolve["ollama|chat"]["down"] == {"model": "down", "pool": "", "location": ""}
    served = data["served"]
    assert isinstance(served, dict)
    assert served["ollama|chat"] == served["ollama"] == ["up"]  # listings: available models only
    assert '"127.0.0.1:1" "a";' in render(spec_for(configs)).files["http.conf"]


def test_baseline_directive_set() -> None:
    configs = [
        InstanceConfig(
            name="a", provider_type="ollama", api_base="http://127.0.0.1:1", supported_models=["m"]
        )
    ]
    counts = parse_directives(render(spec_for(configs)).files)
    assert counts["upstream"] == 2 + 1  # chat via /api and via /v1, and gw_no_pool
    assert counts["server"] >= 3  # the client server and one line per upstream member


def test_a_retrying_pool_hands_each_429_to_a_location_that_keeps_its_retry_after() -> None:
    """nginx exposes only the last attempt's headers, so a pool does not retry a 429 in place: its
    location sends it to a _429_1 twin, which notes the answer's Retry-After and retries the pool; that
    one hands the next 429 to _429_2, and so on up to levels_429; the last retries 429s in place."""

    def ollama(name: str) -> InstanceConfig:
        return InstanceConfig(
            name=name,
            provider_type="ollama",
            api_base="http://127.0.0.1:1",
            supported_models=["m"],
            retry_count=9,
        )

    def locations(spec: Any) -> dict[str, dict[str, list[list[str]]]]:
        found: dict[str, dict[str, list[list[str]]]] = {}
        for d in parse_text(render(spec).files["servers.conf"]):
            for inner in d.get("block", []):
                if inner["directive"] == "location" and inner["args"][0].startswith("@x_"):
                    directives: dict[str, list[list[str]]] = {}
                    for x in inner["block"]:
                        directives.setdefault(x["directive"], []).append(x["args"])
                    found[inner["args"][0]] = directives
        return found

    note = ["$gw_429", "$gw_429$upstream_addr|$upstream_http_retry_after|$upstream_http_retry_after_ms;"]
    for members in (2, 3, 6):
        spec = spec_for([ollama(f"i{n}") for n in range(members)])
        levels = min(members, MAX_429_LEVELS + 1) - 1
        found = locations(spec)
        firsts = [name for name in found if "_429_" not in name]
        assert (
            firsts and len(firsts) % LOCATIONS_PER_PROFILE == 0 and len(found) == len(firsts) * (1 + levels)
        )
        for first in firsts:
            chain = [first] + [f"{first}_429_{n}" for n in range(1, levels + 1)]
            for level, name in enumerate(chain):
                d = found[name]
                last = level == levels
                assert ("http_429" in d["proxy_next_upstream"][0]) is last
                assert (["429", "=", f"{first}_429_{level + 1}"] in d["error_page"]) is not last
                assert (note in d.get("set", [])) is (level > 0)
                assert d["proxy_next_upstream_tries"] == [[str(members)]]
    one = locations(spec_for([ollama("a")]))  # one try: the 429 is the answer, its headers in the line
    assert one and not any("_429" in name for name in one)
    assert all("http_429" in d["proxy_next_upstream"][0] for d in one.values())


# --- property: registry content never changes the directive set it was not meant to change -----

# Typed so that the tuple matches hypothesis's Collection[CategoryName] (a bare tuple infers tuple[str]).
SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
hostile_text = st.text(alphabet=st.characters(blacklist_categories=SURROGATES), min_size=1, max_size=40)


@st.composite
def instance_inputs(draw: st.DrawFn) -> dict[str, object]:
    return {
        "name": draw(st.one_of(hostile_text, st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True))),
        "provider_type": draw(st.sampled_from(["ollama", "openai", "azure", "anthropic", "vllm"])),
        "api_base": draw(
            st.one_of(
                st.just("http://127.0.0.1:11434"),
                st.just("https://api.example.com/v1"),
                hostile_text.map(lambda t: "http://127.0.0.1/" + t),
            )
        ),
        "api_key": draw(
            st.one_of(st.none(), hostile_text, st.from_regex(r"sk-[A-Za-z0-9]{12,20}", fullmatch=True))
        ),
        "supported_models": draw(
            st.lists(
                st.one_of(hostile_text, st.from_regex(r"[a-z][a-z0-9:./-]{0,12}", fullmatch=True)), max_size=3
            )
        ),
        "model_deployments": draw(st.dictionaries(hostile_text, hostile_text, max_size=2)),
        "api_version": draw(st.one_of(st.none(), hostile_text)),
        "weight": draw(st.integers(min_value=-5, max_value=2000)),
    }


def accepted(raw: dict[str, object]) -> InstanceConfig | None:
    try:
        return InstanceConfig.model_validate(raw)
    except ValidationError:
        return None


@functools.cache
def empty_counts() -> Counter[str]:
    return parse_directives(render(spec_for([])).files)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(instance_inputs(), max_size=4), st.dictionaries(hostile_text, hostile_text, max_size=2))
def test_random_registry_content_cannot_inject_directives(
    raws: list[dict[str, object]], aliases: dict[str, str]
) -> None:
    configs: dict[str, InstanceConfig] = {}
    for raw in raws:
        config = accepted(raw)
        if config is not None:
            configs.setdefault(config.name, config)
    try:
        routing = RoutingConfig(model_aliases=aliases)
    except ValidationError:
        routing = RoutingConfig()
    spec = spec_for(list(configs.values()), routing)
    tree = render(spec)
    counts = parse_directives(tree.files)
    empty = empty_counts()
    assert counts["upstream"] == empty["upstream"] + sum(1 for p in spec.pools if p.members) + len(spec.shims)
    # An Azure shim's deployment map; two more where pools name different instances at one address.
    shared_maps = 2 if spec.pool_keyed_addresses() else 0
    assert counts["map"] == empty["map"] + sum(1 for s in spec.shims if s.maps_deployments) + shared_maps
    # Pools share a named location per proxy profile; each pool is one upstream block.
    profiles = spec.profiles()
    assert len(profiles) <= sum(1 for p in spec.pools if p.members)
    locations = sum(locations_of(profile) for profile in profiles)
    assert counts["location"] == empty["location"] + locations + sum(len(s.routes) + 1 for s in spec.shims)
    assert counts["listen"] == 2 + len(spec.shims)  # clients, the usage drain, the shims
    assert counts["proxy_set_body"] == 0
    shim_headers = sum(3 + len(s.headers) for s in spec.shims)
    # An endpoint whose kind has pools proxies in its own location too, with its home profile's settings.
    homes = [home for e in spec.endpoints if (home := spec.home_profile(e)) is not None]
    model_headers = sum(locations_of(profile) for profile in profiles if profile.model_header)
    model_headers += sum(1 for home in homes if home.model_header)
    added_headers = PROXY_HEADERS_PER_LOCATION * (locations + len(homes)) + model_headers + shim_headers
    assert counts["proxy_set_header"] == empty["proxy_set_header"] + added_headers
    # Registry names reach Lua only as data: the routing file is exactly routes_data, whatever the names.
    assert json.loads(tree.files["routes.json"]) == json.loads(json.dumps(routes_data(spec)))


def parse_text(text: str) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one.conf"
        path.write_text(text)
        parsed = crossplane.parse(str(path), single=True, check_ctx=False, check_args=False)
    assert parsed["errors"] == [], parsed["errors"]
    return parsed["config"][0]["parsed"]  # type: ignore[no-any-return]


def crossplane_map(text: str, variable: str) -> dict[str, str | None]:
    """The entries of the map that sets ``variable``, as nginx reads them."""
    for directive in parse_text(text):
        if directive["directive"] == "map" and directive["args"][1] == variable:
            return {d["directive"]: (d["args"][0] if d["args"] else None) for d in directive["block"]}
    raise AssertionError(f"no map sets {variable}")


def test_every_name_a_client_may_send_resolves_in_one_lookup() -> None:
    configs = [
        InstanceConfig(
            name="a",
            provider_type="ollama",
            api_base="http://127.0.0.1:1",
            supported_models=["phi3:latest", "llama3", "llama3:latest", "qwen"],
        )
    ]
    routing = RoutingConfig(model_aliases={"fast": "phi3", "llama3": "qwen", "ghost": "nowhere"})
    table = resolution_table(spec_for(configs, routing))["ollama|chat"]
    served = {name: value["model"] for name, value in table.items()}
    assert served == {
        "phi3:latest": "phi3:latest",
        "phi3": "phi3:latest",  # Ollama's implied tag
        "llama3": "qwen",  # an alias wins over a model of the same name
        "llama3:latest": "llama3:latest",  # an exact name wins over another spelling
        "qwen": "qwen",
        "qwen:latest": "qwen",
        "fast": "phi3:latest",  # an alias of a spelling
    }


def test_redirect_goes_to_configured_names_or_the_local_address() -> None:
    """Issue 19: the HTTP->HTTPS redirect never takes its host from the client's Host header."""
    https = {"https_port": 8443, "tls_cert": "/c.pem", "tls_key": "/k.pem", "http_redirect": True}

    def servers(**server: Any) -> str:
        settings = ServerSettings(prefix="/p", run_dir="/r", **{**https, **server})
        return render(build_spec(World((), RoutingConfig(), NOW), settings)).files["servers.conf"]

    plain = servers()
    assert "return 301 https://$gw_redirect_host:8443$request_uri;" in plain
    assert "$host:" not in plain and "map $server_addr $gw_redirect_host {" in plain
    assert '"~:" "[$server_addr]";' in plain  # an IPv6 address in brackets
    named = servers(domains=("gw.example.org", "2001:db8::1"))
    block = named.split("map $host $gw_redirect_host {", 1)[1].split("}", 1)[0]
    assert [line.strip() for line in block.strip().splitlines()] == [
        'default "gw.example.org";',
        '"gw.example.org" "gw.example.org";',
        '"2001:db8::1" "[2001:db8::1]";',
    ]
    assert "gw_redirect_host" not in servers(http_redirect=False)


@pytest.mark.parametrize("value", ["gw.example.org,2001:db8::1", " GW.Example.org "])
def test_domain_setting_accepts_names_and_addresses(value: str) -> None:
    from control_plane.settings import Settings

    names = Settings(domain=value).domain
    assert names[0] == "gw.example.org"


@pytest.mark.parametrize("value", ["4; user root", "0", "-1", "auto\n", "12345", "many"])
def test_worker_processes_setting_is_auto_or_a_count(value: str) -> None:
    from control_plane.nginx_process import worker_count
    from control_plane.settings import Settings

    with pytest.raises(ValidationError, match="nginx_worker_processes"):
        Settings(nginx_worker_processes=value)
    assert worker_count(Settings(nginx_worker_processes="4").nginx_worker_processes) == 4
    assert Settings().nginx_worker_processes == "auto"


@pytest.mark.parametrize("value", ["evil example", "a$b.example", "-x.example", "x.example\nlisten 1"])
def test_domain_setting_refuses_what_is_no_host(value: str) -> None:
    from control_plane.settings import Settings

    with pytest.raises(ValidationError, match="domain"):
        Settings(domain=value)


def test_usage_accounting_renders_counting_only_when_on() -> None:
    configs = [
        InstanceConfig(
            name="a", provider_type="ollama", api_base="http://127.0.0.1:1", supported_models=["m"]
        )
    ]
    off = render(spec_for(configs)).files["servers.conf"]
    assert "body_filter_by_lua_block" not in off and "log_by_lua_block" not in off
    assert "/_ishgw/usage" in off  # the drain answers either way (an empty batch)
    on_server = dataclasses.replace(SERVER, usage_accounting=True)
    world = World(
        instances=tuple((c, InstanceState()) for c in configs),
        routing=RoutingConfig(),
        now=NOW,
        addresses={"127.0.0.1": ("127.0.0.1",)},
    )
    on = render(build_spec(world, on_server)).files["servers.conf"]
    pools = on.count("proxy_pass http://$gw_upstream") + on.count('proxy_pass "http://${gw_upstream}')
    assert pools > 0
    # the "_su" twins (OpenAI streams the router asked for their usage) filter with count_stripped
    scanned = on.count("gw_gateway.count(") + on.count("gw_gateway.count_stripped(")
    assert scanned == on.count("gw_gateway.counted(") == pools
    assert on.count('proxy_set_header Accept-Encoding "";') == pools


def test_usage_accounting_is_on_by_default_and_stream_usage_asks_only_chat_and_completions() -> None:
    from control_plane.settings import Settings

    settings = Settings()
    assert settings.usage_accounting is True and settings.stream_usage == "on"
    with pytest.raises(ValidationError, match="stream_usage"):
        Settings(stream_usage="maybe")
    configs = [
        InstanceConfig(
            name="a", provider_type="ollama", api_base="http://127.0.0.1:1", supported_models=["m"]
        )
    ]
    world = World(
        instances=tuple((c, InstanceState()) for c in configs),
        routing=RoutingConfig(),
        now=NOW,
        addresses={"127.0.0.1": ("127.0.0.1",)},
    )
    for on, stream, asked in ((True, True, True), (True, False, False), (False, True, False)):
        server = dataclasses.replace(SERVER, usage_accounting=on, stream_usage=stream)
        spec = build_spec(world, server)
        endpoints = routes_data(spec)["endpoints"]
        assert isinstance(endpoints, dict)
        flagged = {path for path, e in endpoints.items() if e.get("stream_usage")}
        assert flagged == ({"/v1/chat/completions", "/v1/completions"} if asked else set())
        files = render(spec).files
        assert ('set $gw_stream_usage "";' in files["servers.conf"]) is asked
        servers = files["servers.conf"]
        # Only the "_su" twins (OpenAI chat streams the router asked for their usage) have a header filter.
        twins = servers.count("_su {") + servers.count("_su_429_1 {")
        assert servers.count("header_filter_by_lua_block { gw_gateway.stripping() }") == twins
        assert (twins > 0) is asked


def test_the_log_format_is_rendered_from_the_one_field_table() -> None:
    """Issue 18: the access-log fields are written once (logstream.LOG_FIELDS); http.conf.j2 spells none."""
    template = (NGINX_DIR / "templates" / "http.conf.j2").read_text()
    log_format = template[template.index("log_format gw_log") :].split(";", 1)[0]
    for f in LOG_FIELDS:
        assert f.variable not in log_format, f"http.conf.j2 spells the log field {f.name!r} by hand"
    assert "log_format gw_log escape=json\n{% for line in log_format_lines(counting) %}" in template
    assert tuple(f.name for f in LOG_FIELDS) == FIELDS and len(set(FIELDS)) == len(LOG_FIELDS)
    # The fields only a counting tree has come last: a line without them is the others, by position.
    counted = [f.counted for f in LOG_FIELDS]
    assert counted == sorted(counted) and any(counted)
    one = InstanceConfig(
        name="a", provider_type="ollama", api_base="http://127.0.0.1:1", supported_models=["m"]
    )
    for counting in (True, False):
        # Without usage counting nothing sets $gw_tokens: its field is left out (no work per request).
        fields = [f for f in LOG_FIELDS if counting or not f.counted]
        spec = dataclasses.replace(
            spec_for([one]), server=dataclasses.replace(SERVER, usage_accounting=counting)
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "http.conf"
            path.write_text(render(spec).files["http.conf"])
            parsed = crossplane.parse(str(path), single=True, check_ctx=False, check_args=False)
        assert parsed["errors"] == []
        (directive,) = [d for d in parsed["config"][0]["parsed"] if d["directive"] == "log_format"]
        assert directive["args"][:2] == ["gw_log", "escape=json"]
        line = "".join(directive["args"][2:])  # nginx joins the strings
        variables = [f.variable for f in fields]

        # Every ${variable} becomes a value: the line is then the JSON array the receiver reads, a string
        # per field at its index.
        def fill(m: re.Match[str], v: list[str] = variables) -> str:
            return f"v{v.index(m.group(1))}"

        filled = re.sub(r"\$\{(\w+)\}", fill, line)
        assert json.loads(filled) == [f"v{i}" for i in range(len(fields))]
        declared = [
            d
            for d in parsed["config"][0]["parsed"]
            if d["directive"] == "map" and d["args"][1] == "$gw_tokens"
        ]
        assert len(declared) == int(counting)


def test_only_azure_pools_are_sent_the_model_header() -> None:
    """X-ISHGW-Model is for an Azure instance's shim (its deployment by model): the pools with an Azure
    member get a profile location that sends it, the others send nothing of it to their providers."""
    configs = [
        InstanceConfig(
            name="a", provider_type="ollama", api_base="http://127.0.0.1:1", supported_models=["m"]
        ),
        InstanceConfig(
            name="z",
            provider_type="azure",
            api_base="http://127.0.0.1:2",
            api_key="azure-key-1234567890",
            api_version="2024-06-01",
            supported_models=["gpt-4o"],
            model_deployments={"gpt-4o": "prod-4o"},
        ),
    ]
    spec = spec_for(configs)
    by_model = {pool.model: pool for pool in spec.pools if pool.members}
    assert by_model["gpt-4o"].profile.model_header and by_model["gpt-4o"].profile.name.endswith("_m")
    assert not by_model["m"].profile.model_header and not by_model["m"].profile.name.endswith("_m")
    files = render(spec).files
    servers = files["servers.conf"]
    for profile in spec.profiles():
        location = servers.split(f"location @{profile.name} {{", 1)[1].split("\n    }", 1)[0]
        assert ("proxy_set_header X-ISHGW-Model $gw_model_header;" in location) is profile.model_header
    routes = json.loads(files["routes.json"])
    assert json.dumps(routes).count(f'"@{by_model["gpt-4o"].profile.name}"') >= 1
    assert "map $http_x_ishgw_model $gw_dep_" in files["shims.conf"]


def test_an_endpoints_home_is_the_profile_most_of_its_pools_have() -> None:
    def ollama(name: str, models: list[str], timeout: float = 120.0) -> InstanceConfig:
        return InstanceConfig(
            name=name,
            provider_type="ollama",
            api_base="http://127.0.0.1:1",
            supported_models=models,
            instance_type="chat",
            timeout_seconds=timeout,
        )

    spec = spec_for([ollama("a", ["m1", "m2"]), ollama("b", ["m3"], timeout=45)])
    chat = next(e for e in spec.endpoints if e.path == "/v1/chat/completions")
    embeddings = next(e for e in spec.endpoints if e.path == "/v1/embeddings")
    home = spec.home_profile(chat)
    assert home is not None and home.read_timeout_s == 120  # two pools (m1, m2) against one (m3)
    assert spec.home_profile(embeddings) is None  # no pool of that kind
    routes = routes_data(spec)["endpoints"]
    assert isinstance(routes, dict)
    assert (
        routes["/v1/chat/completions"]["home"] == f"@{home.name}" and "home" not in routes["/v1/embeddings"]
    )
    servers = render(spec).files["servers.conf"]
    chat_location = servers.split('location = "/v1/chat/completions" {', 1)[1].split("\n    }\n", 1)[0]
    assert f"(@{home.name})" in chat_location and "proxy_read_timeout 120s;" in chat_location
    assert 'rewrite_by_lua_block { gw_gateway.route("/v1/chat/completions") }' in chat_location
    # Its own path, not $uri looked up in $gw_upstream_path's map (the named locations' way).
    assert 'proxy_pass "http://${gw_upstream}/v1/chat/completions${is_args}${args}";' in chat_location
    embed_location = servers.split('location = "/v1/embeddings" {', 1)[1].split("\n    }\n", 1)[0]
    assert "proxy_pass" not in embed_location and 'gw_gateway.answer("unavailable")' in embed_location
    assert "add_header X-Request-ID $gw_request_id always;" in embed_location
    # A tie goes to the first profile in order; a pool without members has no say.
    tied = spec_for([ollama("a", ["m1"]), ollama("b", ["m3"], timeout=45)])
    tied_chat = next(e for e in tied.endpoints if e.path == "/v1/chat/completions")
    assert tied.home_profile(tied_chat) == min(
        p for p in tied.profiles() if p.kind == "chat" and p.family == "openai"
    )
