"""``/metrics`` of a ``[cluster]`` process: the whole gateway's figures, read from the shared
state at each scrape, and this process's own.

Two kinds of series, told apart by one label:
- this process's own (every series of ``telemetry.metrics`` and the pool's collector: requests,
  errors, timings, its view of the servers, ...) carry ``member="<member id>"`` (the id
  ``/admin/models`` lists); a sum over the members is the gateway's total;
- the whole gateway's carry no ``member``, and every member gives the same figure: each
  model's ``gateway_queue_depth`` and ``gateway_in_flight`` (every process's requests), its
  servers by state as the owner publishes them (``gateway_cluster_servers``), the live members
  and the owner's fencing token. A scrape of every member sees them once per member: take
  ``max by (model)``, never a sum.
``gateway_cluster_state_up{member}`` is 1 when this scrape read the shared state (one call of
``cluster/view.lua``, bounded by its timeout), 0 when it could not: then the whole gateway's
series are absent and the process's own are there as ever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cluster.view import ClusterView, Picture

# The process's own readings of what the shared state holds for the whole gateway: replaced.
CLUSTER_WIDE = frozenset({"gateway_queue_depth", "gateway_in_flight"})


class ClusterMetrics:
    def __init__(self, registry: Collector, view: ClusterView, member: str, *,
                 owns: Callable[[], bool], states: Sequence[str]) -> None:
        self.registry = registry
        self.view = view
        self.member = member
        self.owns = owns
        self.states = states

    async def render(self) -> bytes:
        picture = await self.view.refresh()
        return generate_latest(_Scrape(self, picture))


class _Scrape(Collector):
    """One scrape: the process's families, labelled, then the cluster's from ``picture``."""

    def __init__(self, metrics: ClusterMetrics, picture: Picture | None) -> None:
        self.metrics = metrics
        self.picture = picture

    def collect(self) -> Iterator[Metric]:
        member = self.metrics.member
        for family in self.metrics.registry.collect():
            if family.name in CLUSTER_WIDE:
                continue
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s._replace(labels={**s.labels, "member": member})
                                for s in family.samples]
            yield labelled
        up = GaugeMetricFamily("gateway_cluster_state_up", "1 when this scrape read the "
                               "cluster's shared state (Redis), 0 when it could not.",
                               labels=["member"])
        up.add_metric([member], 1.0 if self.picture is not None else 0.0)
        owns = GaugeMetricFamily("gateway_cluster_owns_pool",
                                 "1 while this process owns the pool, else 0.", labels=["member"])
        owns.add_metric([member], 1.0 if self.metrics.owns() else 0.0)
        yield up
        yield owns
        if self.picture is not None:
            yield from self._cluster(self.picture)

    def _cluster(self, picture: Picture) -> Iterator[Metric]:
        depth = GaugeMetricFamily("gateway_queue_depth", "Requests waiting for a slot of their "
                                  "model, in every process of the cluster.", labels=["model"])
        flight = GaugeMetricFamily("gateway_in_flight", "Requests of a model holding a slot, in "
                                   "every process of the cluster.", labels=["model"])
        for model, (queued, in_flight) in picture.models.items():
            depth.add_metric([model], queued)
            flight.add_metric([model], in_flight)
        servers = GaugeMetricFamily("gateway_cluster_servers", "A model's servers in each state, "
                                    "as the pool's owner publishes them.",
                                    labels=["model", "state"])
        for model, replicas in picture.servers.items():
            for state in self.metrics.states:
                servers.add_metric([model, state],
                                   sum(1 for r in replicas if r["state"] == state))
        members = GaugeMetricFamily("gateway_cluster_members",
                                    "Processes of the cluster whose lease runs.")
        members.add_metric([], len(picture.members))
        yield from (depth, flight, servers, members)
        if picture.owner is not None:
            token = GaugeMetricFamily("gateway_cluster_owner_token",
                                      "The fencing token of the pool's owner (grows with each "
                                      "new owner); absent while no one owns the pool.")
            token.add_metric([], picture.owner["token"])
            yield token
