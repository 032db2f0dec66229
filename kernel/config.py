"""Configuration: one TOML file, overridden by ``GATEWAY_*`` environment variables.

Everything is validated once, before the gateway binds a port, into frozen dataclasses. A bad
value stops the start with one line naming the key, the value, where it came from and what is
allowed; nothing is clamped, and an unknown key is an error (a typo must not pass silently).

Environment variables: ``GATEWAY_<KEY>`` for ``[gateway]`` keys, ``GATEWAY_<SECTION>_<KEY>``
for the other single sections, and the names operators already use: ``GATEWAY_HTTP_TIMEOUT``
(``upstream.timeout``) and ``GATEWAY_ADMIN_TOKEN`` (``admin.token``). ``GATEWAY_CONFIG`` names
the file. Any other ``GATEWAY_*`` variable is refused as unknown, and so are two variables for
one key.

``effective()`` is what ``check-config`` prints and the start-up log holds: ``admin.token``,
``auth.api_keys`` and whatever in a model's ``env``, ``command``, ``args`` or URL looks like a
credential (``HF_TOKEN``, ``--api-key X``, ``user:password@``) are masked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import ipaddress
import json
import os
import re
import string
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


_NO_BOUNDS = {"lo": None, "hi": None, "choices": (), "secret": False}


def _spec(default: Any, *, lo: float | None = None, hi: float | None = None,
          choices: tuple[str, ...] = (), secret: bool = False) -> Any:
    """A field with its default and the bounds it is checked against."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "secret": secret}
    return dataclasses.field(default=default, metadata=meta)


def _required(*, choices: tuple[str, ...] = ()) -> Any:
    return dataclasses.field(metadata={**_NO_BOUNDS, "choices": choices})


@dataclasses.dataclass(frozen=True, slots=True)
class GatewaySettings:
    bind: str = _spec("127.0.0.1:8080")
    max_queue_size: int = _spec(200, lo=1, hi=1_000_000)
    max_concurrent: int = _spec(50, lo=1, hi=10_000)
    max_models_concurrent: int = _spec(3, lo=1, hi=1_000)
    # Models kept asleep at once (vLLM's sleep mode: level 1 holds the weights in host memory);
    # beyond it the one asleep longest is stopped.
    max_models_asleep: int = _spec(2, lo=0, hi=1_000)
    max_concurrent_total: int | None = _spec(None, lo=1, hi=1_000_000)
    queue_timeout: float = _spec(60.0, lo=0.001, hi=DAY)
    max_body_bytes: int = _spec(10 * 1024 * 1024, lo=1, hi=1024 ** 3)
    # Response ids remembered with the model that made them (a few hundred bytes each), so
    # that GET /v1/responses/{id} and its cancel reach that model.
    max_response_ids: int = _spec(10_000, lo=1, hi=10_000_000)
    # Seconds one send to the client may take: a client that stops reading for longer is ended
    # as if it had disconnected (as nginx's send_timeout, and its default).
    send_timeout: float = _spec(60.0, lo=0.001, hi=DAY)
    # Seconds the whole request body may take to arrive (a body sent a byte a second holds its
    # bytes and its connection): then 408.
    body_timeout: float = _spec(30.0, lo=0.001, hi=DAY)
    # Bytes of request bodies held at once by every request in flight or queued together; a
    # request that would go past it gets 503 with Retry-After. At least max_body_bytes.
    max_buffered_body_bytes: int = _spec(256 * 1024 * 1024, lo=1, hi=1024 ** 4)
    # Connections the kernel may hold for accept(): a burst beyond it waits for SYN retries.
    backlog: int = _spec(2048, lo=1, hi=65535)
    placement_timeout: float = _spec(30.0, lo=0.001, hi=DAY)
    shutdown_grace: float = _spec(30.0, lo=0.0, hi=DAY)
    # Seconds a stream may wait (for its model or a slot) before it gets its 200 and an SSE
    # comment every as many seconds; 0: no feedback, the status waits for the answer. A value
    # between is refused (_check_keepalive): the ticker would spin.
    stream_keepalive: float = _spec(2.0, lo=0.0, hi=HOUR)
    gpu_memory_mb: int | None = _spec(None, lo=1, hi=10_000_000)
    # Names this gateway's containers (labels, names); None: made from the host and the config.
    instance: str | None = _spec(None)
    log_format: str = _spec("auto", choices=("auto", "json", "console"))
    # Seconds an idle client connection stays open: above a proxy's own upstream keep-alive
    # (nginx: 60 s), so that the proxy, never the gateway, closes an idle connection; otherwise
    # the proxy may send a request down a connection the gateway is closing and answer 502.
    keep_alive_timeout: float = _spec(75.0, lo=0.001, hi=DAY)
    # Peers (addresses or networks) whose X-Forwarded-For/-Proto/-Host are believed.
    trusted_proxies: tuple[str, ...] = ()


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
    # Seconds an idle backend connection is kept for the next request: below the backend's own
    # keep-alive (vLLM closes an idle connection after 5 s), so that the gateway, never the
    # backend, closes it; else a request can be sent down a connection the backend is closing.
    keepalive_expiry: float = _spec(4.0, lo=0.001, hi=HOUR)


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
    image: str | None = _spec(None)
    args: tuple[str, ...] = ()
    container_port: int = _spec(8000, lo=1, hi=65535)
    host_port: int | None = _spec(None, lo=1, hi=65535)
    volumes: tuple[str, ...] = ()
    shm_size: str | None = _spec(None)
    pull: str = _spec("never", choices=("never", "missing"))
    placements: tuple[tuple[str | None, tuple[int, ...]], ...] = dataclasses.field(
        default=(), metadata={**_NO_BOUNDS, "derived": True})
    # Which replica of the model a launcher runs (``BackendPool`` sets it); 0 for the first.
    replica: int = dataclasses.field(default=0, metadata={**_NO_BOUNDS, "derived": True})


