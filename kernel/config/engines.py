"""The ``[engines.NAME]`` tables: the container engines (a Docker or Podman API, on this host or
on a GPU host) that container models run on, each named by its table; the settings of the
cluster's hosts belong here."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

from .validation import HOUR, ConfigError, _build, _fail, _is_url, _required, _show, _Sources, _spec


@dataclasses.dataclass(frozen=True, slots=True)
class EngineSettings:
    name: str = _required()
    url: str = _required()
    on_start: str = _spec("adopt", choices=("adopt", "remove"))
    on_shutdown: str = _spec("stop", choices=("stop", "keep"))
    stop_timeout: float = _spec(10.0, lo=0.0, hi=HOUR)
    # Seconds any other call to the engine's API may take (an image pull is bounded by the
    # model's startup_timeout instead).
    api_timeout: float = _spec(30.0, lo=0.001, hi=HOUR)
    # Where model containers publish their port, and the host the gateway reaches them at:
    # loopback for an engine on this host; for an engine on a GPU host, that host's address.
    publish_ip: str = _spec("127.0.0.1")
    host: str = _spec("127.0.0.1")
    # Per-GPU memory of a remote engine's host, to plan with (this host's NVML does not see
    # it); unset: gateway.gpu_memory_mb. An engine on this host is read through NVML.
    gpu_memory_mb: int | None = _spec(None, lo=1, hi=10_000_000)


def _build_engines(raw: Any, sources: _Sources) -> Mapping[str, EngineSettings]:
    if not isinstance(raw, dict):
        _fail("engines", raw, sources, "a table of [engines.NAME] tables")
    engines = {}
    for name, table in raw.items():
        path = f"engines.{name}"
        if isinstance(table, dict):
            if "name" in table:
                raise ConfigError(f"{path}.name = {_show(table['name'])} (from {sources.file}): "
                                  f"unknown key; an engine is named by its table, [{path}]")
            table = {"name": name, **table}
        engine = _build(EngineSettings, table, path, sources)
        if not _is_url(engine.url, ("unix", "tcp", "http", "https")):
            _fail(f"{path}.url", engine.url, sources,
                  "a unix://PATH, tcp://, http:// or https:// URL with a host")
        engines[name] = engine
    return types.MappingProxyType(engines)
