"""Loading feedback: a stream that waits for its model or a slot hears what it waits for.

A request with ``"stream": true`` that has not begun its answer after ``stream_keepalive``
seconds, because it waits for a slot of its model or for the model itself (starting, or
stopping to make room) or for its LoRA adapter's load, gets its 200 and SSE headers then, and
an SSE comment every ``stream_keepalive`` seconds (``: waiting for model 'x': starting, 12 s``,
``: waiting for a slot of model 'x': number 3 in the queue, 4 s``, ``: waiting for adapter 'a'
of model 'x': loading, 2 s``). SSE clients ignore comments, and the bytes
keep proxies and clients from timing out while a model loads.

The trade-off: once feedback went out, the status is committed. The answer's own start is then
swallowed (its SSE events follow the comments), and what would have been an error status (a
start that failed, a queue timeout, a backend's 4xx) arrives as one SSE error event in the
OpenAI shape, standing alone after a blank line, and the stream ends. A request that does not
wait is not touched: its messages pass as they are.

The layer sits around the waiting layers (queue, slots, retry, lease). One ticker task per
gateway looks at the streams that have not started every quarter of ``stream_keepalive``;
only a stream that waits gets a task of its own, which sends the comments. The two never send
at once: the comments and the answer's first messages share a lock, and the comment task is
ended (and waited for) before the request leaves this layer. The model's state is read from
the pool, and a stream's place in the queue from the accounting (``kernel.accounting``), never
changed.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import structlog
from anyio.abc import TaskGroup

from backends.pool import BackendPool, ModelState
from kernel.accounting import Accounting
from kernel.config import Config
from kernel.context import STATE, RequestState
from kernel.errors import ERROR_KEY, GatewayError, internal_error, standalone_sse_event
from kernel.types import ASGIApp, Message, Receive, Scope, Send, is_sse

from .progress import FEEDBACK

log = structlog.get_logger("gateway.feedback")

HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
           (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
# Ticks per stream_keepalive: feedback begins within a quarter of it after it is due.
TICKS = 4
# What is kept of an error answer that arrives after feedback began, to pass on its message.
ERROR_BODY_MAX = 64 * 1024


def _error_message(answer: bytes, status: int, model: str) -> Message:
    """The last message for an error answer: its envelope as one event (on one line; named
    ``error`` if it is Anthropic's), or for an answer that is no envelope, the gateway's own
    error (which the Anthropic layer reshapes on its paths)."""
    try:
        envelope = json.loads(answer)
    except (ValueError, RecursionError):
        envelope = None
    if isinstance(envelope, dict) and isinstance(envelope.get("error"), dict):
        event = b"error" if envelope.get("type") == "error" else b""
        data = json.dumps(envelope, separators=(",", ":")).encode()
        return {"type": "http.response.body", "more_body": False,
                "body": standalone_sse_event(data, event=event)}
    return GatewayError(502, f"The backend of model '{model}' answered the stream with status "
                        f"{status}.", type="upstream_error", code="upstream_failed").sse_message()


def _one_line(name: str) -> str:
    return name.replace("\r", " ").replace("\n", " ")


class _Stream:
    """One streaming request: whether feedback began, and the ``send`` its answer goes
    through."""

    __slots__ = ("_done", "_error", "_feeding", "_lock", "_scope", "_send", "_status",
                 "answered", "began", "due", "fed", "model", "shown", "state", "stopped")

    def __init__(self, send: Send, state: RequestState, model: str, began: float,
                 due: float) -> None:
        self._send = send
        self.state = state
        self.model = model
        self.began = began
        self.due = due
        self.answered = False  # the inner app sent its first message
        self.fed = False  # feedback began: the comment task owns the start
        self.shown = False  # the feedback's 200 went out
        self.stopped = False  # no more comments
        self._lock: anyio.Lock | None = None
        self._scope: anyio.CancelScope | None = None
        self._done: anyio.Event | None = None
        self._feeding = False  # the comment task runs: it sets _done when it ends
        self._error: bytearray | None = None  # an error answer after feedback, being collected
        self._status = 0

    def send(self, message: Message) -> Awaitable[None]:
        # A plain function that hands back the next send's awaitable: a stream that did not
        # wait pays a call per message here, not a coroutine.
        if not self.fed:
            self.answered = True
            return self._send(message)
        if self.answered and self._error is None:
            return self._send(message)
        return self._answer_after_feedback(message)

    def begin(self, tg: TaskGroup, every: float, describe: Callable[[_Stream], bytes]) -> None:
        """Begin feedback: from here on the 200 and the comments are this object's to send."""
        self.fed = True
        self._lock = anyio.Lock()
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        tg.start_soon(self._feed, every, describe)

    async def _feed(self, every: float, describe: Callable[[_Stream], bytes]) -> None:
        assert self._lock is not None and self._scope is not None and self._done is not None
        self._feeding = True
        try:
            with self._scope:
                async with self._lock:
                    if self.answered or self.stopped:
                        return
                    await self._send({"type": "http.response.start", "status": 200,
                                      "headers": list(HEADERS), FEEDBACK: True})
                    self.shown = True
                while True:
                    async with self._lock:
                        if self.answered or self.stopped:
                            return
                        await self._send({"type": "http.response.body",
                                          "body": describe(self), "more_body": True,
                                          FEEDBACK: True})
                    await anyio.sleep(every)
        except OSError:
            return  # the client is gone; the request's own layers see it leave
        except Exception:
            # This task runs in the gateway's task group: what it raises would end the gateway.
            log.exception("loading feedback failed", model=self.model)
        finally:
            self._done.set()

    async def _answer_after_feedback(self, message: Message) -> None:
        assert self._lock is not None and self._scope is not None
        if not self.answered:  # the answer's start
            async with self._lock:
                self.answered = True
                self._scope.cancel()
            if not self.shown:  # feedback was due, but nothing went out: pass the answer on
                self.fed = False
                await self._send(message)
                return
            if not is_sse(message):
                self._error = bytearray()
                self._status = message["status"]
            return
        gateway_error = message.get(ERROR_KEY)
        if gateway_error is not None:  # the gateway's own (a queue timeout): sent as itself
            if not message.get("more_body", False):
                await self._send(gateway_error.sse_message())
            return
        error = self._error
        assert error is not None
        # Kept up to the bound: an envelope cut there does not parse, and gets a generic event.
        error += message.get("body", b"")[:ERROR_BODY_MAX - len(error)]
        if not message.get("more_body", False):
            await self._send(_error_message(bytes(error), self._status, self.model))

    async def fail(self, error: GatewayError) -> None:
        """End a stream whose feedback went out with the error its wait ended in."""
        log.warning("stream ended with an error after loading feedback", model=self.model,
                    code=error.code, error=error.message)
        with contextlib.suppress(OSError):  # the client is gone as well
            await self._send(error.sse_message())

    async def stop(self) -> None:
        """No more comments: end the comment task and wait until it has (even if cancelled),
        so that nothing else sends while it does."""
        self.stopped = True
        if self._scope is not None and self._done is not None:
            self._scope.cancel()
            if self._feeding:
                with anyio.CancelScope(shield=True):
                    await self._done.wait()


class StreamFeedback:
    def __init__(self, app: ASGIApp, *, config: Config, pool: BackendPool,
                 accounting: Accounting) -> None:
        self.app = app
        self.pool = pool
        self.accounting = accounting
        self.every = config.gateway.stream_keepalive
        # Streams that have not begun their answer, in the order they came.
        self._pending: dict[int, _Stream] = {}
        self._tg: TaskGroup | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[StreamFeedback]:
        """Run the ticker; without it (the layer not running) no stream gets feedback."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._tick)
            try:
                yield self
            finally:
                self._tg = None
                tg.cancel_scope.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: RequestState = scope[STATE]
        if state.stream and self._tg is not None:
            await self._stream(scope, receive, send, state)
        else:
            await self.app(scope, receive, send)

    async def _stream(self, scope: Scope, receive: Receive, send: Send,
                      state: RequestState) -> None:
        now = time.monotonic()
        stream = _Stream(send, state, state.model.name, now, now + self.every)
        key = id(stream)
        self._pending[key] = stream
        try:
            await self.app(scope, receive, stream.send)
        except GatewayError as exc:
            if not await self._failed_after_feedback(stream):
                raise
            await stream.fail(exc)
        except Exception:
            if await self._failed_after_feedback(stream):
                await stream.fail(internal_error())
            raise
        finally:
            self._pending.pop(key, None)
            if stream.fed:
                await stream.stop()

    @staticmethod
    async def _failed_after_feedback(stream: _Stream) -> bool:
        """Whether a failure is the stream's to tell (feedback went out, the answer did not
        start); the comments are over either way."""
        if not stream.fed:
            return False
        await stream.stop()
        return stream.shown and not stream.answered

    async def _tick(self) -> None:
        while True:
            await anyio.sleep(self.every / TICKS)
            now = time.monotonic()
            tg = self._tg
            for key, stream in list(self._pending.items()):
                if stream.answered:
                    del self._pending[key]
                elif stream.due <= now:
                    if self._waits(stream) and tg is not None:
                        del self._pending[key]
                        stream.begin(tg, self.every, self._comment)
                    else:
                        # Forwarded, and the backend has not answered yet: not a wait for the
                        # model or a slot. Look again later (a retry may wait for a start).
                        stream.due = now + self.every

    def _waits(self, stream: _Stream) -> bool:
        return (stream.state.queue_wait is None or stream.state.adapter_loading
                or self.pool.state_of(stream.model) is not ModelState.READY)

    def _comment(self, stream: _Stream) -> bytes:
        model = _one_line(stream.model)
        seconds = round(time.monotonic() - stream.began)
        if stream.state.adapter_loading:
            what = f"adapter '{_one_line(stream.state.adapter or '')}' of model '{model}': loading"
        elif stream.state.queue_wait is not None:
            what = f"model '{model}': {self.pool.state_of(stream.model).value}"
        else:
            what = f"a slot of model '{model}': number {self._place(stream)} in the queue"
        return f": waiting for {what}, {seconds} s\n\n".encode()

    def _place(self, stream: _Stream) -> int:
        ticket = stream.state.ticket
        place = self.accounting.position(ticket) if ticket is not None else None
        # Not queued (yet, or any more: its wait just ended): behind all who are.
        return place or self.accounting.depth(stream.model) + 1