@dataclasses.dataclass(frozen=True, slots=True)
class AdminSettings:
    token: str | None = _spec(None, secret=True)
    # The dashboard's live stream (GET /admin/events): request summaries kept for one
    # subscriber that reads slower than they come (the oldest are dropped beyond it), streams
    # open at once, and seconds one write to a subscriber may take before its stream is ended
    # (checked every quarter of it: a shorter one would spin).
    events_buffer: int = _spec(256, lo=1, hi=100_000)
    events_streams: int = _spec(8, lo=1, hi=1_000)
    events_send_timeout: float = _spec(30.0, lo=0.1, hi=HOUR)


@dataclasses.dataclass(frozen=True, slots=True)
class AuthSettings:
    # Client API keys: the OpenAI routes answer only requests that carry one of them. The
    # file holds one key per line and is read once, at start-up (``Config.client_keys``).
    api_keys: tuple[str, ...] = _spec((), secret=True)
    api_keys_file: str | None = _spec(None)


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    gateway: GatewaySettings
    upstream: UpstreamSettings
    admin: AdminSettings
    auth: AuthSettings
    engines: Mapping[str, EngineSettings]
    models: tuple[ModelSettings, ...]
    source: str
    by_name: Mapping[str, ModelSettings]
    client_keys: frozenset[str] = frozenset()

    @property
    def upstream_pool_size(self) -> int:
        """Connections the gateway may open: what can be in flight at once. Each server (a
        replica) has its model's ``max_concurrent`` slots, at most ``max_models_concurrent``
        servers run at once, and ``max_concurrent_total`` bounds them all."""
        slots = sorted((self.max_concurrent_of(m) for m in self.models
                        for _ in range(m.max_replicas)), reverse=True)
        size = sum(slots[:self.gateway.max_models_concurrent])
        total = self.gateway.max_concurrent_total
        return min(size, total) if total else size

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
    "auth": AuthSettings,
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


MASK = "***"
SHOWN_CHARS = 80
# Names that mark a secret in a model's env, command or args: HF_TOKEN, --api-key, PGPASSWORD;
# a whole word, so that --max-num-batched-tokens is no secret.
_SECRET_NAME = re.compile(r"(?<![a-z])(token|secret|api[-_]?keys?|credentials?)(?![a-z])|passw",
                          re.IGNORECASE)


