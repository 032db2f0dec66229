"""The tracing layers alone, around tiny inner apps, into the in-memory exporter: errors, what
is not traced, the route of a mounted gateway, the trace id in the log lines, a failed start."""

from __future__ import annotations

import pytest
import structlog
from opentelemetry.trace import StatusCode

from backends.server import START_FAILED
from kernel.errors import GatewayError, unavailable
from kernel.types import ASGIApp, Receive, Scope, Send
from middleware.request_context import RequestContext
from middleware.tracing import GatewayTracing
from telemetry.metrics import GatewayMetrics
from tests.otlp import in_memory
from tests.support import make_config, sim_model

from .asgi import Client, admitted_scope, call, http_scope

pytestmark = pytest.mark.anyio

ROUTES = frozenset({"/v1/chat/completions"})


def traced(inner: ASGIApp, tracing: GatewayTracing) -> ASGIApp:
    """The request span's layer around the request context around ``inner``."""
    return tracing.requests(RequestContext(inner, metrics=GatewayMetrics()),
                            untraced=frozenset({"/health"}), routes=ROUTES)


async def test_an_exception_is_a_500_and_an_error_span_with_the_exception() -> None:
    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    tracing, exporter = in_memory()
    client = Client()
    with pytest.raises(RuntimeError):
        await traced(inner, tracing)(http_scope(), client.receive, client.send)
    assert client.status == 500
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["http.response.status_code"] == 500
    assert span.attributes["error.type"] == "RuntimeError"
    assert [event.name for event in span.events] == ["exception"]


async def test_a_gateway_error_answered_says_its_code() -> None:
    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        raise unavailable("full", code="queue_timeout", retry_after=1)

    tracing, exporter = in_memory()
    assert (await call(traced(inner, tracing), http_scope())).status == 503
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "queue_timeout"
    assert span.attributes["error.type"] == "queue_timeout"


async def test_probes_and_other_scopes_are_not_traced() -> None:
    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    tracing, exporter = in_memory()
    app = traced(inner, tracing)
    assert (await call(app, http_scope(method="GET", path="/health"))).status == 200
    await app({"type": "lifespan"}, Client().receive, Client().send)
    assert exporter.get_finished_spans() == ()


async def test_a_mounted_gateway_names_its_route_without_the_mount() -> None:
    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    tracing, exporter = in_memory()
    scope = http_scope(path="/llm/v1/chat/completions")
    scope["root_path"] = "/llm"
    await call(traced(inner, tracing), scope)
    (span,) = exporter.get_finished_spans()
    assert span.name == "POST /v1/chat/completions"
    assert span.attributes["http.route"] == "/v1/chat/completions"
    assert span.attributes["http.response.body.size"] == 2


async def test_log_lines_of_the_request_carry_its_trace_id_and_later_ones_do_not() -> None:
    seen = {}

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.update(structlog.contextvars.get_contextvars())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    tracing, exporter = in_memory()
    await call(traced(inner, tracing), http_scope())
    (span,) = exporter.get_finished_spans()
    assert seen["trace_id"] == f"{span.context.trace_id:032x}"
    assert "trace_id" not in structlog.contextvars.get_contextvars()


@pytest.mark.parametrize(("code", "spans"), [(START_FAILED, ["model start"]),
                                             ("no_capacity", ["model start"]),
                                             ("backend_unavailable", [])])
async def test_a_start_that_failed_is_an_error_span_of_its_own(code: str,
                                                               spans: list[str]) -> None:
    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        raise GatewayError(503, "no", type="service_unavailable_error", code=code)

    tracing, exporter = in_memory()
    config = make_config([sim_model("m")])
    scope = admitted_scope(config, "m")
    with pytest.raises(GatewayError):
        await call(tracing.waits(inner), scope)
    finished = exporter.get_finished_spans()
    assert [s.name for s in finished] == spans
    assert all(s.status.status_code is StatusCode.ERROR and s.attributes["error.type"] == code
               for s in finished)
