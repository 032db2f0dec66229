"""The gateway's traces: a span per request, with its queue wait, the model start or wake it
waited for, and each upstream call; the trace context goes to the model server with the call.

Three pieces, each added to the stack only when the gateway traces (``GatewayTracing``; off,
the stack has none of them and a request pays nothing):

- ``RequestSpans``, outermost: the request's span (a SERVER span, ``POST /v1/chat/completions``),
  continuing the trace of an incoming ``traceparent``, current while the request runs (every
  log line then carries ``trace_id``); at the end it holds the status, the model, the retries,
  the bytes sent and the error's code, and is an error for a 5xx or an exception.
- ``WaitSpans``, just inside the slot: ``queue wait``, made from the wait the slot layer
  measured when it was 1 ms or more (any wait is the request span's
  ``vllm_gateway.queue_wait_ms``); and it opens the request's wait for a server, which the first
  upstream call closes.
- ``TracedUpstream``, the upstream client the passthrough uses: an ``upstream`` CLIENT span per
  call (so per try), from sending to the answer's close, whose context the request carries to
  the model server in place of any the client sent; vLLM started with
  ``--otlp-traces-endpoint`` makes its spans children of it. When a start or a wake of the
  model ended while the request waited for its server, that wait is a ``model start`` or
  ``model wake`` span; a start that failed or found no room is one with the error.

The waits are spans with the times the layers measured, so that no other layer needs a hook.
Per-request state stays in the request's context (a context variable), never on the objects.
"""

from __future__ import annotations

import contextvars
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import anyio
import structlog
from opentelemetry import context, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, StatusCode

from backends.server import START_FAILED
from kernel.config import TelemetrySettings
from kernel.context import STATE, RequestState
from kernel.errors import GatewayError
from kernel.types import ASGIApp, Receive, Scope, Send
from relay.upstream import Answer, Upstream
from telemetry.events import error_code
from telemetry.tracing import incoming_context, tracer_provider, with_context

from .progress import ResponseProgress, progress

# The refusals of a request that waited for its model's server to come up.
START_REFUSALS = frozenset({START_FAILED, "no_capacity"})
# Seconds of a wait for a slot worth a span of its own; a shorter one (a slot taken at once) is
# only the request span's ``vllm_gateway.queue_wait_ms``: a span costs ~20 us to make and export.
QUEUE_SPAN_MIN = 0.001


class _ServerWait:
    """A request's wait for a server of its model, from the slot to its first upstream call."""

    __slots__ = ("began", "model", "over", "seen")

    def __init__(self, model: str, began: int, seen: tuple[int, int]) -> None:
        self.model = model
        self.began = began
        self.seen = seen  # the model's starts and wakes done when the wait began
        self.over = False


_server_wait: contextvars.ContextVar[_ServerWait | None] = contextvars.ContextVar(
    "vllm_gateway_server_wait", default=None)


class GatewayTracing:
    """The tracer, the count of each model's starts and wakes, and the pieces to stack."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("vllm-gateway")
        self.ready: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])

    @classmethod
    def from_settings(cls, settings: TelemetrySettings) -> GatewayTracing:
        return cls(tracer_provider(settings))

    def model_ready(self, model: str, *, woke: bool) -> None:
        """A start (or a wake) of the model ended with its server ready."""
        self.ready[model][woke] += 1

    def requests(self, app: ASGIApp, *, untraced: frozenset[str],
                 routes: frozenset[str]) -> RequestSpans:
        return RequestSpans(app, tracer=self.tracer, untraced=untraced, routes=routes)

    def waits(self, app: ASGIApp) -> WaitSpans:
        return WaitSpans(app, tracing=self)

    def upstream(self, upstream: Upstream) -> TracedUpstream:
        return TracedUpstream(upstream, tracing=self)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """At the end, the spans still buffered are exported (within the exporter's timeout)."""
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.provider.shutdown)


class RequestSpans:
    def __init__(self, app: ASGIApp, *, tracer: trace.Tracer, untraced: frozenset[str],
                 routes: frozenset[str]) -> None:
        self.app = app
        self.tracer = tracer
        self.untraced = untraced  # the probes and the scrapes
        self.routes = routes  # the paths that name their route (others: the method alone)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if path in self.untraced:
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        route = path in self.routes
        attributes = {"http.request.method": method, "url.path": path,
                      "url.scheme": scope["scheme"]}
        if route:
            attributes["http.route"] = path
        if scope.get("client"):
            attributes["client.address"] = scope["client"][0]
        parent = incoming_context(scope)
        span = self.tracer.start_span(f"{method} {path}" if route else method, context=parent,
                                      kind=SpanKind.SERVER, attributes=attributes)
        token = context.attach(trace.set_span_in_context(span, parent))
        structlog.contextvars.bind_contextvars(
            trace_id=trace.format_trace_id(span.get_span_context().trace_id))
        # The request's state, which the request context inside fills in.
        scope[STATE] = state = RequestState()
        response, send = progress(scope, send)
        error: Exception | None = None
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            error = exc
            raise
        finally:
            structlog.contextvars.unbind_contextvars("trace_id")
            context.detach(token)
            if span.is_recording():
                _ended(span, state, response, error)
            span.end()


