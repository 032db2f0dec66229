"""vllm-gateway: an OpenAI-compatible gateway in front of many vLLM servers.

This package is the application, the top of the import order: assembling the app
(``build_app``, ``Gateway``), its own routes, the admin API and dashboard, the Anthropic paths
and the command line. Nothing under it imports it, so its public names are imported here
directly.
"""

from __future__ import annotations

from kernel.config import Config, ConfigError, load_config

from .app import Gateway, build_app

__all__ = ["Config", "ConfigError", "Gateway", "build_app", "load_config"]
