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


# The gateway's own keys go under this one key of ``scope["state"]``: an application that mounts
# the gateway may keep its own ``state["model"]`` (its lifespan state is copied into each
# request's ``scope["state"]``).
STATE_KEY = "vllm_gateway"


def request_state(scope: Scope) -> dict[str, Any]:
    """The per-request state dict that the layers share (``scope["state"]["vllm_gateway"]``)."""
    shared = scope.get("state")
    if shared is None:
        shared = scope["state"] = {}
    state = shared.get(STATE_KEY)
    if state is None:
        state = shared[STATE_KEY] = {}
    return state
