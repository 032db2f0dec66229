"""What has gone to the client so far, seen by every layer through one wrapper of ``send``.

Several layers must know whether the response started (the retry layer may not retry after
it; the draining layer answers 503 or ends an SSE stream; the request context logs the status,
the first byte and the bytes sent). The first of them to call ``progress()`` wraps ``send`` and
leaves the tracker in ``scope["state"]``; the layers inside it get the same tracker and keep the
``send`` they were given, so each chunk passes one wrapper however many layers look at it. A
layer run alone wraps ``send`` itself.
"""

from __future__ import annotations

import time

from proxy.types import Message, Scope, Send, request_state


class ResponseProgress:
    __slots__ = ("_send", "complete", "extra_headers", "first_byte", "send_failed", "sent",
                 "start")

    def __init__(self, send: Send) -> None:
        self._send = send
        # The ``http.response.start`` message once it went out, with the headers added here.
        self.start: Message | None = None
        # Headers added to the response's own (the request id).
        self.extra_headers: list[tuple[bytes, bytes]] = []
        self.first_byte = 0.0  # perf_counter of the first body message
        self.sent = 0
        self.complete = False
        # The server raised on a send: the client is gone (servers that raise rather than drop).
        self.send_failed = False

    @property
    def started(self) -> bool:
        return self.start is not None

    @property
    def status(self) -> int:
        return self.start["status"] if self.start is not None else 0

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            if self.extra_headers:
                message["headers"] = [*message.get("headers", ()), *self.extra_headers]
            self.start = message
        else:
            if not self.first_byte:
                self.first_byte = time.perf_counter()
            body = message.get("body")
            if body:
                self.sent += len(body)
            self.complete = not message.get("more_body", False)
        try:
            await self._send(message)
        except OSError:
            self.send_failed = True
            raise


def progress(scope: Scope, send: Send) -> tuple[ResponseProgress, Send]:
    """The request's tracker, and the ``send`` to use: wrapped only where none tracks yet."""
    state = request_state(scope)
    tracker = state.get("progress")
    if tracker is None:
        tracker = state["progress"] = ResponseProgress(send)
        return tracker, tracker.send
    return tracker, send
