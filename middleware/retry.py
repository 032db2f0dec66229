"""Retry: re-run the inner app when the request never reached the backend.

Only ``UpstreamConnectError`` is retried (refused, reset before sending, connect timeout, a
backend not yet listening), and only while nothing of the answer has gone to the client (the
loading feedback's comments may have). Never after a
response started, never on an HTTP status from the backend (the passthrough relays those as
they are). Waits grow exponentially with full jitter, within ``retries`` attempts and an
overall deadline, and every retry is paid from a budget shared by all requests (a fraction of
recent requests plus a floor), so a dead backend cannot turn a burst into a retry storm.
"""

from __future__ import annotations

import random

import anyio
import structlog

from kernel.config import Config
from kernel.context import STATE, RequestState
from kernel.types import ASGIApp, Receive, Scope, Send
from relay.passthrough import UpstreamConnectError
from telemetry.metrics import GatewayMetrics

from .progress import progress

log = structlog.get_logger("gateway.retry")

BUCKETS = 10


class RetryBudget:
    """Retries allowed in a sliding window: ``minimum + ratio * requests`` in that window."""

    def __init__(self, *, ratio: float, minimum: int, window: float) -> None:
        self.ratio = ratio
        self.minimum = minimum
        self.width = window / BUCKETS
        self._requests = [0] * BUCKETS
        self._retries = [0] * BUCKETS
        self._bucket = 0

    def _advance(self, now: float) -> int:
        bucket = int(now / self.width)
        if bucket != self._bucket:
            for stale in range(max(self._bucket + 1, bucket - BUCKETS + 1), bucket + 1):
                self._requests[stale % BUCKETS] = 0
                self._retries[stale % BUCKETS] = 0
            self._bucket = bucket
        return bucket % BUCKETS

    def record_request(self, now: float) -> None:
        self._requests[self._advance(now)] += 1

    def try_spend(self, now: float) -> bool:
        slot = self._advance(now)
        if sum(self._retries) + 1 > self.minimum + self.ratio * sum(self._requests):
            return False
        self._retries[slot] += 1
        return True


class RetryConnectFailures:
    def __init__(self, app: ASGIApp, *, config: Config, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics
        up = config.upstream
        self.retries = up.retries
        self.base = up.backoff_base
        self.cap = up.backoff_max
        self.deadline = up.retry_deadline
        self.budget = RetryBudget(ratio=up.retry_budget_ratio, minimum=up.retry_budget_min,
                                  window=up.retry_budget_window)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: RequestState = scope[STATE]
        model = state.model.name
        response, send = progress(scope, send)
        begun = anyio.current_time()
        self.budget.record_request(begun)
        attempt = 0
        while True:
            try:
                await self.app(scope, receive, send)
                return
            except UpstreamConnectError:
                if response.answered:  # the loading feedback alone does not stop a retry
                    raise
                attempt += 1
                delay = random.uniform(0, min(self.cap, self.base * 2 ** (attempt - 1)))
                now = anyio.current_time()
                if (attempt > self.retries or now + delay - begun > self.deadline
                        or not self.budget.try_spend(now)):
                    raise
            state.retries = attempt
            self.metrics.retried(model).inc()
            log.info("retrying upstream connect", model=model, attempt=attempt,
                     delay=round(delay, 4))
            await anyio.sleep(delay)
