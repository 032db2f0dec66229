"""Traces of the whole gateway on real sockets, into the SDK's in-memory exporter: the request's
span and its children, their attributes and status, an incoming trace continued, and the trace
context reaching the model server."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import anyio
import httpx2
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from tests.otlp import in_memory
from tests.support import (
    answer_lifespan,
    chat,
    make_config,
    raw_backend,
    serving,
    serving_app,
    sim_model,
    static_model,
)

pytestmark = pytest.mark.anyio

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


class Recording:
    """A model server that records each request's headers and answers ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.headers: list[dict[str, str]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        status = 200  # the health check's
        if scope["method"] == "POST":
            self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
            status = self.status
        body = b'{"object": "chat.completion", "choices": []}'
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


async def test_a_request_is_a_span_with_its_upstream_call() -> None:
    backend = Recording()
    tracing, exporter = in_memory()
    async with serving_app(backend) as backend_url:
        config = make_config([static_model("m", backend_url)])
        async with serving(config, tracing=tracing) as (url, _), httpx2.AsyncClient() as client:
            answer = await client.post(url + "/v1/chat/completions", json=chat("m"),
                                       headers={"x-request-id": "req-1"})
            assert answer.status_code == 200
            assert (await client.get(url + "/health")).status_code == 200
    spans = by_name(exporter.get_finished_spans())
    # A slot taken at once is no span of its own (under 1 ms), only the request's attribute.
    assert set(spans) == {"POST /v1/chat/completions", "upstream"}
    request, upstream = spans["POST /v1/chat/completions"], spans["upstream"]
    assert request.kind is SpanKind.SERVER and upstream.kind is SpanKind.CLIENT
    assert request.parent is None
    assert parent_of(upstream) == request.context.span_id
    assert upstream.context.trace_id == request.context.trace_id
    assert request.start_time <= upstream.start_time <= upstream.end_time <= request.end_time
    assert 0 <= request.attributes["vllm_gateway.queue_wait_ms"] < 1
    assert request.attributes["http.route"] == "/v1/chat/completions"
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["gen_ai.request.model"] == "m"
    assert request.attributes["vllm_gateway.request_id"] == "req-1"
    assert request.attributes["vllm_gateway.retries"] == 0
    assert request.attributes["http.response.body.size"] == len(answer.content)
    assert request.status.status_code is StatusCode.UNSET
    assert upstream.attributes["http.response.status_code"] == 200
    assert upstream.attributes["url.full"] == backend_url + "/v1/chat/completions"
    # The model server's request carries the upstream call's context: its spans join the trace.
    version, trace_id, span_id, _ = backend.headers[0]["traceparent"].split("-")
    assert (version, trace_id, span_id) == (
        "00", f"{upstream.context.trace_id:032x}", f"{upstream.context.span_id:016x}")


async def test_an_incoming_traceparent_is_continued_and_replaced_for_the_backend() -> None:
    backend = Recording()
    tracing, exporter = in_memory()
    incoming = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"
    async with serving_app(backend) as backend_url:
        config = make_config([static_model("m", backend_url)])
        async with serving(config, tracing=tracing) as (url, _), httpx2.AsyncClient() as client:
            await client.post(url + "/v1/chat/completions", json=chat("m"),
                              headers={"traceparent": incoming})
    spans = by_name(exporter.get_finished_spans())
    request = spans["POST /v1/chat/completions"]
    assert f"{request.context.trace_id:032x}" == PARENT_TRACE
    assert f"{parent_of(request):016x}" == PARENT_SPAN
    sent = backend.headers[0]["traceparent"]
    assert sent.split("-")[1] == PARENT_TRACE
    assert sent.split("-")[2] == f"{spans['upstream'].context.span_id:016x}"


