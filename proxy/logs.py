"""Logging through structlog: JSON lines when stdout is not a terminal, readable lines when it
is. Every line logged while a request runs carries its request id (bound by RequestContext).

The server's own lines (hypercorn's ``Running on ...``, its errors) go through the same
renderer: ``SERVER_LOGGER`` is the standard-library logger ``vllm-gateway serve`` hands to
hypercorn. In the console format the effective configuration is a block of one line per
section and per model, not one line of a few kilobytes.
"""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from typing import Any

import msgspec
import structlog

from kernel.config import SECTIONS, Config, effective

SERVER_LOGGER = "gateway.server"
CONFIG_KEY = "config"
WIDTH = 100


def _value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c in "\"'" for c in value):
        return value
    return json.dumps(value)


def _table(head: str, table: dict[str, Any]) -> str:
    pairs = " ".join(f"{key}={_value(value)}" for key, value in table.items())
    return textwrap.fill(f"{head} {pairs}", WIDTH, initial_indent="  ",
                         subsequent_indent="      ", break_long_words=False,
                         break_on_hyphens=False)


def config_block(config: dict[str, Any]) -> str:
    """The effective configuration (``effective()``) as lines a person reads."""
    lines = []
    for name, value in config.items():
        if name == "engines":
            lines += [_table(f"[engines.{engine}]", table) for engine, table in value.items()]
        elif name in ("models", "tenants"):
            lines += [_table(f"[[{name}]]", table) for table in value]
        elif name in SECTIONS:
            lines.append(_table(f"[{name}]", value))
        elif isinstance(value, dict):  # the derived figures
            lines.append(_table(f"{name}:", value))
        else:  # the file it came from
            lines.append(f"  {name}: {value}")
    return "\n".join(lines)


class _Console:
    """structlog's console renderer; a ``config`` table follows its line as a block."""

    def __init__(self) -> None:
        self._render = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty(), sort_keys=False)

    def __call__(self, logger: Any, name: str, event: dict[str, Any]) -> str:
        config = event.pop(CONFIG_KEY, None)
        line = self._render(logger, name, event)
        return line if not isinstance(config, dict) else f"{line}\n{config_block(config)}"


# One JSON line per request (the access line): msgspec encodes one in ~1 us where the json
# module took 10-20, half of the line's cost. What it cannot encode is written as its repr, as
# structlog's own fallback does (bytes, which no line carries, would come out as base64).
_ENCODER = msgspec.json.Encoder(enc_hook=repr)


def _json(event: dict[str, Any], **_: Any) -> str:
    return _ENCODER.encode(event).decode()


def configure_logging(fmt: str = "auto", level: int = logging.INFO) -> None:
    console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    renderer = _Console() if console else structlog.processors.JSONRenderer(serializer=_json)
    stamp = [structlog.processors.add_log_level,
             structlog.processors.TimeStamper(fmt="iso", utc=True)]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *stamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*stamp, structlog.processors.format_exc_info],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]))
    server = logging.getLogger(SERVER_LOGGER)
    server.handlers = [handler]
    server.setLevel(level)
    server.propagate = False


def log_configuration(config: Config) -> None:
    """The effective configuration, secrets masked: once, at start-up."""
    structlog.get_logger("gateway").info("effective configuration",
                                         **{CONFIG_KEY: effective(config)})
