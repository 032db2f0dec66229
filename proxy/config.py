"""Configuration: one TOML file, overridden by ``GATEWAY_*`` environment variables.

Everything is validated once, before the gateway binds a port, into frozen dataclasses. A bad
value stops the start with one line naming the key, the value, where it came from and what is
allowed; nothing is clamped, and an unknown key is an error (a typo must not pass silently).

Environment variables: ``GATEWAY_<KEY>`` for ``[gateway]`` keys, ``GATEWAY_<SECTION>_<KEY>``
for the other single sections, and the names operators already use: ``GATEWAY_HTTP_TIMEOUT``
(``upstream.timeout``) and ``GATEWAY_ADMIN_TOKEN`` (``admin.token``). ``GATEWAY_CONFIG`` names
the file. Any other ``GATEWAY_*`` variable is refused as unknown.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_PREFIX = "GATEWAY_"
ENV_ALIASES = {
    "GATEWAY_HTTP_TIMEOUT": ("upstream", "timeout"),
}
ENV_NOT_A_KEY = frozenset({"GATEWAY_CONFIG"})
LAUNCHERS = ("process", "static", "container")
HOUR = 3600.0
DAY = 24 * HOUR


class ConfigError(Exception):
    """A configuration value that cannot be used; the message is one line for the operator."""


def _spec(default: Any, *, lo: float | None = None, hi: float | None = None,
          choices: tuple[str, ...] = (), secret: bool = False) -> Any:
    """A field with its default and the bounds it is checked against."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "secret": secret}
    return dataclasses.field(default=default, metadata=meta)


def _required(*, choices: tuple[str, ...] = ()) -> Any:
    return dataclasses.field(metadata={"lo": None, "hi": None, "choices": choices,
                                       "secret": False})


@dataclasses.dataclass(frozen=True, slots=True)
class GatewaySettings:
    bind: str = _spec("127.0.0.1:8080")
    max_queue_size: int = _spec(200, lo=1, hi=1_000_000)
    max_concurrent: int = _spec(50, lo=1, hi=10_000)
    max_models_concurrent: int = _spec(3, lo=1, hi=1_000)
    max_concurrent_total: int | None = _spec(None, lo=1, hi=1_000_000)
    queue_timeout: float = _spec(60.0, lo=0.001, hi=DAY)
    max_body_bytes: int = _spec(10 * 1024 * 1024, lo=1, hi=1024 ** 3)
    placement_timeout: float = _spec(30.0, lo=0.001, hi=DAY)
    shutdown_grace: float = _spec(30.0, lo=0.0, hi=DAY)
    gpu_memory_mb: int | None = _spec(None, lo=1, hi=10_000_000)
    instance: str = _spec("default")
    log_format: str = _spec("auto", choices=("auto", "json", "console"))


@dataclasses.dataclass(frozen=True, slots=True)
class UpstreamSettings:
    connect_timeout: float = _spec(10.0, lo=0.001, hi=HOUR)
    timeout: float = _spec(300.0, lo=0.001, hi=DAY)
    write_timeout: float = _spec(60.0, lo=0.001, hi=DAY)
    pool_timeout: float = _spec(1.0, lo=0.0, hi=HOUR)
    retries: int = _spec(3, lo=0, hi=20)
    backoff_base: float = _spec(0.05, lo=0.0, hi=60.0)
    backoff_max: float = _spec(2.0, lo=0.0, hi=HOUR)
    retry_deadline: float = _spec(10.0, lo=0.0, hi=HOUR)
    retry_budget_ratio: float = _spec(0.2, lo=0.0, hi=1.0)
    retry_budget_min: int = _spec(10, lo=0, hi=1_000_000)
    retry_budget_window: float = _spec(10.0, lo=0.1, hi=HOUR)


