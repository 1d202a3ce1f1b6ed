"""control_plane/labelled.py: the per-instance families write what prometheus-client's Counter and Gauge
wrote for the same updates (bar the `_created` samples), and the GatewayMetrics families keep their names,
types and labels."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from control_plane.labelled import LabelledCounter, LabelledGauge
from control_plane.metrics import GatewayMetrics

UPDATES: list[tuple[tuple[str, ...], float]] = [
    (("a", "ok"), 1),
    (("a", "ok"), 1),
    (("b", "failure"), 3),
    (("a", "rate_limited"), 0.25),
    (('we"ird\\name\n', "ok"), 2),  # escaped as prometheus-client escapes it
    (("c", "ok"), 0),
    (("a", "ok"), 10**12),
]


def exposition(registry: CollectorRegistry) -> list[str]:
    return [
        line
        for line in generate_latest(registry).decode().splitlines()
        if "_created" not in line  # prometheus-client's own counters add them; scrape-time families do not
    ]


def test_counter_family_writes_what_the_counter_wrote() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    counter = Counter("ishgw_x_total", "help text", ["instance", "outcome"], registry=theirs)
    family = LabelledCounter("ishgw_x_total", "help text", ["instance", "outcome"], ours)
    for labels, amount in UPDATES:
        counter.labels(*labels).inc(amount)
        family.inc(labels, amount)
    assert exposition(ours) == exposition(theirs)
    assert ours.get_sample_value("ishgw_x_total", {"instance": "a", "outcome": "ok"}) == 2 + 10**12


def test_gauge_family_writes_what_the_gauge_wrote() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    gauge = Gauge("ishgw_y", "help text", ["instance"], registry=theirs)
    family = LabelledGauge("ishgw_y", "help text", ["instance"], ours)
    for name, value in [("a", 1.0), ("b", 0.0), ("c", 1.0)]:
        gauge.labels(name).set(value)
        family.set((name,), value)
    gauge.remove("c")
    family.remove("c")
    family.remove("never-there")
    assert exposition(ours) == exposition(theirs)
    family.replace({("z",): 1})
    assert ours.get_sample_value("ishgw_y", {"instance": "z"}) == 1
    assert ours.get_sample_value("ishgw_y", {"instance": "a"}) is None


def test_counters_only_go_up_and_names_stay_unique() -> None:
    registry = CollectorRegistry()
    family = LabelledCounter("ishgw_z_total", "h", ["instance"], registry)
    with pytest.raises(ValueError):
        family.inc(("a",), -1)
    assert family.value("a") is None
    with pytest.raises(ValueError):  # the registry sees the family's names (describe) like a Counter's
        Counter("ishgw_z_total", "h", ["instance"], registry=registry)


@pytest.mark.parametrize("key_label", [False, True])
def test_gateway_metrics_keep_names_types_and_labels(key_label: bool) -> None:
    metrics = GatewayMetrics(CollectorRegistry(), key_label)
    metrics.instance_available.replace({("i1",): 1, ("i2",): 0})
    metrics.upstream_attempts.inc(("i1", "ok"))
    metrics.probes.inc(("i1", "ok"))
    metrics.count_usage("i1", "m", "k1", 5, 7, 0.5)
    families = {f.name: f for f in metrics.registry.collect()}
    key = ["key"] if key_label else []
    expected = {
        "ishgw_instance_available": ("gauge", ["instance"]),
        "ishgw_upstream_attempts": ("counter", ["instance", "outcome"]),
        "ishgw_probes": ("counter", ["instance", "outcome"]),
        "ishgw_tokens": ("counter", ["instance", "model", "direction", *key]),
        "ishgw_cost_usd": ("counter", ["instance", "model", *key]),
    }
    for name, (kind, label_names) in expected.items():
        family = families[name]
        assert family.type == kind
        assert all(list(sample.labels) == label_names for sample in family.samples), name
        assert all(not sample.name.endswith("_created") for sample in family.samples)
    value = metrics.registry.get_sample_value
    labels = {"instance": "i1", "model": "m", **({"key": "k1"} if key_label else {})}
    assert value("ishgw_tokens_total", {**labels, "direction": "prompt"}) == 5
    assert value("ishgw_tokens_total", {**labels, "direction": "completion"}) == 7
    assert value("ishgw_cost_usd_total", labels) == 0.5
    assert value("ishgw_instance_available", {"instance": "i2"}) == 0
