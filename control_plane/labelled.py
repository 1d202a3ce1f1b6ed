"""Labelled series kept as plain values, turned into Prometheus samples when /metrics is scraped.

prometheus-client's labelled Counter and Gauge keep a child object per label set (the child, a value
object and a lock: about 700 bytes each). Per instance the controller has several such families (probes,
upstream attempts, tokens, cost, availability): at 10,000 instances about 60,000 children, some 45 MB of
the controller's memory, most of them made as traffic reaches more instances. Here a family is one dict of
label tuple -> number (an int while only whole numbers were added: CPython shares the small ones), about
150 bytes a series; collect() yields the same name, type, labels and values as the Counter or Gauge did
(without the `_created` samples, like the other families built at scrape time, e.g. ishgw_requests_total).

Updated and collected on the event loop's thread, as the rest of the controller's state.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

Labels = tuple[str, ...]


class _Family(Collector):
    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry | None
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.values: dict[Labels, float] = {}
        if registry is not None:
            registry.register(self)

    def value(self, *labels: str) -> float | None:
        return self.values.get(labels)

    def _family(self) -> CounterMetricFamily | GaugeMetricFamily:
        raise NotImplementedError

    def describe(self) -> Iterator[Metric]:
        """The family without samples: what the registry checks names against at register()."""
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for labels, value in list(self.values.items()):
            family.add_metric(labels, value)
        yield family


class LabelledCounter(_Family):
    """A counter family: ``name`` as prometheus-client's Counter takes it (ending in ``_total`` or not:
    the samples are ``<name without _total>_total``)."""

    def inc(self, labels: Labels, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        values = self.values
        values[labels] = values.get(labels, 0) + amount

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)


class LabelledGauge(_Family):
    """A gauge family whose owner hands it every value at once (``replace``): the owner's own map is
    the family's state, no copy is kept."""

    def replace(self, values: dict[Labels, float]) -> None:
        self.values = values

    def set(self, labels: Labels, value: float) -> None:
        self.values[labels] = value

    def remove(self, *labels: str) -> None:
        self.values.pop(labels, None)

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
