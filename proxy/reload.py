"""Live reload: the configuration read again and put in force without a restart.

Three triggers call ``Reloads.reload``: SIGHUP and ``--watch-config`` (``proxy.cli``) and
``POST /admin/reload`` (``proxy.admin``). A reload reads the configuration as the start did (the
same file, variables and command-line options: ``load``) and validates it whole; an invalid one
changes nothing (400 ``invalid_config`` with its one-line error), nor does one that changes a key
that cannot change live (409 ``reload_refused``, naming each: ``kernel.config.reload.FIXED``).
Otherwise ``Gateway.reconfigure`` applies it as a diff (``kernel.config.plan_reload``), in one
synchronous step. Each outcome is logged, counted (``gateway_config_reloads_total{outcome}``),
kept for the admin view (the last one, with what changed) and told to the event stream; the hash
of the configuration in force (``config_hash``) is in ``/health``, the admin view and
``gateway_config_info``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from kernel.config import Config, ConfigError, ReloadPlan, config_hash, plan_reload
from kernel.errors import GatewayError

if TYPE_CHECKING:
    from .app import Gateway

log = structlog.get_logger("gateway")

OUTCOMES = ("applied", "invalid", "refused")


def invalid_config(error: ConfigError) -> GatewayError:
    return GatewayError(400, f"The new configuration is invalid, nothing changed: {error}",
                        type="invalid_request_error", code="invalid_config", should_retry=False)


def refused(keys: tuple[str, ...]) -> GatewayError:
    return GatewayError(409, "These keys cannot change while the gateway runs, nothing changed "
                        f"(restart the gateway to change them): {', '.join(keys)}",
                        type="invalid_request_error", code="reload_refused", should_retry=False)


class Reloads:
    def __init__(self, gateway: Gateway, load: Callable[[], Config] | None) -> None:
        self.gateway = gateway
        self.load = load
        self.hash = config_hash(gateway.config)
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.last: dict[str, Any] | None = None
        gateway.metrics.config_in_force(self.hash)

    def reload(self, config: Config | None = None) -> ReloadPlan:
        """Read the configuration again (or take ``config``) and put it in force; what changed.
        Raises GatewayError (400 invalid, 409 refused or no file to read) and changes nothing."""
        if config is None:
            if self.load is None:
                raise GatewayError(409, "This gateway was given its configuration, not a file to "
                                   "read it from again.", type="invalid_request_error",
                                   code="reload_unavailable", should_retry=False)
            try:
                config = self.load()
            except ConfigError as exc:
                self._told("invalid", error=str(exc))
                raise invalid_config(exc) from None
        plan = plan_reload(self.gateway.config, config)
        if plan.refused:
            error = refused(plan.refused)
            self._told("refused", error=error.message, keys=list(plan.refused))
            raise error
        self.gateway.reconfigure(config, plan)
        self.hash = config_hash(config)
        self.gateway.metrics.config_in_force(self.hash)
        self._told("applied", changes=plan.as_json())
        return plan

    def _told(self, outcome: str, **what: Any) -> None:
        self.counts[outcome] += 1
        self.gateway.metrics.reloads.labels(outcome).inc()
        self.last = {"outcome": outcome, "time": round(time.time(), 3), "hash": self.hash,
                     **what}
        if outcome == "applied":
            log.info("configuration reloaded", config_hash=self.hash, **what)
        else:
            log.error(f"configuration reload {outcome}: the configuration in force is kept",
                      config_hash=self.hash, **what)
        self.gateway.events.changed()

    def view(self) -> dict[str, Any]:
        """The admin view's: the hash in force, the reloads by outcome, the last one."""
        return {"hash": self.hash, "reloads": dict(self.counts), "last_reload": self.last}
