"""Prometheus metrics of the controller, on a registry the app owns (tests use a fresh one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from control_plane.labelled import LabelledCounter, LabelledGauge


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, key_label: bool = False) -> None:
        self.registry = registry
        # ISHGW_METRICS_KEY_LABEL: the usage counters get a key label (one series per key: cardinality).
        self.key_label = key_label
        usage_key = ["key"] if key_label else []
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
        # Per instance: label tuple -> value, samples built at scrape time (labelled.py).
        self.instance_available = LabelledGauge(
            "ishgw_instance_available", "1 when the instance takes traffic", ["instance"], registry
        )
        self.upstream_attempts = LabelledCounter(
            "ishgw_upstream_attempts_total",
            "attempts per instance from nginx's log stream, by what they say about the instance",
            ["instance", "outcome"],
            registry,
        )
        self.log_records = Counter(
            "ishgw_log_records_total", "access log records received from nginx", registry=registry
        )
        self.probes = LabelledCounter(
            "ishgw_probes_total", "active probes by outcome", ["instance", "outcome"], registry
        )
        self.tokens = LabelledCounter(
            "ishgw_tokens_total",
            "tokens counted by nginx and stored, per instance, model and direction (prompt, completion)",
            ["instance", "model", "direction", *usage_key],
            registry,
        )
        self.cost = LabelledCounter(
            "ishgw_cost_usd_total",
            "cost of the stored usage at the instances' rates (USD)",
            ["instance", "model", *usage_key],
            registry,
        )
        self.usage_drains = Counter(
            "ishgw_usage_drains_total",
            "usage drains from nginx by result (stored, empty, repeated, failed)",
            ["result"],
            registry=registry,
        )
        self.weight_updates = Counter(
            "ishgw_weight_reloads_total",
            "learned weights applied (each asks for one reconcile: at most one nginx reload)",
            registry=registry,
        )

    def count_usage(
        self, instance: str, model: str, key: str, prompt: int, completion: int, cost: float
    ) -> None:
        """A stored usage bucket into ishgw_tokens_total and ishgw_cost_usd_total (key "": anonymous)."""
        extra = (key,) if self.key_label else ()
        if prompt:
            self.tokens.inc((instance, model, "prompt", *extra), prompt)
        if completion:
            self.tokens.inc((instance, model, "completion", *extra), completion)
        if cost:
            self.cost.inc((instance, model, *extra), cost)
