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

The package is split by section: ``gateway``, ``upstream``, ``access`` (``[admin]`` and
``[auth]``), ``telemetry``, ``cluster``, ``engines``, ``models`` and ``tenants`` each own their
tables and checks; ``validation`` checks one value and words its refusal, ``loader`` reads the
file, the environment and the options into ``Config``, ``masking`` shows it, ``reload``
compares two (a live reload). This module is the package's public API.
"""

from __future__ import annotations

from .access import AdminSettings, AuthSettings
from .cluster import ClusterSettings
from .engines import EngineSettings
from .gateway import GatewaySettings
from .loader import ENV_PREFIX, SECTIONS, Config, config_from_mapping, config_path, load_config
from .masking import effective, shared
from .models import PREFIX_ROUTING, ModelSettings, parse_size, placement
from .reload import ReloadPlan, config_hash, plan_reload
from .telemetry import TelemetrySettings
from .tenants import DEFAULT_TENANT, TenantSettings
from .upstream import UpstreamSettings
from .validation import ConfigError

__all__ = [
    "DEFAULT_TENANT",
    "ENV_PREFIX",
    "PREFIX_ROUTING",
    "SECTIONS",
    "AdminSettings",
    "AuthSettings",
    "ClusterSettings",
    "Config",
    "ConfigError",
    "EngineSettings",
    "GatewaySettings",
    "ModelSettings",
    "ReloadPlan",
    "TelemetrySettings",
    "TenantSettings",
    "UpstreamSettings",
    "config_from_mapping",
    "config_hash",
    "config_path",
    "effective",
    "load_config",
    "parse_size",
    "placement",
    "plan_reload",
    "shared",
]
