"""The shipped Prometheus files, proven with Debian's prometheus: promtool checks the configuration and the
rules and runs the rules' unit tests; then a live Prometheus (its own port and data directory) scrapes a
gateway's controller under a short bounded load, and every PromQL expression of the Grafana dashboard is
evaluated through Prometheus's HTTP API: each parses and returns at least one series."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.backends.stub_llm import StubServer
from tests.integration.gateway import ROOT, Gateway, wait_for
from tests.integration.load import Load
from tests.integration.test_health_chaos import register
from tests.ports import free_port
from tests.tls_util import make_self_signed

COMPOSE = ROOT / "compose"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "ish-gateway.json"
LOAD_SECONDS = 4.0
LOAD_REQUESTS = 400
STREAMS = 10


@pytest.fixture(scope="session")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None or shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run scripts/test.sh, which installs it")
    return found


@pytest.fixture
def prometheus_dir(tmp_path: Path) -> Path:
    """compose/prometheus as Prometheus reads it, with the admin key file it names."""
    target = tmp_path / "prometheus"
    shutil.copytree(COMPOSE / "prometheus", target)
    key = target / "ishgw_admin_key"
    key.write_text("test-admin-key-0123456789\n")
    key.chmod(0o600)
    return target


def promtool_run(promtool: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_promtool_checks_config_and_rules(promtool: str, prometheus_dir: Path) -> None:
    assert "SUCCESS" in promtool_run(promtool, "check", "config", "prometheus.yml", cwd=prometheus_dir)
    assert "SUCCESS: 8 rules found" in promtool_run(
        promtool, "check", "rules", "alerts.yml", cwd=prometheus_dir
    )


def test_every_alert_has_a_passing_unit_test(promtool: str, prometheus_dir: Path) -> None:
    rules = yaml.safe_load((prometheus_dir / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert alerts == {
        "IshgwInstanceDown",
        "IshgwPoolWithoutInstance",
        "IshgwHighErrorRate",
        "IshgwHighLatencyP95",
        "IshgwBreakerOpen",
        "IshgwReloadFailed",
        "IshgwCertificateExpiresSoon",
        "IshgwControllerDown",
    }
    tests = yaml.safe_load((prometheus_dir / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested == alerts
    assert "SUCCESS" in promtool_run(promtool, "test", "rules", "alerts_test.yml", cwd=prometheus_dir)


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


class Prometheus:
    """prometheus on a free loopback port with its own data directory, scraping a controller every second."""

    def __init__(self, source: Path, admin_port: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ishgw-prom-", dir="/tmp"))
        shutil.copytree(source, self.dir / "config")
        config = yaml.safe_load((self.dir / "config" / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        (job,) = config["scrape_configs"]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{admin_port}"]}]
        (self.dir / "config" / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    def query(self, expr: str) -> dict[str, Any]:
        answer = httpx.get(f"{self.api}/query", params={"query": expr}, timeout=5).json()
        return answer  # type: ignore[no-any-return]

    def __enter__(self) -> Prometheus:
        log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={self.dir / 'config' / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=log,
        )
        wait_for(self._ready, timeout=30, what="prometheus ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError((self.dir / "prometheus.log").read_text()[-3000:])
        return httpx.get(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).status_code == 200

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            print((self.dir / "prometheus.log").read_text(errors="replace")[-3000:])
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(15)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def scraped_gateway(promtool: str) -> Iterator[tuple[Gateway, Prometheus]]:
    """A gateway with HTTPS and usage accounting, two instances, scraped by a live Prometheus (once)."""
    stubs = [StubServer(name=f"pm{i}").start() for i in range(2)]
    https_port = free_port()
    gateway = Gateway(
        extra_env={
            "ISHGW_HTTPS_PORT": str(https_port),
            "ISHGW_USAGE_ACCOUNTING": "true",
            "ISHGW_USAGE_DRAIN_INTERVAL_S": "0.5",
        }
    )
    make_self_signed(gateway.home / "ssl" / "cert.pem", gateway.home / "ssl" / "key.pem")
    source = Path(tempfile.mkdtemp(prefix="ishgw-promsrc-", dir="/tmp"))
    shutil.copytree(COMPOSE / "prometheus", source, dirs_exist_ok=True)
    (source / "ishgw_admin_key").write_text(gateway.admin_key + "\n")
    (source / "ishgw_admin_key").chmod(0o600)
    try:
        with gateway:
            for stub in stubs:
                register(gateway, stub.name, stub, cost_per_1k_tokens=0.5)
            gateway.wait_applied()
            with Prometheus(source, gateway.admin_port) as prometheus:
                yield gateway, prometheus
    finally:
        for stub in stubs:
            stub.stop()
        shutil.rmtree(source, ignore_errors=True)


def drive_traffic(gateway: Gateway) -> int:
    """Bounded: LOAD_SECONDS or LOAD_REQUESTS plain chat requests, STREAMS streams, one unknown model."""
    with Load(
        gateway.url, "m", sdk=False, threads=2, seconds=LOAD_SECONDS, max_requests=LOAD_REQUESTS
    ) as load:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(STREAMS):
            with gateway.client.stream("POST", "/v1/chat/completions", json=body) as answer:
                assert answer.status_code == 200
                assert answer.headers["content-type"].startswith("text/event-stream")
                answer.read()
        unknown = gateway.client.post("/v1/chat/completions", json={**body, "model": "no-such-model"})
        assert unknown.status_code >= 400
        wait_for(lambda: load.total >= 100, timeout=LOAD_SECONDS + 10, what="load under way")
    assert load.failures == []
    return load.total


def test_live_prometheus_evaluates_every_dashboard_expression(
    scraped_gateway: tuple[Gateway, Prometheus],
) -> None:
    gateway, prometheus = scraped_gateway
    wait_for(
        lambda: prometheus.query('up{job="ishgw-controller"} == 1')["data"]["result"], what="first scrape"
    )
    sent = drive_traffic(gateway)
    expressions = dashboard_expressions()
    assert len(expressions) >= 20
    started = time.monotonic()
    answers: dict[str, dict[str, Any]] = {}

    def all_return_series() -> bool:
        for expr in expressions:
            if not answers.get(expr, {}).get("data", {}).get("result"):
                answers[expr] = prometheus.query(expr)
                assert answers[expr]["status"] == "success", (expr, answers[expr])  # it parses
        return all(answers[expr]["data"]["result"] for expr in expressions)

    try:
        wait_for(all_return_series, timeout=30, interval=0.5, what="every dashboard expression")
    except AssertionError:
        empty = [expr for expr in expressions if not answers.get(expr, {}).get("data", {}).get("result")]
        raise AssertionError(f"no series for: {empty}") from None
    print(
        f"\n[prometheus] {len(expressions)} expressions, {sent} requests, all with series after "
        f"{time.monotonic() - started:.1f} s"
    )

    # The series count what was sent, by the labels the README names.
    def counted() -> float:
        total = prometheus.query('sum(ishgw_requests_total{model="m",code_class="2xx"})')["data"]["result"]
        return float(total[0]["value"][1])

    wait_for(lambda: counted() >= sent + STREAMS, timeout=10, what=f"{sent + STREAMS} requests counted")
    streams = prometheus.query("sum(ishgw_time_to_first_byte_seconds_count)")["data"]["result"]
    assert float(streams[0]["value"][1]) >= 1
    refused = prometheus.query('ishgw_requests_total{instance="none"}')["data"]["result"]
    assert refused, "the unknown model's answer is counted without an instance"
    nodes = {r["metric"].get("node") for r in prometheus.query("ishgw_instance_up")["data"]["result"]}
    assert nodes == {f"127.0.0.1:{gateway.admin_port}"}
    instances = {r["metric"]["instance"] for r in prometheus.query("ishgw_instance_up")["data"]["result"]}
    assert instances == {"pm0", "pm1"}


def test_live_prometheus_loads_the_alert_rules(scraped_gateway: tuple[Gateway, Prometheus]) -> None:
    _, prometheus = scraped_gateway
    groups = httpx.get(f"{prometheus.api}/rules", timeout=5).json()["data"]["groups"]
    names = {rule["name"] for group in groups for rule in group["rules"]}
    assert len(names) == 8 and "IshgwInstanceDown" in names
    assert all(rule["health"] != "err" for group in groups for rule in group["rules"])
