"""Queue depth: a request joins its model's queue for a slot here, within a bound, and leaves.

The request joins the accounting (``kernel.accounting``) when it enters and leaves it in this
layer's ``finally``, whatever happened inside (it got a slot and answered, it timed out, the
client left, the inner app failed, anything was cancelled): leaving takes it out of the queue if
it is still there and gives back the slot it holds. The inner layer (``ModelConcurrencyLimit``)
acquires the slot in between. A request that would exceed ``max_queue_size`` gets 429 at once
and is never counted. The request joins as its tenant's (``RequestState.tenant``, set by the
client keys layer), whose priority, share and ``max_concurrent`` order the queue
(``kernel.fair_accounting``). The depth is exposed as ``gateway_queue_depth``.
"""

from __future__ import annotations

from kernel.accounting import Accounting
from kernel.config import Config
from kernel.context import STATE, RequestState
from kernel.errors import GatewayError
from kernel.types import ASGIApp, Receive, Scope, Send
from telemetry.metrics import GatewayMetrics


class QueueDepthLimit:
    def __init__(self, app: ASGIApp, *, config: Config, metrics: GatewayMetrics,
                 accounting: Accounting) -> None:
        self.app = app
        self.metrics = metrics
        self.accounting = accounting
        self.retry_after = max(1.0, min(config.gateway.queue_timeout, 10.0))
        names = [m.name for m in config.models]
        metrics.gauge("gateway_queue_depth", "Requests waiting for a slot of their model.",
                      lambda: [(name, accounting.depth(name)) for name in names])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: RequestState = scope[STATE]
        model = state.model.name
        ticket = await self.accounting.join(model, state.tenant)
        if ticket is None:
            self.metrics.reject(model, "queue_full")
            await GatewayError(
                429, f"Too many requests are waiting for model '{model}'; try again later.",
                type="rate_limit_error", code="queue_full", retry_after=self.retry_after,
            ).answer(scope, send)
            return
        state.ticket = ticket
        try:
            await self.app(scope, receive, send)
        finally:
            await self.accounting.leave(ticket)
