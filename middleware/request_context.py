"""Request context: the request's state, the request id, the log context, the access log line,
and the last word on errors.

The first layer: it makes the request's typed state (``kernel.context.RequestState``) that every
later layer reaches as ``scope[STATE]``, and reads it back for the access line.

The request id comes from ``x-request-id`` (when it is sane) or is made here, goes back on the
response and to the backend, and is bound into structlog's context for every line logged while
the request runs. A ``GatewayError`` raised by an inner layer is answered here in the OpenAI
shape if nothing went out yet; any other exception gets a 500 the same way and is re-raised so
the server logs it and, if the response had started, cuts the connection.

The access line says what happened to the request: model (and the LoRA adapter it named),
tenant (its name: a key is never logged), status, the wait for a slot, the time to the first
byte and to the end, bytes sent, retries, whether the client went away before the answer was
complete, and the error: the exception, or the code of the gateway's own error answer
(``GatewayError.answer``), or of the way the request ended (``send_timeout`` for a client that
stopped reading). The model is the one the client asked for when it is not configured;
``model_default`` says that the request named none and went to the default model.
For a request that got a slot, the time to the first byte and the duration are observed per
model as well, and while the admin API's event stream has subscribers, the request's start and
a summary of its end go to them (``telemetry.events``).
"""

from __future__ import annotations

import os
import time

import structlog

from kernel.context import STATE, RequestState
from kernel.errors import GatewayError, internal_error
from kernel.types import ASGIApp, Message, Receive, Scope, Send, header
from telemetry.events import EventHub, error_code
from telemetry.metrics import GatewayMetrics

from .progress import progress

access_log = structlog.get_logger("gateway.access")

MAX_ID_LENGTH = 128


def _request_id(scope: Scope) -> str:
    value = header(scope, b"x-request-id")
    if value is not None:
        text = value.decode("latin-1")
        if 0 < len(text) <= MAX_ID_LENGTH and text.isascii() and text.isprintable():
            return text
    return os.urandom(12).hex()


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


class RequestContext:
    def __init__(self, app: ASGIApp, *, metrics: GatewayMetrics,
                 events: EventHub | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.events = events or EventHub()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        request_id = _request_id(scope)
        state = scope.get(STATE)
        if state is None:
            scope[STATE] = state = RequestState(request_id)
        else:  # made by the tracing layer, the one layer outside this one
            state.request_id = request_id
        response, send = progress(scope, send)
        response.extra_headers.append((b"x-request-id", request_id.encode()))
        left_early = False

        async def receive_watched() -> Message:
            nonlocal left_early
            message = await receive()
            if message["type"] == "http.disconnect" and not response.complete:
                left_early = True
            return message

        structlog.contextvars.bind_contextvars(request_id=request_id)
        if self.events.listening:
            self.events.changed()
        error = None
        try:
            await self.app(scope, receive_watched, send)
        except GatewayError as exc:
            if response.started:
                error = exc
                raise
            await exc.answer(scope, send)
        except Exception as exc:
            error = exc
            if not response.started:
                await internal_error().send(send)
            raise
        finally:
            ended = time.perf_counter()
            first_byte = response.first_byte
            status = response.status
            model = state.model
            # A name the client made up is logged, never a metric label (unbounded).
            name = model.name if model is not None else "-"
            self.metrics.answered(name, str(status) if status else "none").inc()
            queue_wait = state.queue_wait
            if queue_wait is not None:
                if first_byte:
                    self.metrics.first_byte(name).observe(first_byte - began)
                self.metrics.request_duration(name).observe(ended - began)
            queue_wait_ms = _ms(queue_wait) if queue_wait is not None else None
            ttfb_ms = _ms(first_byte - began) if first_byte else None
            duration_ms = _ms(ended - began)
            client_disconnected = left_early or response.send_failed
            access_log.info(
                "request", method=scope["method"], path=scope["path"],
                model=name if model is not None else state.requested_model or "-",
                adapter=state.adapter, model_default=state.model_default,
                tenant=state.tenant.name if state.tenant is not None else None,
                replica=state.replica, route=state.route, status=status, bytes=response.sent,
                retries=state.retries,
                queue_wait_ms=queue_wait_ms, ttfb_ms=ttfb_ms, duration_ms=duration_ms,
                client_disconnected=client_disconnected,
                client=scope["client"][0] if scope.get("client") else None,
                error=repr(error) if error else state.error)
            if self.events.listening:
                self.events.request_ended(
                    scope, request_id=request_id, model=name, status=status,
                    duration_ms=duration_ms, ttfb_ms=ttfb_ms, queue_wait_ms=queue_wait_ms,
                    error=error_code(error, status, response.error_body) or state.error,
                    client_disconnected=client_disconnected)
            structlog.contextvars.unbind_contextvars("request_id")
