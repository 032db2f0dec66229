"""The ``[[tenants]]`` tables: client keys grouped into tenants, each with its limits, its
priority and share in a model's queue, and the models it may use.

A tenant's ``keys`` (and the keys of its ``keys_file``, one per line, read once at start-up) are
client keys: listing them here is enough, with or without ``[auth]``. A key of
``auth.api_keys`` (or its file) that no tenant lists belongs to the tenant named ``default``:
the ``[[tenants]]`` table of that name where there is one, else a tenant without limits. A key
belongs to one tenant only. ``models`` names models or aliases; left out, every model.
"""

from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Mapping
from typing import Any

from .access import _check_token, _keys_file
from .validation import _NO_BOUNDS, ConfigError, _build, _fail, _required, _Sources, _spec

DEFAULT_TENANT = "default"


@dataclasses.dataclass(frozen=True, slots=True)
class TenantSettings:
    name: str = _required()
    keys: tuple[str, ...] = _spec((), secret=True)
    keys_file: str | None = _spec(None)
    # Requests of the tenant holding a slot at once, over all models (None: no limit of its
    # own); requests beyond it wait in their model's queue without blocking others.
    max_concurrent: int | None = _spec(None, lo=1, hi=1_000_000)
    # Requests and tokens (prompt + completion) per minute; beyond: 429 before queueing.
    rpm_limit: int | None = _spec(None, lo=1, hi=100_000_000)
    tpm_limit: int | None = _spec(None, lo=1, hi=10_000_000_000)
    # Within a model's queue: a higher priority is granted first (within
    # gateway.max_priority_wait); equal priorities share the slots by weight.
    priority: int = _spec(0, lo=-1000, hi=1000)
    weight: float = _spec(1.0, lo=0.001, hi=1000.0)
    # The models (names or aliases) the tenant may use; empty: every model.
    models: tuple[str, ...] = ()
    # Derived: the keys of ``keys`` and ``keys_file`` together.
    all_keys: frozenset[str] = dataclasses.field(
        default=frozenset(), metadata={**_NO_BOUNDS, "derived": True, "secret": True})

    def may_use(self, model: str) -> bool:
        """Whether the tenant may use the model (its name; aliases are resolved at load)."""
        return not self.models or model in self.models


def _build_tenants(raw: Any, by_name: Mapping[str, Any], auth_keys: frozenset[str],
                   sources: _Sources) -> tuple[tuple[TenantSettings, ...],
                                               Mapping[str, TenantSettings]]:
    """The tenants (the ``default`` one always among them) and each client key's tenant."""
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        _fail("tenants", raw, sources, "an array of [[tenants]] tables")
    tenants: list[TenantSettings] = []
    owner: dict[str, str] = {}
    of_key: dict[str, TenantSettings] = {}
    for i, table in enumerate(raw):
        name = table.get("name") if isinstance(table, dict) else None
        named = isinstance(name, str) and name and all(t.name != name for t in tenants)
        path = f"tenants[{json.dumps(name)}]" if named else f"tenants[{i}]"
        tenant = _build(TenantSettings, table, path, sources)
        if any(t.name == tenant.name for t in tenants):
            _fail(f"{path}.name", tenant.name, sources, "unique among the tenants")
        for j, key in enumerate(tenant.keys):
            _check_token(f"{path}.keys[{j}]", key, sources)
        keys = frozenset(tenant.keys) | _keys_file(f"{path}.keys_file", tenant.keys_file,
                                                   sources)
        for key in sorted(keys):
            if key in owner:
                raise ConfigError(f"{path}.keys (from {sources.file}): a key of tenant "
                                  f"{owner[key]!r} is listed again; a key belongs to one tenant")
            owner[key] = tenant.name
        models = []
        for j, model in enumerate(tenant.models):
            if model not in by_name:
                _fail(f"{path}.models[{j}]", model, sources,
                      "the name or an alias of a configured model: " + ", ".join(by_name))
            models.append(by_name[model].name)
        tenant = dataclasses.replace(tenant, models=tuple(dict.fromkeys(models)), all_keys=keys)
        tenants.append(tenant)
        of_key.update(dict.fromkeys(keys, tenant))
    default = next((t for t in tenants if t.name == DEFAULT_TENANT), None)
    if default is None:
        default = TenantSettings(name=DEFAULT_TENANT)
        tenants.append(default)
    for key in auth_keys - owner.keys():
        of_key[key] = default
    return tuple(tenants), types.MappingProxyType(of_key)