def _show(value: Any) -> str:
    """The value as written (repr, so one line), cut short if it is a whole table."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def _describe(meta: Mapping[str, Any], kind: str) -> str:
    if meta["choices"]:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and hi is not None:
        return f"{kind} from {lo} to {hi}"
    return kind


def _fail(path: str, value: Any, sources: _Sources, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{path} = {_show(value)} (from {sources.of(path)}): must be {allowed}")


def _unknown(path: str, value: Any, source: str, allowed: typing.Iterable[str]) -> typing.NoReturn:
    allowed = list(allowed)
    near = difflib.get_close_matches(path.rpartition(".")[2], allowed, n=1, cutoff=0.85)
    guess = f"did you mean {near[0]}? " if near else ""
    raise ConfigError(f"{path} = {_show(value)} (from {source}): unknown key; {guess}allowed "
                      f"keys: {', '.join(allowed)}")


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}
_LIST_NAMES = {int: "a list of integers", str: "a list of strings"}


def _check_scalar(path: str, value: Any, kind: type, meta: Mapping[str, Any],
                  sources: _Sources) -> Any:
    if kind is float and type(value) is int:
        with contextlib.suppress(OverflowError):  # an int beyond any float stays out of bounds
            value = float(value)
    ok = type(value) is kind and (not meta["choices"] or value in meta["choices"])
    if ok and kind is not str:
        lo, hi = meta["lo"], meta["hi"]
        ok = value == value and (lo is None or lo <= value) and (hi is None or value <= hi)
    if not ok:
        _fail(path, MASK if meta["secret"] else value, sources,
              _describe(meta, _KIND_NAMES[kind]))
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
            _fail(path, MASK if meta["secret"] else value, sources, _LIST_NAMES[args[0]])
        return tuple(_check_scalar(f"{path}[{i}]", item, args[0], meta, sources)
                     for i, item in enumerate(value))
    if origin is Mapping:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            _fail(path, value, sources, "a table of strings")
        return types.MappingProxyType(dict(value))
    value = _check_scalar(path, value, hint, meta, sources)
    if value == "":
        _fail(path, value, sources, "a non-empty string")
    return value


def _build(cls: type, table: Any, prefix: str, sources: _Sources) -> Any:
    if not isinstance(table, dict):
        _fail(prefix, table, sources, "a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
    for key, value in table.items():
        if key not in fields:
            _unknown(f"{prefix}.{key}", value, sources.of(f"{prefix}.{key}"), fields)
    values = {}
    for name, field in fields.items():
        path = f"{prefix}.{name}"
        meta = field.metadata or _NO_BOUNDS
        if name in table:
            values[name] = _check_value(path, table[name], hints[name], meta, sources)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path} is missing (from {sources.file}): it is required, "
                              f"{_describe(meta, _KIND_NAMES[hints[name]])}")
    return cls(**values)


def _table(data: dict[str, Any], section: str, sources: _Sources) -> dict[str, Any]:
    """The section's table in the document, to override a key in."""
    table = data.setdefault(section, {})
    if not isinstance(table, dict):
        _fail(section, table, sources, "a table")
    return table


def _env_value(raw: str, hint: Any) -> Any:
    """The variable as the field's type; a string that is not one stays a string, refused later.
    A list is written comma-separated: ``GATEWAY_TRUSTED_PROXIES=127.0.0.1,10.0.0.0/8``."""
    if typing.get_origin(hint) is tuple:
        return [part.strip() for part in raw.split(",") if part.strip()]
    kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    try:
        return kind(raw) if kind in (int, float) else raw
    except ValueError:
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
        near = difflib.get_close_matches(var, targets, n=1, cutoff=0.8)
        # A misspelt GATEWAY_ADMIN_TOKEN holds a token: show no value that may be a secret.
        secret = any(_SECRET_NAME.search(name) for name in (var, *near))
        shown = _show(MASK if secret else raw)
        if var not in targets:
            guess = f"did you mean {near[0]}? " if near else ""
            raise ConfigError(f"{var} = {shown} (from environment variable {var}): unknown "
                              f"variable; {guess}allowed: {', '.join(sorted(targets))}, "
                              "GATEWAY_CONFIG")
        section, key = targets[var]
        path = f"{section}.{key}"
        if path in sources.env:
            raise ConfigError(f"{var} = {shown} (from environment variable {var}): {path} is "
                              f"already set by {sources.env[path]}; set only one of them")
        hint = typing.get_type_hints(SECTIONS[section])[key]
        _table(data, section, sources)[key] = _env_value(raw, hint)
        sources.env[path] = var


_BIND = re.compile(r"(?P<host>\[[^\]]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")


