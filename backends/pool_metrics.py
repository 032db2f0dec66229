"""The pool's figures for Prometheus, read at scrape time from the pool itself: each model's
and each replica's state, the counts of starts, evictions, sleeps, wakes and scale changes, the
measured VRAM, the requests each replica serves now, a model with replicas' routing (the
requests routed, by why; the prompt blocks matched; the prefix index's size), and the LoRA
adapters each replica holds (with the adapters' loads, unloads and failed loads). The pool owns
these numbers; this collector only reads them, so the number exposed is the number in force.
The app registers it on the gateway's registry (telemetry.metrics), which knows nothing of the
pool.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .pool import BackendPool, ModelState

MIB = 1024 * 1024


class PoolMetrics(Collector):
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
        routed = CounterMetricFamily(
            "gateway_routed_requests", "Requests of a model with replicas routed to one, by why: "
            "session, prefix (the longest prompt prefix it holds), hash (no replica holds the "
            "prompt's first block: its rendezvous hash), load (the least loaded).",
            labels=["model", "reason"])
        matched = CounterMetricFamily(
            "gateway_prefix_matched_blocks", "Prompt blocks (prefix_block_chars each) found on "
            "the replica a request was routed to by prefix.", labels=["model"])
        index = GaugeMetricFamily(
            "gateway_prefix_index_blocks", "Prompt blocks the prefix index of a model remembers "
            "(at most its prefix_index_size).", labels=["model"])
        for model in self.pool.replicated:
            for reason, count in model.routed.items():
                routed.add_metric([model.name, reason], count)
            if model.prefixes is not None:
                matched.add_metric([model.name], model.matched_blocks)
                index.add_metric([model.name], len(model.prefixes))
        adapter_loaded = GaugeMetricFamily(
            "gateway_adapter_loaded", "1 where a replica of a model holds a LoRA adapter now, 0 "
            "where it does not.", labels=["model", "adapter", "replica"])
        adapters = self.pool.adapters
        adapter_counters = [
            (CounterMetricFamily(name, documentation, labels=["model", "adapter"]), counts)
            for name, documentation, counts in (
                ("gateway_adapter_loads_total", "LoRA adapter loads made on a server.",
                 adapters.loads),
                ("gateway_adapter_unloads_total",
                 "LoRA adapters unloaded from a server to make room (max_loras).",
                 adapters.unloads),
                ("gateway_adapter_load_failures_total",
                 "LoRA adapter loads that failed (or timed out).", adapters.failures))]
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
                loaded = adapters.loaded(r)
                for adapter in backend.settings.adapters:
                    adapter_loaded.add_metric([name, adapter.name, replica],
                                              1.0 if adapter.name in loaded else 0.0)
            for adapter in backend.settings.adapters:
                for family, counts in adapter_counters:
                    family.add_metric([name, adapter.name], counts[adapter.name])
        yield state
        yield from (family for family, _ in counters)
        yield from (family for family, _ in model_counters)
        yield vram
        yield replica_state
        yield replica_in_flight
        yield routed
        yield matched
        yield index
        yield adapter_loaded
        yield from (family for family, _ in adapter_counters)
