"""Prometheus metrics of one gateway, on a registry of its own (several apps can share a process).

Gauges that mirror a counter kept by a layer (queue depth, in flight) are read at scrape time
from that layer, so the number exposed is the number in force and is changed in one place only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The *_created series double every counter on the hot scrape path and nobody graphs them.
disable_created_metrics()

PerModel = Callable[[], Iterable[tuple[str, float]]]


class _ReadAtScrape(Collector):
    def __init__(self) -> None:
        self._gauges: list[tuple[str, str, PerModel]] = []

    def add(self, name: str, documentation: str, read: PerModel) -> None:
        self._gauges.append((name, documentation, read))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, documentation, read in self._gauges:
            family = GaugeMetricFamily(name, documentation, labels=["model"])
            for model, value in read():
                family.add_metric([model], value)
            yield family


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._gauges = _ReadAtScrape()
        self.registry.register(self._gauges)
        self.rejected = Counter(
            "gateway_rejected_total", "Requests the gateway refused, by reason.",
            ["model", "reason"], registry=self.registry)
        self.requests = Counter(
            "gateway_requests_total", "Requests answered, by model and status.",
            ["model", "status"], registry=self.registry)
        self.retries = Counter(
            "gateway_upstream_retries_total", "Upstream attempts repeated after a connect failure.",
            ["model"], registry=self.registry)

    def gauge(self, name: str, documentation: str, read: PerModel) -> None:
        """Expose a per-model figure that a layer owns; read when Prometheus scrapes."""
        self._gauges.add(name, documentation, read)

    def reject(self, model: str, reason: str) -> None:
        self.rejected.labels(model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