def _check_bind(bind: str, sources: _Sources) -> None:
    match = _BIND.fullmatch(bind)
    ok = match is not None and 1 <= int(match["port"]) <= 65535
    if ok and match["host"].startswith("["):
        try:
            ipaddress.IPv6Address(match["host"][1:-1])
        except ValueError:
            ok = False
    if not ok:
        _fail("gateway.bind", bind, sources, "HOST:PORT: a host name, an IPv4 address or an "
              "[IPv6] address, and a port from 1 to 65535")


# A container name's characters (the instance is part of every container's name), kept short.
_INSTANCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _check_instance(instance: str | None, sources: _Sources) -> None:
    if instance is not None and not _INSTANCE.fullmatch(instance):
        _fail("gateway.instance", instance, sources, "up to 63 letters, digits and _ . - "
              "starting with a letter or digit (it names containers)")


def _check_body_budget(gateway: GatewaySettings, sources: _Sources) -> None:
    if gateway.max_buffered_body_bytes < gateway.max_body_bytes:
        _fail("gateway.max_buffered_body_bytes", gateway.max_buffered_body_bytes, sources,
              f"at least gateway.max_body_bytes ({gateway.max_body_bytes}): a body of the "
              "largest size allowed must fit")


MIN_KEEPALIVE = 0.1


def _check_keepalive(keepalive: float, sources: _Sources) -> None:
    if 0 < keepalive < MIN_KEEPALIVE:
        _fail("gateway.stream_keepalive", keepalive, sources,
              f"0 (no loading feedback) or a number from {MIN_KEEPALIVE} to {HOUR:.1f}")


def _check_trusted_proxies(proxies: tuple[str, ...], sources: _Sources) -> None:
    for i, proxy in enumerate(proxies):
        try:
            ipaddress.ip_network(proxy)
        except ValueError:
            raise ConfigError(
                f"gateway.trusted_proxies[{i}] = {_show(proxy)} (from "
                f"{sources.of('gateway.trusted_proxies')}): must be an IP address or a network "
                "like 10.0.0.0/8 (no host bits set)") from None


# A token as HTTP's bearer scheme allows it (RFC 6750), so that any client can send it as is.
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
TOKEN_RULE = "letters, digits and - . _ ~ + / (then = padding), as in an HTTP bearer token"


def _check_token(path: str, token: str | None, sources: _Sources) -> None:
    if token is not None and not _TOKEN.fullmatch(token):
        _fail(path, MASK, sources, TOKEN_RULE)


