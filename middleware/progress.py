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

from kernel.types import Message, Scope, Send, request_state

# Marks the messages of the loading feedback (``middleware.feedback``): its 200 and comments are
# no answer of the model's, so they set no first byte.
FEEDBACK = "vllm_gateway.feedback"


class ResponseProgress:
    """The record, kept in ``scope["state"]``. It holds no reference to the server's ``send``:
    the scope belongs to the server's stream object, and a reference back to it would make every
    request a reference cycle that only the garbage collector frees."""

    __slots__ = ("complete", "error_body", "extra_headers", "fed", "first_byte", "send_failed",
                 "sent", "start")

    def __init__(self) -> None:
        # The ``http.response.start`` message once it went out, with the headers added here.
        self.start: Message | None = None
        # Headers added to the response's own (the request id).
        self.extra_headers: list[tuple[bytes, bytes]] = []
        self.first_byte = 0.0  # perf_counter of the answer's first body message
        self.fed = False  # the start that went out is the loading feedback's
        self.sent = 0
        # The first body message of an error status (it holds the error's code).
        self.error_body: bytes | None = None
        self.complete = False
        # The server raised on a send: the client is gone (servers that raise rather than drop).
        self.send_failed = False

    @property
    def started(self) -> bool:
        return self.start is not None

    @property
    def answered(self) -> bool:
        """Whether some of the answer itself went out (not only the loading feedback)."""
        return self.start is not None and (not self.fed or bool(self.first_byte))

    @property
    def status(self) -> int:
        return self.start["status"] if self.start is not None else 0


def progress(scope: Scope, send: Send) -> tuple[ResponseProgress, Send]:
    """The request's tracker, and the ``send`` to use: wrapped only where none tracks yet."""
    state = request_state(scope)
    tracker = state.get("progress")
    if tracker is not None:
        return tracker, send
    tracker = state["progress"] = ResponseProgress()

    async def tracked(message: Message) -> None:
        if message["type"] == "http.response.start":
            if tracker.extra_headers:
                message["headers"] = [*message.get("headers", ()), *tracker.extra_headers]
            tracker.start = message
            tracker.fed = FEEDBACK in message
        else:
            if not tracker.first_byte and FEEDBACK not in message:
                tracker.first_byte = time.perf_counter()
                if tracker.status >= 400:
                    tracker.error_body = message.get("body")
            body = message.get("body")
            if body:
                tracker.sent += len(body)
            tracker.complete = not message.get("more_body", False)
        try:
            await send(message)
        except OSError:
            tracker.send_failed = True
            raise

    return tracker, tracked
