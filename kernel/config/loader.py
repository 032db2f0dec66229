"""Reading the configuration: the file (``load_config``, ``config_path``), the ``GATEWAY_*``
variables over it and the command-line options over both, validated section by section into
``Config`` (``config_from_mapping``), which also derives the upstream connection pool's size."""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .access import AdminSettings, AuthSettings, _check_token, _client_keys
from .cluster import ClusterSettings, _resolve_cluster
from .engines import EngineSettings, _build_engines
from .gateway import (
    GatewaySettings,
    _check_bind,
    _check_body_budget,
    _check_instance,
    _check_keepalive,
    _check_priority_wait,
    _check_trusted_proxies,
)
from .models import ModelSettings, _build_models
from .telemetry import TelemetrySettings, _resolve_telemetry
from .tenants import DEFAULT_TENANT, TenantSettings, _build_tenants
from .upstream import UpstreamSettings
from .validation import _SECRET_NAME, MASK, ConfigError, _build, _fail, _show, _Sources, _unknown

ENV_PREFIX = "GATEWAY_"
ENV_ALIASES = {
    "GATEWAY_HTTP_TIMEOUT": ("upstream", "timeout"),
}
ENV_NOT_A_KEY = frozenset({"GATEWAY_CONFIG"})


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    gateway: GatewaySettings
    upstream: UpstreamSettings
    admin: AdminSettings
    auth: AuthSettings
    telemetry: TelemetrySettings
    cluster: ClusterSettings
    engines: Mapping[str, EngineSettings]
    models: tuple[ModelSettings, ...]
    source: str
    by_name: Mapping[str, ModelSettings]
    client_keys: frozenset[str] = frozenset()
    # The tenants (``default`` always among them) and each client key's tenant.
    tenants: tuple[TenantSettings, ...] = ()
    tenant_of_key: Mapping[str, TenantSettings] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))

    @property
    def fair_queues(self) -> bool:
        """Whether a model's queue orders its waiters by tenant (more than one tenant, or a
        tenant's own max_concurrent; ``kernel.fair_accounting``), not first come first."""
        return len(self.tenants) > 1 or any(t.max_concurrent for t in self.tenants)

    @property
    def has_tenants(self) -> bool:
        """Whether requests are told apart by tenant: there are client keys, or a
        ``[[tenants]]`` table says more than the tenant ``default`` without limits."""
        return bool(self.client_keys) or self.tenants != (TenantSettings(name=DEFAULT_TENANT),)

    @property
    def default_tenant(self) -> TenantSettings:
        """The tenant of the keys no tenant lists, and of requests where no key is needed."""
        return next(t for t in self.tenants if t.name == DEFAULT_TENANT)
    # Each adapter's name: the model whose servers serve it.
    adapters: Mapping[str, ModelSettings] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))

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
    "telemetry": TelemetrySettings,
    "cluster": ClusterSettings,
}


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
            if field.metadata.get("derived"):
                continue
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


TOP_LEVEL = ("gateway", "upstream", "admin", "auth", "engines", "models", "telemetry",
             "cluster", "tenants")


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
    environ = environ if environ is not None else {}
    _apply_env(data, environ, sources)
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
    sections["telemetry"] = _resolve_telemetry(sections["telemetry"], environ, sources)
    engines = _build_engines(data.get("engines", {}), sources)
    models = _build_models(data.get("models"), engines, sections["gateway"], sources)
    sections["cluster"] = _resolve_cluster(sections["cluster"], sections["gateway"].instance,
                                           models, engines, sources)
    by_name = {key: m for m in models for key in (m.name, *m.aliases)}
    adapters = {adapter.name: m for m in models for adapter in m.adapters}
    default = sections["gateway"].default_model
    if default is not None and default not in by_name:
        _fail("gateway.default_model", default, sources,
              "the name or an alias of a configured model: " + ", ".join(by_name))
    tenants, tenant_of_key = _build_tenants(data.get("tenants"), by_name, client_keys, sources)
    _check_priority_wait(sections["gateway"], (t.priority for t in tenants), sources)
    return Config(engines=engines, models=models, source=source,
                  by_name=types.MappingProxyType(by_name),
                  client_keys=frozenset(tenant_of_key), tenants=tenants,
                  tenant_of_key=tenant_of_key, adapters=types.MappingProxyType(adapters),
                  **sections)


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
