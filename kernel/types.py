"""ASGI callable types and the helpers that read ASGI messages, shared by every layer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def header(scope: Scope, name: bytes) -> bytes | None:
    """The value of the request's first header called ``name`` (lower case), if any."""
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


SSE = b"text/event-stream"


def is_sse(start: Message) -> bool:
    """Whether an ``http.response.start`` begins a stream of server-sent events."""
    return any(key.lower() == b"content-type" and value.startswith(SSE)
               for key, value in start.get("headers", ()))

