"""vllm-gateway: an OpenAI-compatible gateway in front of many vLLM servers.

``build_app`` and ``Gateway`` are imported on first use, so that importing one layer
(``middleware.admission``, say) does not pull in, and go round in a circle through, the whole
application.
"""

from __future__ import annotations

from typing import Any

from kernel.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "Gateway", "build_app", "load_config"]


def __getattr__(name: str) -> Any:
    if name in ("Gateway", "build_app"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
