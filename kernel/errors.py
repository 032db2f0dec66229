"""The OpenAI error envelope for every error the gateway itself produces.

A client reads ``{"error": {"message", "type", "param", "code"}}`` and the status; ``Retry-After``
says when trying again makes sense and ``x-should-retry: false`` says when it cannot help.
Internal details (addresses, tracebacks) never go here; they go to the log with the request id.

The messages that carry an error also carry the error itself under ``ERROR_KEY``, so that a
layer answering clients of another API (``proxy/anthropic.py``) can tell the gateway's own
errors from a backend's and say them in its clients' shape. Servers ignore the extra key.
"""

from __future__ import annotations

import json

from .context import STATE
from .types import Message, Scope, Send

ERROR_KEY = "vllm_gateway.error"


class GatewayError(Exception):
    """An error answered to the client in the OpenAI shape, raised by any layer."""

    def __init__(self, status: int, message: str, *, type: str, code: str,
                 param: str | None = None, retry_after: float | None = None,
                 should_retry: bool | None = None,
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.extra_headers = headers
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.should_retry = should_retry

    def fresh(self) -> GatewayError:
        """The same error as a new object, for another request to raise: one object raised by
        many requests would pile all their tracebacks onto itself."""
        return GatewayError(self.status, self.message, type=self.type, code=self.code,
                            param=self.param, retry_after=self.retry_after,
                            should_retry=self.should_retry, headers=self.extra_headers)

    def body(self) -> bytes:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(max(1, round(self.retry_after))).encode()))
        if self.should_retry is not None:
            headers.append((b"x-should-retry", b"true" if self.should_retry else b"false"))
        headers.extend(self.extra_headers)
        return headers

    async def answer(self, scope: Scope, send: Send) -> None:
        """Send this error as the response, and leave its code for the access line."""
        scope[STATE].error = self.code
        await self.send(send)

    async def send(self, send: Send) -> None:
        body = self.body()
        headers = self.headers()
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers,
                    ERROR_KEY: self})
        await send({"type": "http.response.body", "body": body, ERROR_KEY: self})

    def sse_message(self) -> Message:
        """What a stream that already started gets instead of a status: the last body message,
        one SSE error event that stands alone (``standalone_sse_event``)."""
        return {"type": "http.response.body", "body": standalone_sse_event(self.body()),
                "more_body": False, ERROR_KEY: self}


def standalone_sse_event(data: bytes, *, event: bytes = b"") -> bytes:
    """An SSE error event that stands alone: a blank line first, so that it cannot glue to a
    partial event before it (a stream cut mid-event), and ``data:`` on one line; ``event``
    names the event (Anthropic's ``error``)."""
    name = b"event: " + event + b"\n" if event else b""
    return b"\n\n" + name + b"data: " + data + b"\n\n"


def error_body(message: str, *, type: str, code: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": param,
                                 "code": code}}).encode()


def bad_request(message: str, *, code: str = "invalid_request", param: str | None = None,
                status: int = 400) -> GatewayError:
    return GatewayError(status, message, type="invalid_request_error", code=code, param=param,
                        should_retry=False)


def not_found(message: str, *, code: str = "not_found", param: str | None = None) -> GatewayError:
    return GatewayError(404, message, type="invalid_request_error", code=code, param=param,
                        should_retry=False)


def internal_error() -> GatewayError:
    """What the client gets when a layer failed in a way nobody foresaw (the log has more)."""
    return GatewayError(500, "The gateway failed to handle the request.", type="internal_error",
                        code="internal_error")


def unavailable(message: str, *, code: str, retry_after: float | None = None,
                status: int = 503, should_retry: bool | None = None) -> GatewayError:
    return GatewayError(status, message, type="service_unavailable_error", code=code,
                        retry_after=retry_after, should_retry=should_retry)

