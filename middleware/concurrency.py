"""Per-model semaphores: at most ``max_concurrent`` requests of a model in flight.

Requests wait in FIFO order (anyio's semaphores are fair), each wait bounded by
``queue_timeout`` (then 503 with ``Retry-After``); a client that disconnects while waiting
leaves at once. The slot is held until the inner app returns (the last byte was sent or the
client is gone) and released exactly once. ``max_concurrent_total`` bounds all models together.
The wait of a request that got its slot is observed (``gateway_queue_wait_seconds``) and left
in ``state["queue_wait"]`` for the access log.

A model with replicas (``max_replicas`` > 1) has ``max_concurrent`` slots per ready replica (at
least one replica's, so that a request can start the first): ``ReplicaSlots``, a FIFO
semaphore whose size the pool sets as replicas come and go, and that tells the pool how long
its oldest request has waited (the pool adds a replica after ``scale_up_after`` of it).
"""

from __future__ import annotations

import time
from collections import deque

import anyio

from kernel.config import Config
from kernel.errors import unavailable
from kernel.types import ASGIApp, Receive, Scope, Send, request_state
from relay.disconnect import ClientWatch
from telemetry.metrics import GatewayMetrics


class _Slot:
    """Takes the model's semaphore, then the shared one; releases what it holds, once.

    A request counts as in flight only while it holds both: one that holds its model's
    semaphore but waits for the shared one is still queued."""

    __slots__ = ("_held", "_in_flight", "_model", "_sems")

    def __init__(self, sems: tuple[anyio.Semaphore | ReplicaSlots, ...], in_flight: dict[str, int],
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


class ReplicaSlots:
    """A FIFO semaphore of ``per_replica`` slots per ready replica (at least one replica's)."""

    __slots__ = ("_waiters", "capacity", "per_replica", "taken")

    def __init__(self, per_replica: int) -> None:
        self.per_replica = self.capacity = per_replica
        self.taken = 0
        # Each waiter: when it began to wait, and the event that hands it its slot.
        self._waiters: deque[tuple[float, anyio.Event]] = deque()

    def acquire_nowait(self) -> None:
        if self._waiters or self.taken >= self.capacity:
            raise anyio.WouldBlock
        self.taken += 1

    async def acquire(self) -> None:
        try:
            self.acquire_nowait()
            return
        except anyio.WouldBlock:
            pass
        waiter = (anyio.current_time(), anyio.Event())
        self._waiters.append(waiter)
        try:
            await waiter[1].wait()
        except BaseException:
            if waiter[1].is_set():  # handed its slot as it was cancelled: hand it on
                self.release()
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.taken -= 1
        self._hand_out()

    def serve(self, replicas: int) -> None:
        """``replicas`` are ready now: their slots are the model's."""
        self.capacity = self.per_replica * max(1, replicas)
        self._hand_out()

    def oldest_wait(self) -> float | None:
        return anyio.current_time() - self._waiters[0][0] if self._waiters else None

    def _hand_out(self) -> None:
        while self._waiters and self.taken < self.capacity:
            _, event = self._waiters.popleft()
            self.taken += 1
            event.set()


class ModelConcurrencyLimit:
    def __init__(self, app: ASGIApp, *, config: Config, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.timeout = config.gateway.queue_timeout
        self.limits = {m.name: config.max_concurrent_of(m) for m in config.models}
        self.replica_slots = {m.name: ReplicaSlots(self.limits[m.name])
                              for m in config.models if m.max_replicas > 1}
        total = config.gateway.max_concurrent_total
        shared = (anyio.Semaphore(total),) if total else ()
        self._sems: dict[str, tuple[anyio.Semaphore | ReplicaSlots, ...]] = {
            name: (self.replica_slots.get(name) or anyio.Semaphore(limit), *shared)
            for name, limit in self.limits.items()}
        self._in_flight = dict.fromkeys(self.limits, 0)
        metrics.gauge("gateway_in_flight", "Requests of a model holding a slot.",
                      self._in_flight.items)

    def in_flight(self, model: str) -> int:
        return self._in_flight[model]

    def serving(self, model: str, replicas: int) -> None:
        """The pool's word: ``replicas`` of the model are ready (a model with replicas)."""
        self.replica_slots[model].serve(replicas)

    def oldest_wait(self, model: str) -> float | None:
        """Seconds the model's longest-waiting request has waited for a slot of a replica."""
        slots = self.replica_slots.get(model)
        return slots.oldest_wait() if slots is not None else None

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
