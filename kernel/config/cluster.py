"""The ``[cluster]`` section: the Redis that several gateway processes share their state in.

Off unless ``cluster.redis_url`` is set (in the table or by ``GATEWAY_CLUSTER_REDIS_URL``):
then the queues and slots of every process that shares ``key_prefix`` are counted in that Redis
(``cluster.accounting``), exactly. ``redis_url`` is a ``redis://``, ``rediss://`` or
``unix://`` URL; a password in it is a secret (masked wherever the configuration is shown).
``key_prefix`` defaults to one made from ``gateway.instance``, so that two independent gateways
can share one Redis. A process holds its slots and queue places under a lease of ``lease_s`` it
renews every ``heartbeat_s`` (a third of the lease unless set): one that stops renewing (killed)
has them reclaimed by the others. One process, elected, owns the pool (``cluster.owner``) and
starts and stops the model servers; the others route to them (``backends.shared``). A new
owner adopts the containers the last one left running (by their labels, made from
``key_prefix``), so an engine's ``on_start = "remove"`` is refused in a cluster: it would remove
them at every change of owner.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

from .engines import EngineSettings
from .models import ModelSettings
from .validation import _NO_BOUNDS, ConfigError, _fail, _is_url, _Sources, _spec

SCHEMES = ("redis", "rediss", "unix")


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterSettings:
    redis_url: str | None = _spec(None)
    key_prefix: str | None = _spec(None)
    lease_s: float = _spec(10.0, lo=1.0, hi=3600.0)
    heartbeat_s: float | None = _spec(None, lo=0.1, hi=3600.0)
    # Derived (``_resolve_cluster``): whether the state is shared, and the heartbeat in force.
    enabled: bool = dataclasses.field(default=False, metadata={**_NO_BOUNDS, "derived": True})
    heartbeat: float = dataclasses.field(default=0.0, metadata={**_NO_BOUNDS, "derived": True})


def _resolve_cluster(settings: ClusterSettings, instance: str | None,
                     models: tuple[ModelSettings, ...], engines: Mapping[str, EngineSettings],
                     sources: _Sources) -> ClusterSettings:
    """Check the table against itself and the models; fill in the prefix and the heartbeat."""
    given = {f.name for f in dataclasses.fields(settings) if not f.metadata.get("derived")
             and getattr(settings, f.name) != f.default}
    if settings.redis_url is None:
        if given:
            key = sorted(given)[0]
            raise ConfigError(f"cluster.{key} (from {sources.of(f'cluster.{key}')}): "
                              "[cluster] needs cluster.redis_url (or GATEWAY_CLUSTER_REDIS_URL)")
        return settings
    if not _is_url(settings.redis_url, SCHEMES):
        # The URL may hold a password: name the key, not the value.
        raise ConfigError(f"cluster.redis_url (from {sources.of('cluster.redis_url')}): must be "
                          "a redis://, rediss:// or unix:// URL")
    heartbeat = settings.heartbeat_s if settings.heartbeat_s is not None else settings.lease_s / 3
    if heartbeat >= settings.lease_s:
        _fail("cluster.heartbeat_s", settings.heartbeat_s, sources,
              f"less than cluster.lease_s ({settings.lease_s:g})")
    used = {engine for m in models if m.launcher == "container" for engine, _ in m.placements}
    removing = next((e for name, e in engines.items() if name in used
                     and e.on_start == "remove"), None)
    if removing is not None:
        _fail(f"engines.{removing.name}.on_start", removing.on_start, sources,
              "'adopt' in a [cluster]: a new pool owner adopts the containers the last one "
              "left running")
    adapted = next((m for m in models if m.adapters), None)
    if adapted is not None:
        # Which adapters a server holds is known to the process that loaded them only.
        raise ConfigError(
            f"models[{json.dumps(adapted.name)}].adapters (from {sources.file}): a [cluster] "
            "gateway does not load LoRA adapters yet (each process would count a server's "
            "adapters on its own, and max_loras would not hold); leave them out with "
            "cluster.redis_url")
    prefix = settings.key_prefix or f"vllm-gateway:{instance or 'default'}"
    return dataclasses.replace(settings, key_prefix=prefix, enabled=True, heartbeat=heartbeat)

