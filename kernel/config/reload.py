"""What a live reload of the configuration would change (``plan_reload``), and the
configuration's fingerprint (``config_hash``).

A reload compares the configuration in force with a new one, both validated. Each difference
is one of:
- a key that cannot change while the gateway runs (``FIXED``): what binds the socket, names the
  containers, or builds a part that lives as long as the process (the upstream client, the
  tracing, the shared state, the container engines, the event hub's bounds); the reload is
  refused, naming each;
- in a ``[cluster]``, a change of what its members share (``masking.shared``: the models and the
  shared limits): refused, as one member alone would leave two configurations in the cluster;
- a model added or removed;
- a model whose server must change (any field not in ``LIVE_MODEL_FIELDS``: its command, image,
  env, GPUs, replicas, ...): it is restarted (drained, then started anew on its next request);
- a model whose limits change only (``LIVE_MODEL_FIELDS``, or its effective ``max_concurrent``
  or ``max_queue_size`` through the ``[gateway]`` defaults): changed in place;
- any other key (``[gateway]`` limits and timeouts, ``[admin] token``, ``[auth]`` keys, the
  ``[[tenants]]``): in force for the next requests.

``config_hash`` is a short stable hash of everything that takes effect (secrets included, so a
changed token changes it; the file's name does not), shown by ``/health`` and the admin API so
that an operator can tell which configuration each process runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from .loader import SECTIONS, Config
from .masking import shared
from .models import ModelSettings

# Keys that cannot change while the gateway runs (a section's name: all of its keys).
FIXED = frozenset({
    "gateway.bind", "gateway.backlog", "gateway.keep_alive_timeout", "gateway.instance",
    "gateway.log_format", "gateway.trusted_proxies", "gateway.stream_keepalive",
    "gateway.max_response_ids", "gateway.gpu_memory_mb",
    "admin.events_buffer", "admin.events_streams", "admin.events_send_timeout",
    "upstream", "telemetry", "cluster", "engines",
})
# A model's fields that change no server: its limits, timers, names and placement figures.
LIVE_MODEL_FIELDS = frozenset({
    "aliases", "max_concurrent", "max_queue_size", "idle_timeout", "asleep_timeout",
    "startup_timeout", "failure_backoff", "health_interval", "health_failures",
    "scale_up_after", "affinity_slack", "min_replicas", "vram_mb",
})


@dataclasses.dataclass(frozen=True)
class ReloadPlan:
    """What a reload changes; ``refused`` non-empty: it changes nothing."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    # Model -> the fields that changed.
    restarted: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    changed: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # Other keys changed (``section.key``), and those of them that cannot change live.
    keys: tuple[str, ...] = ()
    refused: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"models": {"added": list(self.added), "removed": list(self.removed),
                           "restarted": {m: list(f) for m, f in self.restarted.items()},
                           "changed": {m: list(f) for m, f in self.changed.items()}},
                "keys": list(self.keys)}

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.restarted or self.changed or self.keys)


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
            if not f.metadata.get("derived")}


def _differ(old: Any, new: Any) -> list[str]:
    a, b = _fields(old), _fields(new)
    return [name for name in a if a[name] != b[name]]


def _model_changes(old: Config, new: Config, a: ModelSettings, b: ModelSettings) -> list[str]:
    fields = _differ(a, b)
    if a.placements != b.placements and "gpus" not in fields:
        fields.append("gpus")
    for name, of in (("max_concurrent", Config.max_concurrent_of),
                     ("max_queue_size", Config.max_queue_size_of)):
        if name not in fields and of(old, a) != of(new, b):
            fields.append(name)
    return fields


def _fixed(key: str) -> bool:
    return key in FIXED or key.partition(".")[0] in FIXED


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """What going from ``old`` to ``new`` changes, and what of it cannot change live."""
    keys = [f"{section}.{name}" for section in SECTIONS
            for name in _differ(getattr(old, section), getattr(new, section))]
    refused = [k for k in keys if _fixed(k)]
    if old.tenants != new.tenants:
        keys.append("tenants")
        if old.fair_queues != new.fair_queues:
            # The queues are first come first, or fair: not both in one run.
            refused.append("tenants (from one to several, or a max_concurrent of a tenant's "
                           "own set or unset: the queues' order cannot switch under them)")
    if old.client_keys != new.client_keys and not any(k.startswith(("auth.", "tenants"))
                                                      for k in keys):
        keys.append("auth.api_keys_file")  # the file's keys changed
    total = (old.gateway.max_concurrent_total, new.gateway.max_concurrent_total)
    if None in total and total[0] != total[1]:
        # Each request in flight holds one slot or two: the count cannot switch under it.
        refused.append("gateway.max_concurrent_total (set or unset)")
    for name in sorted(old.engines.keys() | new.engines.keys()):
        a, b = old.engines.get(name), new.engines.get(name)
        if a is None or b is None or a != b:
            keys.append(f"engines.{name}")
            refused.append(f"engines.{name}")
    if old.cluster.enabled and new.cluster.enabled:
        a, b = shared(old), shared(new)
        differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        if differ:
            # One member alone would leave the cluster with two configurations.
            refused.append(f"{differ[0]} (the configuration a [cluster]'s members share: "
                           "restart every member with the new one, or give it a new "
                           "cluster.key_prefix)")
    before = {m.name: m for m in old.models}
    after = {m.name: m for m in new.models}
    restarted: dict[str, tuple[str, ...]] = {}
    changed: dict[str, tuple[str, ...]] = {}
    for name in before.keys() & after.keys():
        fields = _model_changes(old, new, before[name], after[name])
        if any(f not in LIVE_MODEL_FIELDS for f in fields):
            restarted[name] = tuple(fields)
        elif fields:
            changed[name] = tuple(fields)
    return ReloadPlan(
        added=tuple(m for m in after if m not in before),
        removed=tuple(m for m in before if m not in after),
        restarted=dict(sorted(restarted.items())), changed=dict(sorted(changed.items())),
        keys=tuple(k for k in keys if not k.startswith("engines.")) + tuple(
            k for k in keys if k.startswith("engines.")),
        refused=tuple(refused))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list, frozenset, set)):
        items = [_plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (frozenset, set)) else items
    return value


def config_hash(config: Config) -> str:
    """A short hash of the configuration in force: equal configurations, equal hashes (in any
    process); the file it came from is not part of it."""
    data = {name: _plain(getattr(config, name)) for name in SECTIONS}
    data.update(engines=_plain(config.engines), models=_plain(config.models),
                client_keys=_plain(config.client_keys), tenants=_plain(config.tenants))
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
