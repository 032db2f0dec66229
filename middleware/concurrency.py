"""Per-model semaphores: at most ``max_concurrent`` requests of a model in flight.

Requests wait in FIFO order (anyio's semaphores are fair), each wait bounded by
``queue_timeout`` (then 503 with ``Retry-After``); a client that disconnects while waiting
leaves at once. The slot is held until the inner app returns (the last byte was sent or the
client is gone) and released exactly once. ``max_concurrent_total`` bounds all models together.
The wait of a request that got its slot is observed (``gateway_queue_wait_seconds``) and left
in ``state["queue_wait"]`` for the access log.
"""

from __future__ import annotations

import time

import anyio

from proxy.config import Config
from proxy.errors import unavailable
from proxy.metrics import GatewayMetrics
from proxy.types import ASGIApp, Receive, Scope, Send, request_state

from .disconnect import ClientWatch


class _Slot:
    """Takes the model's semaphore, then the shared one; releases what it holds, once.

    A request counts as in flight only while it holds both: one that holds its model's
    semaphore but waits for the shared one is still queued."""

    __slots__ = ("_held", "_in_flight", "_model", "_sems")

    def __init__(self, sems: tuple[anyio.Semaphore, ...], in_flight: dict[str, int],
                 model: str) -> None:
        self._sems = sems
        self._in_flight = in_flight
        self._model = model
        self._held = 0

    @property
    def taken(self) -> bool:
        return self._held == len(self._sems)

    def _took_one(self) -> None:
        self._held += 1
        if self.taken:
            self._in_flight[self._model] += 1

    def try_acquire(self) -> bool:
        for sem in self._sems[self._held:]:
            try:
                sem.acquire_nowait()
            except anyio.WouldBlock:
                return False
            self._took_one()
        return True

    async def acquire(self) -> None:
        for sem in self._sems[self._held:]:
            await sem.acquire()
            self._took_one()

    def release(self) -> None:
        if self.taken:
            self._in_flight[self._model] -= 1
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
        self._in_flight = dict.fromkeys(self.limits, 0)
        metrics.gauge("gateway_in_flight", "Requests of a model holding a slot.",
                      self._in_flight.items)

    def in_flight(self, model: str) -> int:
        return self._in_flight[model]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = request_state(scope)
        model = state["model"].name
        leave_queue = state.get("leave_queue", _nothing)
        slot = _Slot(self._sems[model], self._in_flight, model)
        watch = ClientWatch(receive)
        began = time.perf_counter()
        try:
            if not slot.try_acquire():
                # Not fail_after: a slot that came just as the time ran out is used, not refused.
                with anyio.move_on_after(self.timeout):
                    await watch.run(slot.acquire)
            leave_queue()
            if not slot.taken:
                if watch.disconnected:
                    self.metrics.reject(model, "client_disconnected")
                    return
                self.metrics.reject(model, "queue_timeout")
                await unavailable(
                    f"No slot of model '{model}' became free within {self.timeout:g} s.",
                    code="queue_timeout", retry_after=self.timeout,
                ).answer(scope, send)
                return
            state["queue_wait"] = waited = time.perf_counter() - began
            self.metrics.queue_wait(model).observe(waited)
            await self.app(scope, watch.receive, send)
        finally:
            slot.release()


def _nothing() -> None:
    return None
