"""Logging through structlog: JSON lines when stdout is not a terminal, readable lines when it
is. Every line logged while a request runs carries its request id (bound by RequestContext)."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(fmt: str = "auto", level: int = logging.INFO) -> None:
    console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    renderer = (structlog.dev.ConsoleRenderer() if console
                else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
