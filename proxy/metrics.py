"""Prometheus metrics of one gateway, on a registry of its own (several apps can share a process).

Figures that a layer or the pool already keeps (queue depth, in flight, each model's state,
starts, evictions, sleeps, wakes, measured VRAM) are read at scrape time from their owner, so
the number exposed is the number in force and is changed in one place only. What only exists as
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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from backends.pool import BackendPool, ModelState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MIB = 1024 * 1024

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


class _PoolAtScrape(Collector):
    """Each model's state, counts and measured VRAM, as the pool has them now."""

    # Each per-model counter: its name, what it counts, the Backend attribute that holds it.
    COUNTERS = (
        ("gateway_cold_starts_total", "Times a model's server was started and became ready.",
         "starts"),
        ("gateway_evictions_total",
         "Times an idle model was stopped (or put to sleep) to make room for another.",
         "evictions"),
        ("gateway_sleeps_total", "Times a model's server was put to sleep (vLLM's sleep mode).",
         "sleeps"),
        ("gateway_wakes_total", "Times a model's server was woken from sleep and became ready.",
         "wakes"),
    )
    # Counted once per model (on its first replica), not summed over its replicas.
    MODEL_COUNTERS = (
        ("gateway_scale_ups_total",
         "Replica starts or wakes begun for load or to keep min_replicas.",
         "scale_ups"),
        ("gateway_scale_downs_total",
         "Times an idle replica of a model with replicas was stopped or put to sleep.",
         "scale_downs"),
    )

    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = GaugeMetricFamily("gateway_backend_state",
                                  "1 for the state each model's backend is in, 0 for the others.",
                                  labels=["model", "state"])
        counters = [(CounterMetricFamily(name, documentation, labels=["model"]), attribute)
                    for name, documentation, attribute in self.COUNTERS]
        model_counters = [(CounterMetricFamily(name, documentation, labels=["model"]), attribute)
                          for name, documentation, attribute in self.MODEL_COUNTERS]
        vram = GaugeMetricFamily("gateway_backend_measured_vram_bytes",
                                 "GPU memory a model took when it started, as measured (NVML).",
                                 labels=["model"])
        replica_state = GaugeMetricFamily(
            "gateway_replica_state", "1 for the state each replica of a model is in, 0 for the "
            "others.", labels=["model", "replica", "state"])
        replica_in_flight = GaugeMetricFamily(
            "gateway_replica_in_flight", "Requests forwarded to a replica of a model now.",
            labels=["model", "replica"])
        for name, backend in self.pool.backends.items():
            replicas = self.pool.replicas[name]
            now = self.pool.state_of(name)
            for each in ModelState:
                state.add_metric([name, each.value], 1.0 if now is each else 0.0)
            for family, attribute in counters:
                family.add_metric([name], sum(getattr(r, attribute) for r in replicas))
            for family, attribute in model_counters:
                family.add_metric([name], getattr(self.pool.models[name], attribute))
            if backend.measured_vram_mb is not None:
                vram.add_metric([name], backend.measured_vram_mb * MIB)
            for r in replicas:
                replica = str(r.replica)
                for each in ModelState:
                    replica_state.add_metric([name, replica, each.value],
                                             1.0 if r.state is each else 0.0)
                replica_in_flight.add_metric([name, replica], r.leases)
        yield state
        yield from (family for family, _ in counters)
        yield from (family for family, _ in model_counters)
        yield vram
        yield replica_state
        yield replica_in_flight


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
        Gauge("gateway_build_info", "The gateway's version; always 1.", ["version"],
              registry=self.registry).labels(version("vllm-gateway")).set(1)

    def gauge(self, name: str, documentation: str, read: PerModel) -> None:
        """Expose a per-model figure that a layer owns; read when Prometheus scrapes."""
        self._gauges.add(name, documentation, read)

    def watch_pool(self, pool: BackendPool) -> None:
        """Expose the pool's per-model figures; read when Prometheus scrapes."""
        self.registry.register(_PoolAtScrape(pool))

    def reject(self, model: str, reason: str) -> None:
        self._rejected(model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