@dataclasses.dataclass(frozen=True, slots=True)
class EngineSettings:
    name: str = _required()
    url: str = _required()
    on_start: str = _spec("adopt", choices=("adopt", "remove"))
    on_shutdown: str = _spec("stop", choices=("stop", "keep"))
    stop_timeout: float = _spec(10.0, lo=0.0, hi=HOUR)


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSettings:
    name: str = _required()
    launcher: str = _required(choices=LAUNCHERS)
    served_name: str | None = _spec(None)
    aliases: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    url: str | None = _spec(None)
    health_path: str = _spec("/health")
    startup_timeout: float = _spec(600.0, lo=0.001, hi=DAY)
    idle_timeout: float = _spec(300.0, lo=0.001, hi=30 * DAY)
    failure_backoff: float = _spec(5.0, lo=0.0, hi=DAY)
    vram_mb: int = _spec(0, lo=0, hi=10_000_000)
    gpus: tuple[int, ...] = ()
    max_concurrent: int | None = _spec(None, lo=1, hi=10_000)
    max_queue_size: int | None = _spec(None, lo=1, hi=1_000_000)
    engine: str | None = _spec(None)
    image: str | None = _spec(None)
    args: tuple[str, ...] = ()
    container_port: int = _spec(8000, lo=1, hi=65535)
    host_port: int | None = _spec(None, lo=1, hi=65535)
    volumes: tuple[str, ...] = ()
    shm_size: str | None = _spec(None)
    pull: str = _spec("never", choices=("never", "missing"))


@dataclasses.dataclass(frozen=True, slots=True)
class AdminSettings:
    token: str | None = _spec(None, secret=True)


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    gateway: GatewaySettings
    upstream: UpstreamSettings
    admin: AdminSettings
    engines: Mapping[str, EngineSettings]
    models: tuple[ModelSettings, ...]
    source: str
    by_name: Mapping[str, ModelSettings]

    @property
    def upstream_pool_size(self) -> int:
        """Connections the gateway may open: every model at full concurrency."""
        return self.gateway.max_concurrent * self.gateway.max_models_concurrent

    @property
    def upstream_keepalive_size(self) -> int:
        """Keep as many alive as may be open, so no connection is churned under full load."""
        return self.upstream_pool_size

    def max_concurrent_of(self, model: ModelSettings) -> int:
        return model.max_concurrent or self.gateway.max_concurrent

    def max_queue_size_of(self, model: ModelSettings) -> int:
        return model.max_queue_size or self.gateway.max_queue_size


SECTIONS: dict[str, type] = {
    "gateway": GatewaySettings,
    "upstream": UpstreamSettings,
    "admin": AdminSettings,
}


