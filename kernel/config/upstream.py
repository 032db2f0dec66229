"""The ``[upstream]`` section: the client that talks to the model servers (timeouts, how long an
idle connection is kept) and the retry of connect failures (backoff, deadline, budget)."""

from __future__ import annotations

import dataclasses

from .validation import DAY, HOUR, _spec


@dataclasses.dataclass(frozen=True, slots=True)
class UpstreamSettings:
    connect_timeout: float = _spec(10.0, lo=0.001, hi=HOUR)
    timeout: float = _spec(300.0, lo=0.001, hi=DAY)
    write_timeout: float = _spec(60.0, lo=0.001, hi=DAY)
    pool_timeout: float = _spec(1.0, lo=0.0, hi=HOUR)
    retries: int = _spec(3, lo=0, hi=20)
    backoff_base: float = _spec(0.05, lo=0.0, hi=60.0)
    backoff_max: float = _spec(2.0, lo=0.0, hi=HOUR)
    retry_deadline: float = _spec(10.0, lo=0.0, hi=HOUR)
    retry_budget_ratio: float = _spec(0.2, lo=0.0, hi=1.0)
    retry_budget_min: int = _spec(10, lo=0, hi=1_000_000)
    retry_budget_window: float = _spec(10.0, lo=0.1, hi=HOUR)
    # Seconds an idle backend connection is kept for the next request: below the backend's own
    # keep-alive (vLLM closes an idle connection after 5 s), so that the gateway, never the
    # backend, closes it; else a request can be sent down a connection the backend is closing.
    keepalive_expiry: float = _spec(4.0, lo=0.001, hi=HOUR)
