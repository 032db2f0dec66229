"""What ``check-config`` prints and the start-up log holds (``effective``): the configuration in
force with its derived figures, and its secrets masked: ``admin.token``, ``auth.api_keys``, the
tenants' keys, and whatever in a model's ``env``, ``command``, ``args`` or URL (or
``cluster.redis_url``) looks like a credential."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .loader import SECTIONS, Config
from .validation import _SECRET_NAME, MASK


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


_MASKS = {"env": _mask_env, "command": _mask_argv, "args": _mask_argv, "url": _mask_url,
          "redis_url": _mask_url}


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
            elif isinstance(value, frozenset):
                value = list(value)
            elif isinstance(value, tuple):  # of values, or of tables (a model's adapters)
                value = [dump(v) if dataclasses.is_dataclass(v) else v for v in value]
            elif isinstance(value, Mapping):  # an empty telemetry.headers
                value = dict(value)
            out[field.name] = value
        return out

    return {
        "source": config.source,
        **{name: dump(getattr(config, name)) for name in SECTIONS},
        "engines": {name: dump(e) for name, e in config.engines.items()},
        "models": [dump(m) for m in config.models],
        "tenants": [dump(t) for t in config.tenants],
        "derived": {
            "upstream_pool_size": config.upstream_pool_size,
            "upstream_keepalive_size": config.upstream_keepalive_size,
        },
    }


# The [gateway] keys every process of a cluster must agree on (the rest is per process: its
# address, logging, body and client budgets, its GPU figures, its upstream client).
SHARED_GATEWAY = ("max_queue_size", "max_concurrent", "max_models_concurrent",
                  "max_models_asleep", "max_concurrent_total", "queue_timeout",
                  "placement_timeout", "instance", "default_model", "max_priority_wait")
# A tenant's keys that order the shared queues (the rest, its keys and rate limits, is per
# process: the rate windows are kept in Redis by tenant name).
SHARED_TENANT = ("priority", "weight", "max_concurrent")


def shared(config: Config) -> dict[str, str]:
    """What the processes of one ``[cluster]`` must agree on, flattened: each key as
    ``check-config`` would name it (``gateway.max_concurrent``, ``models["m"].launcher``) to
    its value in JSON (secrets masked, as ``effective`` shows them): the shared limits, the
    lease, the engines, the model set and the tenants' order in the queues."""
    shown = effective(config)
    flat = {f"gateway.{key}": shown["gateway"][key] for key in SHARED_GATEWAY}
    flat["cluster.lease_s"] = shown["cluster"]["lease_s"]
    for tenant in shown["tenants"]:
        for key in SHARED_TENANT:
            flat[f"tenants[{json.dumps(tenant['name'])}].{key}"] = tenant[key]
    for section, entries in (("engines", shown["engines"].items()),
                             ("models", ((m["name"], m) for m in shown["models"]))):
        for name, table in entries:
            for key, value in table.items():
                flat[f"{section}[{json.dumps(name)}].{key}"] = value
    return {key: json.dumps(value, sort_keys=True) for key, value in sorted(flat.items())}
