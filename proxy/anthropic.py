"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``): the gateway's own
errors in Anthropic's shape.

vLLM serves these paths in Anthropic's shape, its errors included, and the gateway forwards
them as it forwards the OpenAI paths: routed by the JSON ``model``, streamed as they come, each
``event:`` line intact. What must change is the shape of the gateway's own errors, so that an
Anthropic client raises its own exception types: this layer, outermost on these paths, says
each of them (a missing key, an unknown model, a full queue, a backend down, and the error
event that ends a stream the gateway cuts short) as ``{"type": "error", "error": {"type",
"message"}}``, with the same status and the same ``Retry-After`` and ``x-should-retry``
headers, which the Anthropic clients retry by as the OpenAI ones do. A backend's answers, its
errors too, pass as sent; the gateway's are told apart by the error they carry
(``kernel.errors.ERROR_KEY``).
"""

from __future__ import annotations

import json

from kernel.errors import ERROR_KEY, GatewayError, internal_error, standalone_sse_event
from kernel.types import ASGIApp, Message, Receive, Scope, Send
from middleware.progress import progress

PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
# Anthropic's error types by status; another 5xx is an ``api_error``, another 4xx an
# ``invalid_request_error``.
TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    return TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(error: GatewayError) -> bytes:
    return json.dumps({"type": "error", "error": {"type": error_type(error.status),
                                                  "message": error.message}}).encode()


def _reshaped(message: Message, error: GatewayError, plain: bool) -> Message:
    body = error_body(error)
    if message["type"] == "http.response.start":
        headers = [(k, v) for k, v in message["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        return {**message, "headers": headers}
    if not plain:  # the last event of a stream that had started
        body = standalone_sse_event(body, event=b"error")
    return {**message, "body": body}


class AnthropicErrors:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response, send = progress(scope, send)
        plain = False  # the response is one of the gateway's errors, not a backend's answer

        async def anthropic_send(message: Message) -> None:
            nonlocal plain
            error = message.get(ERROR_KEY)
            if error is not None:
                if message["type"] == "http.response.start":
                    plain = True
                message = _reshaped(message, error, plain)
            await send(message)

        try:
            await self.app(scope, receive, anthropic_send)
        except GatewayError as error:
            if response.started:
                raise
            await error.send(anthropic_send)
        except Exception:
            if not response.started:
                await internal_error().send(anthropic_send)
            raise
