"""What has gone to the client so far, seen by every layer through one wrapper of ``send``.

Several layers must know whether the response started (the retry layer may not retry after
it; the draining layer answers 503 or ends an SSE stream; the request context logs the status,
the first byte and the bytes sent). The first of them to call ``progress()`` wraps ``send`` and
leaves the tracker (``kernel.context.ResponseProgress``) in the request's state; the layers
inside it get the same tracker and keep the ``send`` they were given, so each chunk passes one
wrapper however many layers look at it. A layer run alone wraps ``send`` itself.
"""

from __future__ import annotations

import time

from kernel.context import STATE, RequestState, ResponseProgress
from kernel.types import Message, Scope, Send

# Marks the messages of the loading feedback (``middleware.feedback``): its 200 and comments are
# no answer of the model's, so they set no first byte.
FEEDBACK = "vllm_gateway.feedback"


def progress(scope: Scope, send: Send) -> tuple[ResponseProgress, Send]:
    """The request's tracker, and the ``send`` to use: wrapped only where none tracks yet."""
    state: RequestState = scope[STATE]
    tracker = state.progress
    if tracker is not None:
        return tracker, send
    tracker = state.progress = ResponseProgress()

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
