"""The live stream of the admin API (``GET /admin/events``): the pool's state and the requests
as they end, as server-sent events, for the dashboard.

Publishing sits on the request path: with nobody subscribed it costs one attribute read. What
one subscriber holds is bounded however fast events come and however slowly it reads:

- State is coalesced: a change only marks the subscriber stale, and its writer sends one fresh
  snapshot for any number of changes, at most every ``COALESCE`` seconds (and every ``REFRESH``
  seconds without a change: last use and NVML's memory figures change without an event). The
  streams share the snapshot: it is built once for all that owe one at about the same time.
- Request summaries wait per subscriber, up to ``admin.events_buffer``; beyond it the oldest is
  dropped, and the next batch says how many were.
- A write that takes longer than ``admin.events_send_timeout`` ends the stream, and at most
  ``admin.events_streams`` are open at once (429 beyond).

Events: ``state`` (the snapshot), ``requests`` (``{"dropped": N, "requests": [...]}``, oldest
first) and, with ``[cluster]``, ``cluster`` (``{"time", "event", "member", ...}``: a member
joined or lost, an owner elected or stepped down, a dead member's slots reclaimed), each one
JSON line. The streams end when
the gateway winds down.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import structlog

from kernel.config import AdminSettings
from kernel.errors import GatewayError, unavailable
from kernel.types import Receive, Scope, Send

log = structlog.get_logger("gateway.events")

# Seconds: a burst of changes becomes one snapshot, and an idle stream still hears every
# REFRESH (which also keeps proxies in between from closing it).
COALESCE = 0.05
REFRESH = 2.0
# The gateway's own routes: probes, scrapes and the operator are not the clients' requests.
OWN_PATHS = frozenset({"/health", "/ready", "/metrics"})
HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
           (b"cache-control", b"no-store"), (b"x-accel-buffering", b"no")]


def sse(event: str, data: bytes) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def error_code(error: BaseException | None, status: int, body: bytes | None) -> str | None:
    """What went wrong, in a word: the code of the exception that ended the request, else the
    one in the body of an error status: the gateway's ``code``, or vLLM's ``type`` (its code is
    the status again)."""
    if error is not None:
        return error.code if isinstance(error, GatewayError) else type(error).__name__
    if status < 400 or not body:
        return None
    try:
        detail = json.loads(body)["error"]
        code = detail.get("code")
        word = code if isinstance(code, str) and code else detail.get("type")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return str(word) if word else None


class Subscriber:
    """One stream's backlog: a stale mark for the state, and the newest request summaries."""

    __slots__ = ("_wake", "dropped", "notices", "requests", "sending_since", "stale")

    def __init__(self, buffer: int) -> None:
        self.requests: deque[bytes] = deque(maxlen=buffer)
        # The cluster's events (rare: members and owners coming and going), newest kept.
        self.notices: deque[bytes] = deque(maxlen=buffer)
        self.dropped = 0
        self.stale = True
        # When the write in progress began (the event loop's clock); None between writes.
        self.sending_since: float | None = None
        self._wake = anyio.Event()

    def wake(self) -> None:
        self._wake.set()

    def push(self, summary: bytes) -> None:
        if len(self.requests) == self.requests.maxlen:
            self.dropped += 1
        self.requests.append(summary)
        self.stale = True
        self._wake.set()

    async def wait(self, refresh: float) -> None:
        """Until something is pushed or marked, or ``refresh`` seconds (then the state is owed)."""
        with anyio.move_on_after(refresh) as idle:
            await self._wake.wait()
        self._wake = anyio.Event()
        if idle.cancelled_caught:
            self.stale = True

    def notify(self, notice: bytes) -> None:
        self.notices.append(notice)
        self._wake.set()

    def take(self) -> bytes | None:
        """The waiting cluster events, each a ``cluster`` event, and the waiting summaries as
        one ``requests`` event, if there are any."""
        notices = b"".join(sse("cluster", notice) for notice in self.notices)
        self.notices.clear()
        if not self.requests and not self.dropped:
            return notices or None
        body = b'{"dropped": %d, "requests": [%s]}' % (self.dropped, b", ".join(self.requests))
        self.requests.clear()
        self.dropped = 0
        return notices + sse("requests", body)


