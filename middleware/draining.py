"""Draining: the gateway stops taking requests and ends the ones it has, for a graceful stop.

Once ``drain()`` is called, a new request gets 503 ``shutting_down`` with ``Retry-After`` (another
replica, or this one once restarted, will take it); the requests already in flight go on, and
``until_idle()`` returns when the last one is done. ``end_in_flight()`` cancels those still
running: one that has sent nothing yet gets the same 503, an SSE stream gets an error event and
ends, and a plain body is cut off (the server closes the connection, so it cannot pass for a
whole answer). The layers inside free their queue place and slot on the way out, and the
passthrough closes the upstream response, so the backend aborts the generation.
"""

from __future__ import annotations

import anyio
import structlog

from kernel.errors import GatewayError, unavailable
from kernel.types import ASGIApp, Receive, Scope, Send, is_sse

from .progress import progress

log = structlog.get_logger("gateway.draining")

# Seconds a refused client is told to wait: at once, to another replica behind the balancer.
RETRY_AFTER = 1


def shutting_down() -> GatewayError:
    return unavailable("The gateway is shutting down; send the request again.",
                       code="shutting_down", retry_after=RETRY_AFTER)


class Draining:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.draining = False
        self._running: set[anyio.CancelScope] = set()
        self._idle: anyio.Event | None = None

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def drain(self) -> None:
        """Refuse new requests from now on (for good: a drained gateway is about to stop)."""
        self.draining = True

    def end_in_flight(self) -> None:
        """Cancel the requests still in flight; each ends as the module's docstring says."""
        if self._running:
            log.warning("ending requests still in flight", count=len(self._running))
        for scope in self._running:
            scope.cancel()

    async def until_idle(self) -> None:
        while self._running:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining:
            await shutting_down().answer(scope, send)
            return
        response, send = progress(scope, send)
        with anyio.CancelScope() as cancel:
            self._running.add(cancel)
            try:
                await self.app(scope, receive, send)
            finally:
                self._running.discard(cancel)
                if not self._running and self._idle is not None:
                    self._idle.set()
                    self._idle = None
        if not cancel.cancelled_caught or response.complete:
            return
        try:
            if response.start is None:
                await shutting_down().answer(scope, send)
            elif is_sse(response.start):
                await send(unavailable("The gateway is shutting down; the answer was cut short.",
                                       code="shutting_down").sse_message())
        except OSError:  # the client is gone as well (servers that raise on such a send)
            return