async def test_a_server_error_from_the_backend_marks_both_spans() -> None:
    tracing, exporter = in_memory()
    async with serving_app(Recording(status=500)) as backend_url:
        config = make_config([static_model("m", backend_url)])
        async with serving(config, tracing=tracing) as (url, _), httpx2.AsyncClient() as client:
            assert (await client.post(url + "/v1/chat/completions",
                                      json=chat("m"))).status_code == 500
    spans = by_name(exporter.get_finished_spans())
    assert spans["POST /v1/chat/completions"].status.status_code is StatusCode.ERROR
    assert spans["upstream"].status.status_code is StatusCode.ERROR


async def test_a_backend_that_cannot_be_reached_is_an_error_per_try() -> None:
    tracing, exporter = in_memory()

    def ok(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: 2\r\nconnection: close\r\n\r\n{}")

    with contextlib.ExitStack() as backend:
        backend_url = backend.enter_context(raw_backend(ok))
        config = make_config([static_model("m", backend_url)],
                             upstream={"retries": 1, "backoff_base": 0.0})
        async with serving(config, tracing=tracing) as (url, _), \
                httpx2.AsyncClient() as client:
            assert (await client.post(url + "/v1/chat/completions",
                                      json=chat("m"))).status_code == 200
            backend.close()  # gone: the model is still ready (no check since), connects fail
            answer = await client.post(url + "/v1/chat/completions", json=chat("m"))
    assert answer.status_code == 502
    spans = exporter.get_finished_spans()
    tries = [s for s in spans if s.name == "upstream"][1:]
    assert len(tries) == 2
    assert all(s.status.status_code is StatusCode.ERROR for s in tries)
    assert {s.attributes["error.type"] for s in tries} == {"ConnectFailed"}
    request = [s for s in spans if s.name == "POST /v1/chat/completions"][1]
    assert {parent_of(s) for s in tries} == {request.context.span_id}
    assert request.attributes["vllm_gateway.retries"] == 1
    assert request.attributes["error.type"] == "upstream_unavailable"
    assert request.status.status_code is StatusCode.ERROR


async def test_a_gateway_refusal_is_in_the_span_without_an_upstream_call() -> None:
    tracing, exporter = in_memory()
    config = make_config([sim_model("m")])
    async with serving(config, tracing=tracing) as (url, _), httpx2.AsyncClient() as client:
        answer = await client.post(url + "/v1/chat/completions", json=chat("nope"))
    assert answer.status_code == 404
    (request,) = exporter.get_finished_spans()
    assert request.attributes["error.type"] == "model_not_found"
    assert request.attributes["gen_ai.request.model"] == "nope"
    # A client's mistake is no error of the gateway's (OpenTelemetry's HTTP server rule).
    assert request.status.status_code is StatusCode.UNSET


async def test_a_request_that_waits_for_a_slot_and_for_the_model_start_says_so() -> None:
    tracing, exporter = in_memory()
    config = make_config([sim_model("m", max_concurrent=1)])
    async with serving(config, tracing=tracing) as (url, _), \
            httpx2.AsyncClient(timeout=30) as client:
        async def ask() -> None:
            assert (await client.post(url + "/v1/chat/completions",
                                      json=chat("m"))).status_code == 200

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            tg.start_soon(ask)
    spans = exporter.get_finished_spans()
    requests = [s for s in spans if s.name == "POST /v1/chat/completions"]
    assert len(requests) == 2
    children = {r.context.span_id: {s.name: s for s in spans if parent_of(s) == r.context.span_id}
                for r in requests}
    # The first waited for the start, the second for the first's slot (the start within it).
    started = [c for c in children.values() if "model start" in c]
    assert len(started) == 1
    start = started[0]["model start"]
    assert start.end_time - start.start_time > 100_000_000  # a process start: 0.1 s or more
    assert start.end_time <= started[0]["upstream"].start_time
    (waited,) = [c for c in children.values() if "queue wait" in c]
    assert "model start" not in waited
    queued = waited["queue wait"]
    assert queued.end_time - queued.start_time > 100_000_000
    assert queued.end_time <= waited["upstream"].start_time