class _Sources:
    """Remembers where each value came from, for the error message."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.env: dict[str, str] = {}
        self.options: set[str] = set()

    def of(self, path: str) -> str:
        if path in self.options:
            return f"command-line option --{path.rpartition('.')[2]}"
        var = self.env.get(path)
        return f"environment variable {var}" if var else self.file


def _describe(meta: Mapping[str, Any], kind: str) -> str:
    if meta["choices"]:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and hi is not None:
        return f"{kind} from {lo} to {hi}"
    return kind


def _fail(path: str, value: Any, sources: _Sources, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{path} = {value!r} (from {sources.of(path)}): must be {allowed}")


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check_scalar(path: str, value: Any, kind: type, meta: Mapping[str, Any],
                  sources: _Sources) -> Any:
    allowed = _describe(meta, _KIND_NAMES[kind])
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        _fail(path, value, sources, allowed)
    if meta["choices"] and value not in meta["choices"]:
        _fail(path, value, sources, allowed)
    lo, hi = meta["lo"], meta["hi"]
    if kind in (int, float) and ((lo is not None and value < lo) or (hi is not None and value > hi)
                                 or value != value):
        _fail(path, value, sources, allowed)
    return value


def _check_value(path: str, value: Any, hint: Any, meta: Mapping[str, Any],
                 sources: _Sources) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _check_value(path, value, next(a for a in args if a is not type(None)), meta,
                            sources)
    if origin is tuple:
        if not isinstance(value, list):
            _fail(path, value, sources, f"a list of {_KIND_NAMES[args[0]]}s")
        return tuple(_check_scalar(f"{path}[{i}]", item, args[0], meta, sources)
                     for i, item in enumerate(value))
    if origin is Mapping:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            _fail(path, value, sources, "a table of strings")
        return types.MappingProxyType(dict(value))
    return _check_scalar(path, value, hint, meta, sources)


_NO_BOUNDS = {"lo": None, "hi": None, "choices": ()}


def _build(cls: type, table: Any, prefix: str, sources: _Sources) -> Any:
    if not isinstance(table, dict):
        _fail(prefix, table, sources, "a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise ConfigError(f"{prefix}.{key} (from {sources.of(f'{prefix}.{key}')}): unknown "
                              f"key; allowed keys: {', '.join(fields)}")
    values = {}
    for name, field in fields.items():
        path = f"{prefix}.{name}"
        if name in table:
            values[name] = _check_value(path, table[name], hints[name], field.metadata or
                                        _NO_BOUNDS, sources)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path} (from {sources.file}): missing; it is required")
    return cls(**values)


def _env_value(raw: str, hint: Any) -> Any:
    """Environment strings take the field's type; lists and tables are written as JSON."""
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    base = typing.get_origin(base) or base
    try:
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
        if base is bool:
            return {"true": True, "false": False}.get(raw.lower(), raw)
        if base in (tuple, Mapping):
            return json.loads(raw)
    except ValueError:
        return raw
    return raw


def _env_targets() -> dict[str, tuple[str, str]]:
    targets = dict(ENV_ALIASES)
    for section, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            name = field.name.upper()
            var = ENV_PREFIX + (name if section == "gateway" else f"{section.upper()}_{name}")
            targets[var] = (section, field.name)
    return targets


def _apply_env(data: dict[str, Any], environ: Mapping[str, str], sources: _Sources) -> None:
    targets = _env_targets()
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var in ENV_NOT_A_KEY:
            continue
        if var not in targets:
            raise ConfigError(f"{var} = {raw!r} (from environment variable {var}): unknown "
                              f"variable; allowed: {', '.join(sorted(targets))}, GATEWAY_CONFIG")
        section, key = targets[var]
        hint = typing.get_type_hints(SECTIONS[section])[key]
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            _fail(section, table, sources, "a table")
        table[key] = _env_value(raw, hint)
        sources.env[f"{section}.{key}"] = var


def _check_bind(bind: str, sources: _Sources) -> None:
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        _fail("gateway.bind", bind, sources, "HOST:PORT with a port from 0 to 65535")


def _check_model(model: ModelSettings, path: str, engines: Mapping[str, EngineSettings],
                 sources: _Sources) -> None:
    needs = {"process": ("command",), "static": ("url",), "container": ("engine", "image")}
    for key in needs[model.launcher]:
        if not getattr(model, key):
            raise ConfigError(f"{path}.{key} (from {sources.file}): missing; a "
                              f"{model.launcher} model requires it")
    if model.launcher == "container" and model.engine not in engines:
        _fail(f"{path}.engine", model.engine, sources,
              "the name of an [engines.NAME] table: " + (", ".join(engines) or "none defined"))
    if model.url is not None and not model.url.startswith(("http://", "https://")):
        _fail(f"{path}.url", model.url, sources, "an http:// or https:// URL")
    if not model.health_path.startswith("/"):
        _fail(f"{path}.health_path", model.health_path, sources, "a path starting with /")
    if any(g < 0 or g > 63 for g in model.gpus):
        _fail(f"{path}.gpus", list(model.gpus), sources, "GPU indexes from 0 to 63")


