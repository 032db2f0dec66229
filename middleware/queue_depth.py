"""Queue depth: how many requests of a model wait for a slot, and a bound on it.

A request is counted when it enters and uncounted exactly once, by whichever comes first: the
inner layer calling ``state["leave_queue"]()`` when it gets a slot or refuses the request, or
this layer's ``finally`` (the client left, the inner app failed, anything was cancelled). The
count and the flag change together in one synchronous call, so no cancellation can fall between
them. A request that would exceed ``max_queue_size`` gets 429 at once and is never counted.
"""

from __future__ import annotations

from kernel.config import Config
from kernel.errors import GatewayError
from kernel.types import ASGIApp, Receive, Scope, Send, request_state
from telemetry.metrics import GatewayMetrics


class _QueuePlace:
    __slots__ = ("_depth", "_held", "_model")

    def __init__(self, depth: dict[str, int], model: str) -> None:
        self._depth = depth
        self._model = model
        self._held = True
        depth[model] += 1

    def leave(self) -> None:
        if self._held:
            self._held = False
            self._depth[self._model] -= 1


class QueueDepthLimit:
    def __init__(self, app: ASGIApp, *, config: Config, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.limits = {m.name: config.max_queue_size_of(m) for m in config.models}
        self.retry_after = max(1.0, min(config.gateway.queue_timeout, 10.0))
        self._depth = dict.fromkeys(self.limits, 0)
        metrics.gauge("gateway_queue_depth", "Requests waiting for a slot of their model.",
                      self._depth.items)

    def depth(self, model: str) -> int:
        return self._depth[model]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = request_state(scope)
        model = state["model"].name
        if self._depth[model] >= self.limits[model]:
            self.metrics.reject(model, "queue_full")
            await GatewayError(
                429, f"Too many requests are waiting for model '{model}'; try again later.",
                type="rate_limit_error", code="queue_full", retry_after=self.retry_after,
            ).answer(scope, send)
            return
        place = _QueuePlace(self._depth, model)
        state["leave_queue"] = place.leave
        try:
            await self.app(scope, receive, send)
        finally:
            place.leave()
