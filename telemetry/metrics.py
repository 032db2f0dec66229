"""Prometheus metrics of one gateway, on a registry of its own (several apps can share a process).

Figures that a layer or the pool already keeps (queue depth, in flight, each model's state,
starts, evictions, sleeps, wakes, measured VRAM) are read at scrape time from their owner (the
pool's by backends/pool_metrics.py, registered here by the app), so the number exposed is the
number in force and is changed in one place only. What only exists as
an event (a request's timings, a rejection) is counted here, on children resolved once per label
set: ``.labels()`` formats and locks on every call, so the hot path never calls it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import version
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The *_created series double every counter on the hot scrape path and nobody graphs them.
disable_created_metrics()

# Seconds. A slot comes in milliseconds or after up to queue_timeout (60 s by default); a first
# token in milliseconds to a minute; a whole answer up to upstream.timeout; vLLM starts in tens
# of seconds to many minutes.
QUEUE_WAIT_BUCKETS = (.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)
FIRST_BYTE_BUCKETS = (.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)
DURATION_BUCKETS = (.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
START_BUCKETS = (.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200)
# A wake from vLLM's sleep mode: 0.1 to a few seconds (level 2 reloads the weights from disk).
WAKE_BUCKETS = (.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)

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


class _Children:
    """The children of a labelled family, each resolved on first use and kept."""

    __slots__ = ("_children", "_family")

    def __init__(self, family: Counter | Histogram) -> None:
        self._family = family
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._family.labels(*labels)
        return child


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
        self.answered = _Children(self.requests)
        self.retried = _Children(self.retries)
        self._rejected = _Children(self.rejected)
        self.queue_wait = _Children(Histogram(
            "gateway_queue_wait_seconds", "Seconds a request waited for a slot of its model.",
            ["model"], buckets=QUEUE_WAIT_BUCKETS, registry=self.registry))
        self.first_byte = _Children(Histogram(
            "gateway_time_to_first_byte_seconds",
            "Seconds from a request's arrival to the first byte of its answer's body (for a "
            "stream, about the first token), for requests that got a slot.",
            ["model"], buckets=FIRST_BYTE_BUCKETS, registry=self.registry))
        self.request_duration = _Children(Histogram(
            "gateway_request_duration_seconds",
            "Seconds from a request's arrival to the end of its answer, for requests that got "
            "a slot.", ["model"], buckets=DURATION_BUCKETS, registry=self.registry))
        self.start_duration = _Children(Histogram(
            "gateway_backend_start_seconds",
            "Seconds from starting a model's server (room already made) until it answered its "
            "health check.", ["model"], buckets=START_BUCKETS,
            registry=self.registry))
        self.wake_duration = _Children(Histogram(
            "gateway_backend_wake_seconds",
            "Seconds from waking a model's server (room already made) until it said it was "
            "awake.", ["model"], buckets=WAKE_BUCKETS, registry=self.registry))
        self.reloads = Counter(
            "gateway_config_reloads_total", "Live reloads of the configuration, by outcome: "
            "applied, invalid (nothing changed) or refused (a key that cannot change live).",
            ["outcome"], registry=self.registry)
        self._config = Gauge("gateway_config_info", "The configuration in force, by its hash; "
                             "always 1.", ["hash"], registry=self.registry)
        # Per tenant and model (both bounded by the configuration).
        self.tenant_requests = _Children(Counter(
            "gateway_tenant_requests_total", "Requests of each tenant, refused ones included.",
            ["tenant", "model"], registry=self.registry))
        self.tenant_tokens = _Children(Counter(
            "gateway_tenant_tokens_total", "Tokens of each tenant's answers, as the backend "
            "reported them, by kind (prompt or completion).", ["tenant", "model", "kind"],
            registry=self.registry))
        self.tenant_errors = _Children(Counter(
            "gateway_tenant_errors_total", "Requests of each tenant that were refused or failed.",
            ["tenant", "model"], registry=self.registry))
        self.tenant_queue_wait = _Children(Counter(
            "gateway_tenant_queue_wait_seconds_total",
            "Seconds each tenant's requests waited for a slot, summed.", ["tenant", "model"],
            registry=self.registry))
        Gauge("gateway_build_info", "The gateway's version; always 1.", ["version"],
              registry=self.registry).labels(version("vllm-gateway")).set(1)

    def gauge(self, name: str, documentation: str, read: PerModel) -> None:
        """Expose a per-model figure that a layer owns; read when Prometheus scrapes."""
        self._gauges.add(name, documentation, read)

    def config_in_force(self, digest: str) -> None:
        self._config.clear()
        self._config.labels(digest).set(1)

    def reject(self, model: str, reason: str) -> None:
        self._rejected(model, reason).inc()

    def tenant_usage(self, tenant: str, model: str, prompt: int, completion: int, error: bool,
                     queue_wait: float) -> None:
        """One request of a tenant: its tokens, whether it failed, its wait for a slot."""
        self.tenant_requests(tenant, model).inc()
        if prompt:
            self.tenant_tokens(tenant, model, "prompt").inc(prompt)
        if completion:
            self.tenant_tokens(tenant, model, "completion").inc(completion)
        if error:
            self.tenant_errors(tenant, model).inc()
        if queue_wait:
            self.tenant_queue_wait(tenant, model).inc(queue_wait)

    def render(self) -> bytes:
        return generate_latest(self.registry)