def _build_models(raw: Any, engines: Mapping[str, EngineSettings],
                  sources: _Sources) -> tuple[ModelSettings, ...]:
    if not isinstance(raw, list) or not raw:
        _fail("models", raw, sources, "a non-empty array of [[models]] tables")
    models = []
    seen: dict[str, str] = {}
    for i, table in enumerate(raw):
        path = f"models[{i}]"
        model = _build(ModelSettings, table, path, sources)
        if model.served_name is None:
            model = dataclasses.replace(model, served_name=model.name)
        _check_model(model, path, engines, sources)
        for key in (model.name, *model.aliases):
            if not key or key in seen:
                _fail(f"{path}.name", key, sources,
                      f"a non-empty name not already used by {seen.get(key, 'another model')}")
            seen[key] = model.name
        models.append(model)
    return tuple(models)


def _build_engines(raw: Any, sources: _Sources) -> Mapping[str, EngineSettings]:
    if not isinstance(raw, dict):
        _fail("engines", raw, sources, "a table of [engines.NAME] tables")
    engines = {}
    for name, table in raw.items():
        if isinstance(table, dict):
            table = {"name": name, **table}
        engine = _build(EngineSettings, table, f"engines.{name}", sources)
        if not engine.url.startswith(("unix://", "tcp://", "http://", "https://")):
            _fail(f"engines.{name}.url", engine.url, sources,
                  "a unix://, tcp://, http:// or https:// URL")
        engines[name] = engine
    return types.MappingProxyType(engines)


TOP_LEVEL = ("gateway", "upstream", "admin", "engines", "models")


def config_from_mapping(data: dict[str, Any], *, source: str = "<mapping>",
                        environ: Mapping[str, str] | None = None,
                        options: Mapping[str, Any] | None = None) -> Config:
    """Validate a parsed TOML document into a Config.

    Environment variables override the document, and command-line ``options`` (``section.key``
    to value) override both."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    sources = _Sources(source)
    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{key} (from {source}): unknown key; allowed top-level keys: "
                              f"{', '.join(TOP_LEVEL)}")
    _apply_env(data, environ if environ is not None else {}, sources)
    for path, value in (options or {}).items():
        section, key = path.split(".")
        data.setdefault(section, {})[key] = value
        sources.options.add(path)
    sections = {name: _build(cls, data.get(name, {}), name, sources)
                for name, cls in SECTIONS.items()}
    _check_bind(sections["gateway"].bind, sources)
    engines = _build_engines(data.get("engines", {}), sources)
    models = _build_models(data.get("models"), engines, sources)
    by_name = {key: m for m in models for key in (m.name, *m.aliases)}
    return Config(engines=engines, models=models, source=source,
                  by_name=types.MappingProxyType(by_name), **sections)


def config_path(cli_path: str | None, environ: Mapping[str, str]) -> Path:
    return Path(cli_path or environ.get("GATEWAY_CONFIG") or "config.toml")


def load_config(cli_path: str | None = None, environ: Mapping[str, str] | None = None,
                options: Mapping[str, Any] | None = None) -> Config:
    """Read, override and validate; raises ConfigError with a one-line message."""
    environ = os.environ if environ is None else environ
    path = config_path(cli_path, environ)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return config_from_mapping(data, source=f"file {path}", environ=environ, options=options)


def effective(config: Config) -> dict[str, Any]:
    """The configuration as in force, secrets masked, with the derived figures."""
    def dump(obj: Any) -> dict[str, Any]:
        out = {}
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if field.metadata.get("secret") and value is not None:
                value = "***"
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[field.name] = value
        return out

    return {
        "source": config.source,
        **{name: dump(getattr(config, name)) for name in SECTIONS},
        "engines": {name: dump(e) for name, e in config.engines.items()},
        "models": [dump(m) for m in config.models],
        "derived": {
            "upstream_pool_size": config.upstream_pool_size,
            "upstream_keepalive_size": config.upstream_keepalive_size,
        },
    }
