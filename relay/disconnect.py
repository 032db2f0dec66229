"""Waiting for something while noticing that the client went away or stopped reading.

A layer that makes a request wait (for a queue place, a slot, a backend) must let the request go
the moment its client disconnects. ASGI only says so through ``receive()``, so while the layer
waits it reads ``receive()`` in a sibling task (a plain task on asyncio, where an anyio task
group per request cost three times as much; a task group on trio); whatever it reads before the
disconnect (the replayed body) is kept and handed to the inner app in order. That read is
cancelled when the wait ends, so ``receive`` must lose nothing when cancelled, as the servers'
queues do.

A client that stops reading is no disconnect: the server's ``send`` just never returns (hypercorn
waits on the socket with no deadline). A wait given a ``SendWatch`` also ends when one send has
not completed for ``send_timeout``. The sender counts each send before and after it (two integer
increments, no clock, no cancel scope per chunk); a timer shared by all answers looks at the
counts once a tick, so a stalled send is seen between ``send_timeout`` and ``send_timeout`` plus
a tick. Hypercorn's trio
worker shields its socket writes from cancellation, so on trio each send runs in a task of its
own (``cancellable``) that the request can leave behind; the server's closing of the connection
then ends it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import sniffio
import trio

from kernel.types import Message, Receive, Send

T = TypeVar("T")

# The longest tick of a SendWatch, in seconds: how late past send_timeout a stall may be seen.
MAX_TICK = 1.0


class SendWatches:
    """The send watches of the answers in progress, with one ``send_timeout``. On asyncio one
    timer looks at all of them once a tick, and runs only while there are any, where a timer per
    answer made uvloop create and free a timer handle per answer and tick."""

    __slots__ = ("_timer", "_watched", "tick", "ticks_to_stall")

    def __init__(self, timeout: float) -> None:
        self.tick = min(MAX_TICK, timeout / 4)
        self.ticks_to_stall = math.ceil(timeout / self.tick)
        self._watched: dict[SendWatch, Callable[[], None]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def new(self) -> SendWatch:
        return SendWatch(self)

    def watch(self, sends: SendWatch, on_stall: Callable[[], None]) -> None:
        self._watched[sends] = on_stall
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.tick, self._check, loop)

    def unwatch(self, sends: SendWatch) -> None:
        self._watched.pop(sends, None)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        for sends, on_stall in list(self._watched.items()):
            if sends.stalled():
                del self._watched[sends]
                on_stall()
        self._timer = loop.call_later(self.tick, self._check, loop) if self._watched else None


class SendWatch:
    """The sends of one answer: ``begun`` is counted before each and ``done`` after it."""

    __slots__ = ("_seen", "_ticks", "begun", "done", "watches")

    def __init__(self, watches: SendWatches) -> None:
        self.watches = watches
        self.begun = 0
        self.done = 0
        self._seen = 0
        self._ticks = 0

    def stalled(self) -> bool:
        """Called once a tick: whether one send has been waiting for ``timeout`` or more. The
        send was first seen waiting at a tick, so it began before that one."""
        if self.begun == self.done:
            self._ticks = 0
            return False
        if self.begun != self._seen:
            self._seen = self.begun
            self._ticks = 0
            return False
        self._ticks += 1
        return self._ticks >= self.watches.ticks_to_stall


def cancellable(send: Send) -> Send:
    """``send``, made such that a cancellation ends the wait for it (see the docstring)."""
    if sniffio.current_async_library() == "asyncio":
        return send

    async def detached(message: Message) -> None:
        done = trio.Event()
        failed: list[Exception] = []

        async def run() -> None:
            try:
                await send(message)
            except Exception as exc:  # raised in the request's task below, as a send would
                failed.append(exc)
            finally:
                done.set()

        trio.lowlevel.spawn_system_task(run)
        await done.wait()
        if failed:
            raise failed[0]

    return detached


class ClientWatch:
    """Wraps ``receive`` for one request; ``run`` races a wait against a disconnect (and, given
    a ``SendWatch``, against a client that stopped reading)."""

    __slots__ = ("_kept", "_receive", "disconnected", "stalled")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._kept: list[Message] = []
        self.disconnected = False
        self.stalled = False

    async def receive(self) -> Message:
        if self._kept:
            return self._kept.pop(0)
        return await self._receive()

    async def run(self, wait: Callable[[], Awaitable[T]],
                  sends: SendWatch | None = None) -> tuple[bool, T | None]:
        """Run ``wait``; ``(True, result)``, or ``(False, None)`` if the client left first
        (``disconnected``) or a send of ``sends`` stalled (``stalled``).

        ``wait`` must undo its own effect if it is cancelled after it succeeded (for a
        semaphore: release what it acquired); see ModelConcurrencyLimit.
        """
        if self.disconnected:
            return False, None
        if sniffio.current_async_library() == "asyncio":
            return await self._run_asyncio(wait, sends)
        return await self._run_task_group(wait, sends)

    def _stall(self, scope: anyio.CancelScope) -> None:
        self.stalled = True
        scope.cancel()

    async def _watch(self, scope: anyio.CancelScope) -> None:
        while True:
            message = await self._receive()
            self._kept.append(message)
            if message["type"] == "http.disconnect":
                self.disconnected = True
                scope.cancel()
                return

    async def _run_asyncio(self, wait: Callable[[], Awaitable[T]],
                           sends: SendWatch | None) -> tuple[bool, T | None]:
        # The same race as _run_task_group, at a fraction of its cost (a request runs this
        # once; an anyio task group costs ~100 us here, mostly in cancelling it): the watcher
        # is a plain task, cancelled when the wait ends, and the send watch is one of those the
        # shared timer looks at. A failure of the watcher cancels the wait and is raised, as a
        # task group would.
        with anyio.CancelScope() as scope:
            watcher = asyncio.get_running_loop().create_task(self._watch(scope))
            watcher.add_done_callback(lambda task: task.cancelled() or task.exception() is None
                                      or scope.cancel())
            if sends is not None:
                sends.watches.watch(sends, lambda: self._stall(scope))
            try:
                result = await wait()
            finally:
                watcher.cancel()
                if sends is not None:
                    sends.watches.unwatch(sends)
            return True, result
        if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
            raise watcher.exception()  # type: ignore[misc]
        return False, None

    async def _tick(self, sends: SendWatch, scope: anyio.CancelScope) -> None:
        while True:
            await anyio.sleep(sends.watches.tick)
            if sends.stalled():
                self._stall(scope)
                return

    async def _run_task_group(self, wait: Callable[[], Awaitable[T]],
                              sends: SendWatch | None) -> tuple[bool, T | None]:
        result: list[T] = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch, tg.cancel_scope)
                if sends is not None:
                    tg.start_soon(self._tick, sends, tg.cancel_scope)
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
