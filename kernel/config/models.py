"""The ``[[models]]`` tables: each model, its launcher and what that needs, its replicas and where
they may run (``placements``: its engines times its GPU alternatives; ``placement()`` gives a
replica's), and the checks across models (names and aliases unique, the always-on replicas
fit)."""

from __future__ import annotations

import dataclasses
import json
import re
import string
import types
from collections.abc import Mapping
from typing import Any

from .adapters import AdapterSettings, _check_adapters
from .engines import EngineSettings
from .gateway import GatewaySettings
from .validation import (
    _NO_BOUNDS,
    DAY,
    HOUR,
    ConfigError,
    _build,
    _check_value,
    _fail,
    _is_url,
    _required,
    _Sources,
    _spec,
)

LAUNCHERS = ("process", "static", "container")
# How a model with replicas picks one for a request that names no session (``routing``).
PREFIX_ROUTING = "prefix"
ROUTINGS = (PREFIX_ROUTING, "least_loaded")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSettings:
    name: str = _required()
    launcher: str = _required(choices=LAUNCHERS)
    served_name: str | None = _spec(None)
    aliases: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))
    url: str | None = _spec(None)
    health_path: str = _spec("/health")
    # Seconds between the health checks of a running server, and the failed checks in a row
    # that take it out of service.
    health_interval: float = _spec(5.0, lo=0.01, hi=HOUR)
    health_failures: int = _spec(2, lo=1, hi=1000)
    startup_timeout: float = _spec(600.0, lo=0.001, hi=DAY)
    idle_timeout: float = _spec(300.0, lo=0.001, hi=30 * DAY)
    # vLLM's sleep mode: an idle model is put to sleep at this level (1: weights to host memory,
    # 2: weights dropped) instead of stopped, and stopped after asleep_timeout seconds asleep.
    sleep_level: int | None = _spec(None, lo=1, hi=2)
    asleep_timeout: float = _spec(3600.0, lo=0.001, hi=30 * DAY)
    failure_backoff: float = _spec(5.0, lo=0.0, hi=DAY)
    vram_mb: int = _spec(0, lo=0, hi=10_000_000)
    # One placement (``[0, 1]``: both GPUs for one server) or alternatives (``[[0], [1]]``: a
    # replica on either); ``gpus`` is the first, ``placements`` every (engine, GPUs) a replica
    # may run at (built by ``_build_models``, not a key of its own).
    gpus: tuple[int, ...] = ()
    max_concurrent: int | None = _spec(None, lo=1, hi=10_000)
    max_queue_size: int | None = _spec(None, lo=1, hi=1_000_000)
    engine: str | None = _spec(None)
    # Container models: the engines (GPU hosts) replicas may run on; ``engine`` is the first.
    engines: tuple[str, ...] = ()
    # Servers of the model at once: at least min_replicas (started at start-up and kept), a
    # new one once requests waited scale_up_after seconds with every ready one saturated.
    max_replicas: int = _spec(1, lo=1, hi=1_000)
    min_replicas: int = _spec(0, lo=0, hi=1_000)
    scale_up_after: float = _spec(2.0, lo=0.001, hi=DAY)
    # A session's replica takes its requests unless it has more than this times the average
    # load of the ready replicas (bounded-load consistent hashing).
    affinity_slack: float = _spec(1.5, lo=1.0, hi=1_000.0)
    # A request that names no session goes to the replica that holds the longest run of its
    # prompt's blocks ("prefix", within the same bound), or to the least loaded; none: "prefix"
    # with max_replicas > 1 (resolved at load). The prefix index remembers at most
    # prefix_index_size blocks of prefix_block_chars characters per model (the least recently
    # used go first).
    routing: str | None = _spec(None, choices=ROUTINGS)
    prefix_index_size: int = _spec(50_000, lo=1, hi=10_000_000)
    prefix_block_chars: int = _spec(256, lo=16, hi=1_000_000)
    image: str | None = _spec(None)
    args: tuple[str, ...] = ()
    container_port: int = _spec(8000, lo=1, hi=65535)
    host_port: int | None = _spec(None, lo=1, hi=65535)
    volumes: tuple[str, ...] = ()
    shm_size: str | None = _spec(None)
    pull: str = _spec("never", choices=("never", "missing"))
    # LoRA adapters served on the model's servers (``adapters.py``), at most max_loras loaded on
    # one server at once; a container model's server is given --max-lora-rank max_lora_rank.
    adapters: tuple[AdapterSettings, ...] = ()
    max_loras: int = _spec(1, lo=1, hi=1_000)
    max_lora_rank: int = _spec(16, lo=1, hi=512)
    placements: tuple[tuple[str | None, tuple[int, ...]], ...] = dataclasses.field(
        default=(), metadata={**_NO_BOUNDS, "derived": True})
    # Which replica of the model a launcher runs (``BackendPool`` sets it); 0 for the first.
    replica: int = dataclasses.field(default=0, metadata={**_NO_BOUNDS, "derived": True})


