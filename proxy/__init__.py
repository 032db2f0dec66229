"""vllm-gateway: an OpenAI-compatible gateway in front of many vLLM servers."""

from .app import Gateway, build_app
from .config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "Gateway", "build_app", "load_config"]