def _ended(span: trace.Span, state: RequestState, response: ResponseProgress,
           error: Exception | None) -> None:
    """What the request's span holds once it is over."""
    status = response.status
    model = state.model
    attributes = {"http.response.body.size": response.sent,
                  "vllm_gateway.retries": state.retries}
    # The model configured, else the name the client asked for (a 404), else none (a GET).
    name = model.name if model else state.requested_model
    if name:
        attributes["gen_ai.request.model"] = name
    if status:
        attributes["http.response.status_code"] = status
    if state.request_id is not None:
        attributes["vllm_gateway.request_id"] = state.request_id
    if state.replica is not None:
        attributes["vllm_gateway.replica"] = state.replica
    if state.queue_wait is not None:
        attributes["vllm_gateway.queue_wait_ms"] = round(state.queue_wait * 1000, 3)
    code = error_code(error, status, response.error_body) or state.error
    if code:
        attributes["error.type"] = code
    span.set_attributes(attributes)
    if error is not None:
        span.record_exception(error)
    if error is not None or status >= 500:
        span.set_status(StatusCode.ERROR, code)


class WaitSpans:
    def __init__(self, app: ASGIApp, *, tracing: GatewayTracing) -> None:
        self.app = app
        self.tracer = tracing.tracer
        self.ready = tracing.ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: RequestState = scope[STATE]
        now = time.time_ns()
        queued = state.queue_wait
        if queued is not None and queued >= QUEUE_SPAN_MIN:
            self.tracer.start_span("queue wait", start_time=now - int(queued * 1e9)).end(now)
        model = state.model.name  # type: ignore[union-attr]  # admitted: a model is named
        wait = _ServerWait(model, now, tuple(self.ready[model]))
        token = _server_wait.set(wait)
        try:
            await self.app(scope, receive, send)
        except GatewayError as exc:
            if not wait.over and exc.code in START_REFUSALS:
                span = self.tracer.start_span("model start", start_time=wait.began)
                span.set_attribute("error.type", exc.code)
                span.set_status(StatusCode.ERROR, exc.code)
                span.end()
            raise
        finally:
            _server_wait.reset(token)


class TracedUpstream:
    """The upstream client with a span per call and the trace context on the request."""

    def __init__(self, upstream: Upstream, *, tracing: GatewayTracing) -> None:
        self.upstream = upstream
        self.tracer = tracing.tracer
        self.ready = tracing.ready

    @property
    def broken(self) -> tuple[type[BaseException], ...]:
        return self.upstream.broken

    def _server_waited(self) -> None:
        """The request's wait for a server ends here; a span if a start or wake ended in it."""
        wait = _server_wait.get()
        if wait is None or wait.over:
            return
        wait.over = True
        starts, wakes = self.ready[wait.model]
        if (starts, wakes) != wait.seen:
            name = "model wake" if wakes != wait.seen[1] else "model start"
            self.tracer.start_span(name, start_time=wait.began).end()

    async def open(self, method: str, url: str, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> Answer:
        self._server_waited()
        parts = urlsplit(url)
        attributes = {"http.request.method": method, "url.full": url,
                      "server.address": parts.hostname or ""}
        if parts.port:
            attributes["server.port"] = parts.port
        span = self.tracer.start_span("upstream", kind=SpanKind.CLIENT, attributes=attributes)
        try:
            answer = await self.upstream.open(method, url, with_context(headers, span), body)
        except BaseException as exc:
            if isinstance(exc, Exception):
                span.set_attribute("error.type", type(exc).__name__)
                span.set_status(StatusCode.ERROR, str(exc) or type(exc).__name__)
            span.end()
            raise
        span.set_attribute("http.response.status_code", answer.status)
        if answer.status >= 500:
            span.set_status(StatusCode.ERROR)
        return _TracedAnswer(answer, span)


class _TracedAnswer:
    """The answer, whose close ends the call's span; its chunks are the answer's own."""

    __slots__ = ("_answer", "_span", "at_eof", "chunks", "headers", "status")

    def __init__(self, answer: Answer, span: trace.Span) -> None:
        self._answer = answer
        self._span = span
        self.status = answer.status
        self.headers = answer.headers
        self.chunks = answer.chunks
        self.at_eof = answer.at_eof

    async def aclose(self) -> None:
        try:
            await self._answer.aclose()
        finally:
            self._span.end()