COMMAND_PLACEHOLDERS = ("port", "python", "name")  # what the process launcher fills in
SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def parse_size(text: str) -> int:
    """Docker's size notation: ``8g``, ``512m``, ``1024k`` or bytes; ValueError otherwise."""
    match = re.fullmatch(r"([0-9]+)([bkmg]?)", text.lower())
    if match is None or int(match[1]) == 0:
        raise ValueError(text)
    return int(match[1]) * SIZE_UNITS[match[2]]


def _placeholders_ok(part: str) -> bool:
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(part)]
    except ValueError:  # a lone { or }
        return False
    return all(field is None or field in COMMAND_PLACEHOLDERS for field in fields)


def _check_model(model: ModelSettings, path: str, engines: Mapping[str, EngineSettings],
                 sources: _Sources) -> None:
    needs = {"process": ("command",), "static": ("url",), "container": ("engine", "image")}
    for key in needs[model.launcher]:
        if not getattr(model, key):
            raise ConfigError(f"{path}.{key} is missing or empty (from {sources.file}): a "
                              f"{model.launcher} model requires it")
    for i, part in enumerate(model.command):
        if not _placeholders_ok(part):
            _fail(f"{path}.command[{i}]", part, sources, "a string whose only placeholders are "
                  + ", ".join(f"{{{p}}}" for p in COMMAND_PLACEHOLDERS)
                  + " (write {{ and }} for a literal brace)")
    if model.launcher == "static" and model.sleep_level is not None:
        _fail(f"{path}.sleep_level", model.sleep_level, sources, "absent for a static model: "
              "the gateway does not run its server, so it never puts it to sleep")
    if model.launcher == "container" and model.engine not in engines:
        _fail(f"{path}.engine", model.engine, sources,
              "the name of an [engines.NAME] table: " + (", ".join(engines) or "none defined"))
    if model.url is not None and not _is_url(model.url, ("http", "https")):
        _fail(f"{path}.url", model.url, sources, "an http:// or https:// URL with a host")
    if not model.health_path.startswith("/"):
        _fail(f"{path}.health_path", model.health_path, sources, "a path starting with /")
    if model.shm_size is not None:
        try:
            parse_size(model.shm_size)
        except ValueError:
            _fail(f"{path}.shm_size", model.shm_size, sources,
                  "a size like \"8g\", \"512m\" or a number of bytes")
    gpus = {g for _, placement in model.placements for g in placement}
    if any(g < 0 or g > 63 for g in gpus):
        _fail(f"{path}.gpus", _shown_gpus(model), sources, "GPU indexes from 0 to 63")
    _check_adapters(model.adapters, model.max_lora_rank, path, model.launcher, sources)
    if model.launcher == "process" and model.gpus and "CUDA_VISIBLE_DEVICES" in model.env:
        _fail(f"{path}.env", dict(model.env), sources, "without CUDA_VISIBLE_DEVICES when gpus "
              "is set: gpus sets it for a process model")


def _shown_gpus(model: ModelSettings) -> list[Any]:
    alternatives = list(dict.fromkeys(g for _, g in model.placements))
    return [list(g) for g in alternatives] if len(alternatives) > 1 else list(model.gpus)


def _gpu_alternatives(table: dict[str, Any], path: str,
                      sources: _Sources) -> tuple[tuple[int, ...], ...] | None:
    """``gpus = [[0], [1]]``: the placements a replica may take, each a non-empty list."""
    raw = table.get("gpus")
    if not (isinstance(raw, list) and raw and all(isinstance(g, list) for g in raw)):
        return None
    alternatives = []
    for i, item in enumerate(raw):
        gpus = _check_value(f"{path}.gpus[{i}]", item, tuple[int, ...], _NO_BOUNDS, sources)
        if not gpus:
            _fail(f"{path}.gpus[{i}]", item, sources, "a non-empty list of GPU indexes")
        alternatives.append(gpus)
    return tuple(alternatives)


def _place(model: ModelSettings, path: str, engines: Mapping[str, EngineSettings],
           alternatives: tuple[tuple[int, ...], ...] | None,
           sources: _Sources) -> ModelSettings:
    """The model with its ``engine`` (the first of ``engines``) and its ``placements``."""
    if model.engines:
        if model.launcher != "container":
            _fail(f"{path}.engines", list(model.engines), sources,
                  "absent: only a container model runs on engines")
        if model.engine is not None:
            _fail(f"{path}.engines", list(model.engines), sources,
                  "absent when engine is set: give one engine or a list of them")
        for i, name in enumerate(model.engines):
            if name not in engines or name in model.engines[:i]:
                _fail(f"{path}.engines[{i}]", name, sources, "the name of an [engines.NAME] "
                      "table, once: " + (", ".join(engines) or "none defined"))
        model = dataclasses.replace(model, engine=model.engines[0])
    placements = tuple((engine, gpus) for engine in (model.engines or (model.engine,))
                       for gpus in (alternatives or (model.gpus,)))
    return dataclasses.replace(model, placements=placements)