def _client_keys(auth: AuthSettings, sources: _Sources) -> frozenset[str]:
    """The keys of ``auth.api_keys`` and of ``auth.api_keys_file`` (one per line; blank lines
    and ``#`` comments are skipped). A file that holds no key is refused: it would lock out
    every client."""
    for i, key in enumerate(auth.api_keys):
        _check_token(f"auth.api_keys[{i}]", key, sources)
    keys = set(auth.api_keys)
    if auth.api_keys_file is None:
        return frozenset(keys)
    path = "auth.api_keys_file"
    where = f"{path} = {_show(auth.api_keys_file)} (from {sources.of(path)})"
    try:
        text = Path(auth.api_keys_file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: is not UTF-8 text") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    found = [(n, key) for n, key in lines if key and not key.startswith("#")]
    if not found:
        raise ConfigError(f"{where}: holds no API key; write one key per line")
    for n, key in found:
        if not _TOKEN.fullmatch(key):
            raise ConfigError(f"{where}: line {n} is not an API key: must be {TOKEN_RULE}")
    return frozenset(keys | {key for _, key in found})


def _is_url(url: str, schemes: tuple[str, ...]) -> bool:
    """A URL of one of the schemes with a host (a socket path for unix://)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when the port is not a number in range
    except ValueError:
        return False
    return parts.scheme in schemes and bool(parts.path if parts.scheme == "unix"
                                            else parts.hostname)


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
        model = _place(model, path, engines, alternatives, sources)
        _check_model(model, path, engines, sources)
        _check_replicas(model, path, gateway, sources)
        if model.sleep_level is not None and gateway.max_models_asleep == 0:
            _fail(f"{path}.sleep_level", model.sleep_level, sources, "absent while "
                  "gateway.max_models_asleep is 0: no model may sleep, so it would be stopped "
                  "instead every time")
        names = [(f"{path}.name", model.name)]
        names += [(f"{path}.aliases[{j}]", alias) for j, alias in enumerate(model.aliases)]
        for key, name in names:
            if not name:
                _fail(key, name, sources, "a non-empty string")
            if name in seen:
                _fail(key, name, sources, "unique among model names and aliases (model "
                      f"{seen[name]!r} has it already)")
            seen[name] = model.name
        models.append(model)
    _check_always_on(tuple(models), gateway, sources)
    return tuple(models)


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


TOP_LEVEL = ("gateway", "upstream", "admin", "auth", "engines", "models")


def config_from_mapping(data: dict[str, Any], *, source: str = "<mapping>",
                        environ: Mapping[str, str] | None = None,
                        options: Mapping[str, Any] | None = None) -> Config:
    """Validate a parsed TOML document into a Config.

    Environment variables override the document, and command-line ``options`` (``section.key``
    to value) override both."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    sources = _Sources(source)
    for key, value in data.items():
        if key not in TOP_LEVEL:
            _unknown(key, value, source, TOP_LEVEL)
    _apply_env(data, environ if environ is not None else {}, sources)
    for path, value in (options or {}).items():
        section, key = path.split(".")
        _table(data, section, sources)[key] = value
        sources.options.add(path)
    sections = {name: _build(cls, data.get(name, {}), name, sources)
                for name, cls in SECTIONS.items()}
    _check_bind(sections["gateway"].bind, sources)
    _check_body_budget(sections["gateway"], sources)
    _check_trusted_proxies(sections["gateway"].trusted_proxies, sources)
    _check_instance(sections["gateway"].instance, sources)
    _check_keepalive(sections["gateway"].stream_keepalive, sources)
    _check_token("admin.token", sections["admin"].token, sources)
    client_keys = _client_keys(sections["auth"], sources)
    engines = _build_engines(data.get("engines", {}), sources)
    models = _build_models(data.get("models"), engines, sections["gateway"], sources)
    by_name = {key: m for m in models for key in (m.name, *m.aliases)}
    return Config(engines=engines, models=models, source=source,
                  by_name=types.MappingProxyType(by_name), client_keys=client_keys, **sections)


def config_path(cli_path: str | None, environ: Mapping[str, str]) -> tuple[Path, str]:
    """The file to read, and why that one (for the message when it cannot be read)."""
    if cli_path is not None:
        return Path(cli_path), "named by --config"
    if "GATEWAY_CONFIG" in environ:
        return Path(environ["GATEWAY_CONFIG"]), "named by GATEWAY_CONFIG"
    return Path("config.toml"), "the default; name another with --config or GATEWAY_CONFIG"


def load_config(cli_path: str | None = None, environ: Mapping[str, str] | None = None,
                options: Mapping[str, Any] | None = None) -> Config:
    """Read, override and validate; raises ConfigError with a one-line message."""
    environ = os.environ if environ is None else environ
    path, why = config_path(cli_path, environ)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {path} ({why}) cannot be read: "
                          f"{exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} ({why}) is not UTF-8 text: {exc.reason} at "
                          f"byte {exc.start}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} ({why}) is not valid TOML: {exc}") from None
    return config_from_mapping(data, source=f"file {path}", environ=environ, options=options)


def _mask_env(env: Mapping[str, str]) -> dict[str, str]:
    return {name: MASK if _SECRET_NAME.search(name) else value for name, value in env.items()}


def _mask_argv(argv: tuple[str, ...]) -> list[str]:
    """``--api-key X`` and ``--api-key=X`` lose X."""
    out: list[str] = []
    secret_next = False
    for arg in argv:
        flag, eq, _ = arg.partition("=")
        is_secret_flag = flag.startswith("-") and bool(_SECRET_NAME.search(flag))
        if secret_next:
            out.append(MASK)
        elif eq and is_secret_flag:
            out.append(f"{flag}={MASK}")
        else:
            out.append(arg)
        secret_next = is_secret_flag and not eq
    return out


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{userinfo.partition(':')[0]}:{MASK}@{host}").geturl()


_MASKS = {"env": _mask_env, "command": _mask_argv, "args": _mask_argv, "url": _mask_url}


def effective(config: Config) -> dict[str, Any]:
    """The configuration as in force, secrets masked, with the derived figures."""
    def dump(obj: Any) -> dict[str, Any]:
        out = {}
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if field.metadata.get("secret") and value:  # an empty one shows that none is set
                value = MASK
            elif field.name in _MASKS and value is not None:
                value = _MASKS[field.name](value)
            elif isinstance(value, tuple):
                value = list(value)
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
