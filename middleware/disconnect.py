"""Waiting for something while noticing that the client went away.

A layer that makes a request wait (for a queue place, a slot, a backend) must let the request go
the moment its client disconnects. ASGI only says so through ``receive()``, so while the layer
waits it reads ``receive()`` in a sibling task; whatever it reads before the disconnect (the
replayed body) is kept and handed to the inner app in order. That read is cancelled when the
wait ends, so ``receive`` must lose nothing when cancelled, as the servers' queues do.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from proxy.types import Message, Receive

T = TypeVar("T")


class ClientWatch:
    """Wraps ``receive`` for one request; ``run`` races a wait against a disconnect."""

    __slots__ = ("_kept", "_receive", "disconnected")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._kept: list[Message] = []
        self.disconnected = False

    async def receive(self) -> Message:
        if self._kept:
            return self._kept.pop(0)
        return await self._receive()

    async def run(self, wait: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        """Run ``wait``; ``(True, result)``, or ``(False, None)`` if the client left first.

        ``wait`` must undo its own effect if it is cancelled after it succeeded (for a
        semaphore: release what it acquired); see ModelConcurrencyLimit.
        """
        if self.disconnected:
            return False, None
        result: list[T] = []

        async def watch(scope: anyio.CancelScope) -> None:
            while True:
                message = await self._receive()
                self._kept.append(message)
                if message["type"] == "http.disconnect":
                    self.disconnected = True
                    scope.cancel()
                    return

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, tg.cancel_scope)
                result.append(await wait())
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # One failing task is the usual case; let it read as itself to the caller.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        if result:
            return True, result[0]
        return False, None