def _check_replicas(model: ModelSettings, path: str, gateway: GatewaySettings,
                    sources: _Sources) -> None:
    if model.min_replicas > model.max_replicas:
        _fail(f"{path}.min_replicas", model.min_replicas, sources,
              f"at most max_replicas ({model.max_replicas})")
    if model.launcher == "static" and model.max_replicas > 1:
        _fail(f"{path}.max_replicas", model.max_replicas, sources,
              "1 for a static model: the gateway runs no server of it")
    if model.max_replicas > gateway.max_models_concurrent:
        _fail(f"{path}.max_replicas", model.max_replicas, sources, "at most "
              f"gateway.max_models_concurrent ({gateway.max_models_concurrent}): each replica "
              "is one loaded server")


def placement(model: ModelSettings, replica: int) -> tuple[str | None, tuple[int, ...]]:
    """The engine and GPUs a replica of the model runs on: the placements in turn."""
    return model.placements[replica % len(model.placements)]


def _check_always_on(models: tuple[ModelSettings, ...], gateway: GatewaySettings,
                     sources: _Sources) -> None:
    """Every ``min_replicas`` must fit at once: in the model budget and in each GPU's memory
    (where ``gpu_memory_mb`` gives it); the gateway could not keep them otherwise."""
    servers = 0
    used: dict[tuple[str | None, int], int] = {}
    for model in models:
        path = f"models[{json.dumps(model.name)}].min_replicas"
        servers += model.min_replicas
        if servers > gateway.max_models_concurrent:
            _fail(path, model.min_replicas, sources, "replicas that fit in "
                  f"gateway.max_models_concurrent ({gateway.max_models_concurrent}) together "
                  "with the other models' min_replicas")
        for replica in range(model.min_replicas):
            engine, gpus = placement(model, replica)
            for g in gpus:
                used[engine, g] = used.get((engine, g), 0) + model.vram_mb
                if gateway.gpu_memory_mb is not None and used[engine, g] > gateway.gpu_memory_mb:
                    _fail(path, model.min_replicas, sources, "replicas whose vram_mb fits in "
                          f"gateway.gpu_memory_mb ({gateway.gpu_memory_mb}) on GPU {g}, with "
                          "the other always-on replicas")


def _build_models(raw: Any, engines: Mapping[str, EngineSettings], gateway: GatewaySettings,
                  sources: _Sources) -> tuple[ModelSettings, ...]:
    allowed = "a non-empty array of [[models]] tables"
    if raw is None:
        raise ConfigError(f"models is missing (from {sources.file}): it is required, {allowed}")
    if not isinstance(raw, list) or not raw:
        _fail("models", raw, sources, allowed)
    models = []
    seen: dict[str, str] = {}
    for i, table in enumerate(raw):
        # Named by its name where it has one of its own: models["sim-small"].idle_timeout.
        name = table.get("name") if isinstance(table, dict) else None
        named = isinstance(name, str) and name and name not in seen
        path = f"models[{json.dumps(name)}]" if named else f"models[{i}]"
        alternatives = _gpu_alternatives(table, path, sources) if isinstance(
            table, dict) else None
        if alternatives is not None:
            table = {**table, "gpus": list(alternatives[0])}
        model = _build(ModelSettings, table, path, sources)
        if model.served_name is None:
            model = dataclasses.replace(model, served_name=model.name)
        if model.routing is None:
            model = dataclasses.replace(model, routing=PREFIX_ROUTING if model.max_replicas > 1
                                        else "least_loaded")
        model = _place(model, path, engines, alternatives, sources)
        _check_model(model, path, engines, sources)
        _check_replicas(model, path, gateway, sources)
        if model.sleep_level is not None and gateway.max_models_asleep == 0:
            _fail(f"{path}.sleep_level", model.sleep_level, sources, "absent while "
                  "gateway.max_models_asleep is 0: no model may sleep, so it would be stopped "
                  "instead every time")
        names = [(f"{path}.name", model.name)]
        names += [(f"{path}.aliases[{j}]", alias) for j, alias in enumerate(model.aliases)]
        names += [(f"{path}.adapters[{j}].name", adapter.name)
                  for j, adapter in enumerate(model.adapters)]
        for key, name in names:
            if not name:
                _fail(key, name, sources, "a non-empty string")
            if name in seen:
                _fail(key, name, sources, "unique among the names, aliases and adapters of "
                      f"the models (model {seen[name]!r} has it already)")
            seen[name] = model.name
        models.append(model)
    _check_always_on(tuple(models), gateway, sources)
    return tuple(models)
