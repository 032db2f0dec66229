"""Waiting for something while noticing that the client went away.

A layer that makes a request wait (for a queue place, a slot, a backend) must let the request go
the moment its client disconnects. ASGI only says so through ``receive()``, so while the layer
waits it reads ``receive()`` in a sibling task (a plain task on asyncio, where an anyio task
group per request cost three times as much; a task group on trio); whatever it reads before the
disconnect (the replayed body) is kept and handed to the inner app in order. That read is
cancelled when the wait ends, so ``receive`` must lose nothing when cancelled, as the servers'
queues do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import sniffio

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
        if sniffio.current_async_library() == "asyncio":
            return await self._run_asyncio(wait)
        return await self._run_task_group(wait)

    async def _watch(self, scope: anyio.CancelScope) -> None:
        while True:
            message = await self._receive()
            self._kept.append(message)
            if message["type"] == "http.disconnect":
                self.disconnected = True
                scope.cancel()
                return

    async def _run_asyncio(self, wait: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        # The same race as _run_task_group, at a fraction of its cost (a request runs this
        # once; an anyio task group costs ~100 us here, mostly in cancelling it): the watcher
        # is a plain task, cancelled when the wait ends. A failure of the watcher cancels the
        # wait and is raised, as a task group would.
        with anyio.CancelScope() as scope:
            watcher = asyncio.get_running_loop().create_task(self._watch(scope))
            watcher.add_done_callback(lambda task: task.cancelled() or task.exception() is None
                                      or scope.cancel())
            try:
                result = await wait()
            finally:
                watcher.cancel()
            return True, result
        if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
            raise watcher.exception()  # type: ignore[misc]
        return False, None

    async def _run_task_group(self, wait: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        result: list[T] = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch, tg.cancel_scope)
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
