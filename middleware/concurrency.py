"""Per-model slots: at most ``max_concurrent`` requests of a model in flight.

Inside ``QueueDepthLimit``, which joins the request to the accounting (``kernel.accounting``)
and leaves it when the request is done, so the slot is held until the inner app returns (the
last byte was sent or the client is gone) and given back exactly once. Here the request takes
its slot: at once if one is free and no one is ahead, else in FIFO order, each wait bounded by
``queue_timeout`` (then 503 with ``Retry-After``); a client that disconnects while waiting
leaves at once. ``max_concurrent_total`` bounds all models together. The wait of a request
that got its slot is observed (``gateway_queue_wait_seconds``) and left in the request's
``queue_wait`` for the access log; requests in flight are exposed as ``gateway_in_flight``.

A model with replicas (``max_replicas`` > 1) has ``max_concurrent`` slots per ready replica (at
least one replica's, so that a request can start the first): the pool says how many are ready
(``Accounting.serving``), and reads how long the oldest request has waited (it adds a replica
after ``scale_up_after`` of it).
"""

from __future__ import annotations

import time

from kernel.accounting import Accounting
from kernel.config import Config
from kernel.context import STATE, RequestState
from kernel.errors import unavailable
from kernel.types import ASGIApp, Receive, Scope, Send
from relay.disconnect import ClientWatch
from telemetry.metrics import GatewayMetrics


class ModelConcurrencyLimit:
    def __init__(self, app: ASGIApp, *, config: Config, metrics: GatewayMetrics,
                 accounting: Accounting) -> None:
        self.app = app
        self.metrics = metrics
        self.accounting = accounting
        self.timeout = config.gateway.queue_timeout
        names = [m.name for m in config.models]
        metrics.gauge("gateway_in_flight", "Requests of a model holding a slot.",
                      lambda: [(name, accounting.in_flight(name)) for name in names])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: RequestState = scope[STATE]
        model = state.model.name
        ticket = state.ticket
        accounting = self.accounting
        watch = ClientWatch(receive)
        began = time.perf_counter()
        if not await accounting.try_acquire(ticket):
            _, taken = await watch.run(lambda: accounting.acquire(ticket))
            if not taken:
                if watch.disconnected:
                    self.metrics.reject(model, "client_disconnected")
                    return
                self.metrics.reject(model, "queue_timeout")
                await unavailable(
                    f"No slot of model '{model}' became free within {self.timeout:g} s.",
                    code="queue_timeout", retry_after=self.timeout,
                ).answer(scope, send)
                return
        state.queue_wait = waited = time.perf_counter() - began
        self.metrics.queue_wait(model).observe(waited)
        await self.app(scope, watch.receive, send)
