"""Per-model semaphores: at most ``max_concurrent`` requests of a model in flight.

Requests wait in FIFO order (anyio's semaphores are fair), each wait bounded by
``queue_timeout`` (then 503 with ``Retry-After``); a client that disconnects while waiting
leaves at once. The slot is held until the inner app returns (the last byte was sent or the
client is gone) and released exactly once. ``max_concurrent_total`` bounds all models together.
"""

from __future__ import annotations

import anyio

from proxy.config import Config
from proxy.errors import unavailable
from proxy.metrics import GatewayMetrics
from proxy.types import ASGIApp, Receive, Scope, Send, request_state

from .disconnect import ClientWatch


class _Slot:
    """Acquires the model's semaphore, then the global one; releases what it holds, once."""

    __slots__ = ("_held", "_sems")

    def __init__(self, sems: tuple[anyio.Semaphore, ...]) -> None:
        self._sems = sems
        self._held = 0

    def try_acquire(self) -> bool:
        for sem in self._sems[self._held:]:
            try:
                sem.acquire_nowait()
            except anyio.WouldBlock:
                return False
            self._held += 1
        return True

    async def acquire(self) -> None:
        for sem in self._sems[self._held:]:
            await sem.acquire()
            self._held += 1

    def release(self) -> None:
        while self._held:
            self._held -= 1
            self._sems[self._held].release()


class ModelConcurrencyLimit:
    def __init__(self, app: ASGIApp, *, config: Config, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.timeout = config.gateway.queue_timeout
        self.limits = {m.name: config.max_concurrent_of(m) for m in config.models}
        total = config.gateway.max_concurrent_total
        shared = (anyio.Semaphore(total),) if total else ()
        self._sems = {name: (anyio.Semaphore(limit), *shared)
                      for name, limit in self.limits.items()}
        metrics.gauge("gateway_in_flight", "Requests of a model holding a slot.",
                      lambda: ((name, self.in_flight(name)) for name in self.limits))

    def in_flight(self, model: str) -> int:
        return self.limits[model] - self._sems[model][0].value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = request_state(scope)
        model = state["model"].name
        leave_queue = state.get("leave_queue", _nothing)
        slot = _Slot(self._sems[model])
        watch = ClientWatch(receive)
        try:
            if not slot.try_acquire():
                try:
                    with anyio.fail_after(self.timeout):
                        got, _ = await watch.run(slot.acquire)
                except TimeoutError:
                    leave_queue()
                    self.metrics.reject(model, "queue_timeout")
                    await unavailable(
                        f"No slot of model '{model}' became free within {self.timeout:g} s.",
                        code="queue_timeout", retry_after=self.timeout,
                    ).send(send)
                    return
                if not got:
                    leave_queue()
                    self.metrics.reject(model, "client_disconnected")
                    return
            leave_queue()
            await self.app(scope, watch.receive, send)
        finally:
            slot.release()


def _nothing() -> None:
    return None