class EventHub:
    def __init__(self, *, buffer: int = 256, streams: int = 8,
                 send_timeout: float = 30.0) -> None:
        self.buffer = buffer
        self.streams = streams
        self.send_timeout = send_timeout
        # Read on every request: True while a stream is open.
        self.listening = False
        self.closed = False
        self._subscribers: set[Subscriber] = set()
        # The last ``state`` event: (changes so far, when built, the event); the streams that
        # owe a snapshot at about the same time share one.
        self._changes = 0
        self._state: tuple[int, float, bytes] | None = None

    @classmethod
    def from_settings(cls, admin: AdminSettings) -> EventHub:
        return cls(buffer=admin.events_buffer, streams=admin.events_streams,
                   send_timeout=admin.events_send_timeout)

    def changed(self) -> None:
        """Something in the state changed: every stream owes a snapshot."""
        self._changes += 1
        for subscriber in self._subscribers:
            subscriber.stale = True
            subscriber.wake()

    def request_ended(self, scope: Scope, **summary: Any) -> None:
        """Tell the streams about a client's request that has ended (encoded once for all)."""
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path in OWN_PATHS or path.startswith("/admin/"):
            return
        data = json.dumps({"time": round(time.time(), 3), "path": path, **summary}).encode()
        for subscriber in self._subscribers:
            subscriber.push(data)

    def notice(self, event: str, fields: dict[str, Any]) -> None:
        """Tell the streams about an event of the cluster (``member joined``, ``member lost``,
        ``owner elected``, ``owner stepped down``, ``slots reclaimed``); the state changed with
        it."""
        data = json.dumps({"time": round(time.time(), 3), "event": event, **fields}).encode()
        for subscriber in self._subscribers:
            subscriber.notify(data)
        self.changed()

    def close(self) -> None:
        """End every stream (the gateway winds down); refuse new ones."""
        self.closed = True
        for subscriber in self._subscribers:
            subscriber.wake()

    @contextmanager
    def subscribe(self) -> Iterator[Subscriber]:
        if self.closed:
            raise unavailable("The gateway is shutting down.", code="shutting_down")
        if len(self._subscribers) >= self.streams:
            raise GatewayError(429, f"{self.streams} event streams are open already "
                               "(admin.events_streams).", type="rate_limit_error",
                               code="too_many_event_streams", retry_after=REFRESH)
        subscriber = Subscriber(self.buffer)
        self._subscribers.add(subscriber)
        self.listening = True
        try:
            yield subscriber
        finally:
            self._leave(subscriber)

    def _leave(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)
        self.listening = bool(self._subscribers)

    async def stream(self, receive: Receive, send: Send,
                     snapshot: Callable[[], dict[str, Any]]) -> None:
        """Serve one subscriber until it goes, the gateway winds down or a write is stuck."""
        with self.subscribe() as subscriber:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
                tg.start_soon(self._end_if_stuck, subscriber, tg.cancel_scope)
                await self._write(subscriber, send, snapshot)
                tg.cancel_scope.cancel()

    async def _write(self, subscriber: Subscriber, send: Send,
                     snapshot: Callable[[], dict[str, Any]]) -> None:
        while not self.closed:
            chunk = b""
            if subscriber.stale:
                subscriber.stale = False
                chunk = self._state_event(snapshot)
            chunk += subscriber.take() or b""
            if chunk and not await self._send(subscriber, send, chunk, more=True):
                return
            await subscriber.wait(REFRESH)
            await anyio.sleep(COALESCE)
        await self._send(subscriber, send, b"", more=False)

    def _state_event(self, snapshot: Callable[[], dict[str, Any]]) -> bytes:
        """The ``state`` event: built anew after a change or once ``COALESCE`` has passed (the
        figures that change without an event), else the one just built for another stream."""
        now = anyio.current_time()
        state = self._state
        if state is None or state[0] != self._changes or now - state[1] >= COALESCE:
            state = self._state = (self._changes, now,
                                   sse("state", json.dumps(snapshot()).encode()))
        return state[2]

    async def _send(self, subscriber: Subscriber, send: Send, chunk: bytes, *,
                    more: bool) -> bool:
        """Whether the chunk went out: False when the subscriber is gone."""
        subscriber.sending_since = anyio.current_time()
        try:
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
        except OSError:  # the subscriber is gone (servers that raise)
            return False
        finally:
            subscriber.sending_since = None
        return True

    async def _end_if_stuck(self, subscriber: Subscriber, stream: anyio.CancelScope) -> None:
        """End the stream once a write has taken ``send_timeout``. Hypercorn's trio worker
        shields its socket writes from cancellation: there the subscriber leaves the hub at
        once (it gets nothing more) and its task ends when the write does."""
        while True:
            await anyio.sleep(self.send_timeout / 4)
            since = subscriber.sending_since
            if since is not None and anyio.current_time() - since >= self.send_timeout:
                log.warning("event stream ended: the subscriber stopped reading",
                            send_timeout=self.send_timeout)
                self._leave(subscriber)
                stream.cancel()
                return


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
