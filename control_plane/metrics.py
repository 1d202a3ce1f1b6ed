"""Prometheus metrics of the controller, on a registry the app owns (tests use a fresh one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.reloads = Counter(
            "ishgw_config_reloads_total", "nginx reloads by result", ["result"], registry=registry
        )
        self.last_reload_ok = Gauge(
            "ishgw_config_last_reload_successful", "1 when the last reload succeeded", registry=registry
        )
        self.reconcile_seconds = Histogram(
            "ishgw_reconcile_duration_seconds",
            "render + nginx -t + swap + reload",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.generation = Gauge(
            "ishgw_config_generation", "registry configuration generation", registry=registry
        )
        self.pools = Gauge("ishgw_pools", "rendered pools", registry=registry)
        self.pool_members = Gauge(
            "ishgw_pool_available_instances",
            "available instances per pool",
            ["pool", "model"],
            registry=registry,
        )
        self.excluded = Gauge(
            "ishgw_instances_excluded", "instances left out of every pool", registry=registry
        )
        self.instance_available = Gauge(
            "ishgw_instance_available", "1 when the instance takes traffic", ["instance"], registry=registry
        )
        self.upstream_attempts = Counter(
            "ishgw_upstream_attempts_total",
            "attempts per instance from nginx's log stream, by what they say about the instance",
            ["instance", "outcome"],
            registry=registry,
        )
        self.log_records = Counter(
            "ishgw_log_records_total", "access log records received from nginx", registry=registry
        )
        self.probes = Counter(
            "ishgw_probes_total", "active probes by outcome", ["instance", "outcome"], registry=registry
        )
        self.tokens = Counter(
            "ishgw_tokens_total",
            "tokens counted by nginx and stored, per instance, model and direction (prompt, completion)",
            ["instance", "model", "direction"],
            registry=registry,
        )
        self.cost = Counter(
            "ishgw_cost_usd_total",
            "cost of the stored usage at the instances' rates (USD)",
            ["instance", "model"],
            registry=registry,
        )
        self.usage_drains = Counter(
            "ishgw_usage_drains_total",
            "usage drains from nginx by result (stored, empty, repeated, failed)",
            ["result"],
            registry=registry,
        )
        self.traffic = TrafficMetrics(registry)


# LLM latencies: a cached embedding in 50 ms, a long generation in minutes (issue 14).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


class TrafficMetrics:
    """Request series from nginx's access-log stream (control_plane/health/traffic.py feeds them). Every
    label comes from the registry (pools, models, instances) or a fixed set: no per-request or per-key
    label."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "ishgw_requests_total",
            "requests nginx answered, by pool, model, the instance that answered last and status class",
            ["pool", "model", "instance", "code_class"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "ishgw_request_duration_seconds",
            "time nginx spent on a request (all attempts), by model and the instance that answered last",
            ["model", "instance"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "ishgw_upstream_duration_seconds",
            "one attempt's upstream response time, by model and instance",
            ["model", "instance"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.first_byte = Histogram(
            "ishgw_time_to_first_byte_seconds",
            "streamed answers (SSE, NDJSON): time to the upstream's response header, by model and instance",
            ["model", "instance"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "ishgw_retries_total", "attempts after a request's first (next upstream)", registry=registry
        )
        self.client_errors = Counter(
            "ishgw_client_errors_total",
            "requests the gateway itself refused: unauthorized (401), forbidden (403), rate_limited (429)",
            ["reason"],
            registry=registry,
        )
        for reason in ("unauthorized", "forbidden", "rate_limited"):  # known label values start at 0
            self.client_errors.labels(reason)
