"""The access line of each request, and the per-model timings, driven by hand."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest

from kernel.context import STATE
from kernel.types import Receive, Scope, Send
from middleware import request_context
from middleware.request_context import RequestContext
from telemetry.metrics import GatewayMetrics
from tests.middleware.asgi import Client, call, http_scope
from tests.middleware.test_request_context import Lines
from tests.support import make_config, serving, sim_model, static_model

pytestmark = pytest.mark.anyio

MODEL = make_config([sim_model("qwen")]).by_name["qwen"]


@pytest.fixture
def access_log(monkeypatch: pytest.MonkeyPatch) -> Lines:
    lines = Lines()
    monkeypatch.setattr(request_context, "access_log", lines)
    return lines


def answering(*, slot: bool, then_read: bool = False, complete: bool = True) -> Any:
    """An inner app as the stack below would be: a model, maybe a slot, an answer in two parts."""
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope[STATE].model = MODEL
        if slot:
            scope[STATE].queue_wait = 0.25
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        if complete:
            await send({"type": "http.response.body", "body": b"end", "more_body": False})
        if then_read:
            await receive()

    return app


def observed(metrics: GatewayMetrics, histogram: str) -> float | None:
    return metrics.registry.get_sample_value(histogram + "_count", {"model": "qwen"})


async def test_a_served_request_has_its_timings_logged_and_observed(access_log: Lines) -> None:
    metrics = GatewayMetrics()
    await call(RequestContext(answering(slot=True), metrics=metrics), http_scope())
    (line,) = access_log.lines
    assert (line["model"], line["status"], line["bytes"]) == ("qwen", 200, 7)
    assert line["queue_wait_ms"] == 250.0
    assert 0 <= line["ttfb_ms"] <= line["duration_ms"]
    assert line["client_disconnected"] is False
    assert observed(metrics, "gateway_time_to_first_byte_seconds") == 1
    assert observed(metrics, "gateway_request_duration_seconds") == 1


async def test_a_request_that_got_no_slot_has_no_timings_observed(access_log: Lines) -> None:
    metrics = GatewayMetrics()
    await call(RequestContext(answering(slot=False), metrics=metrics), http_scope())
    assert access_log.lines[0]["queue_wait_ms"] is None
    assert observed(metrics, "gateway_time_to_first_byte_seconds") is None
    assert observed(metrics, "gateway_request_duration_seconds") is None


async def test_a_client_that_leaves_before_the_end_is_logged_as_disconnected(
        access_log: Lines) -> None:
    client = Client({"type": "http.disconnect"})
    context = RequestContext(answering(slot=True, complete=False, then_read=True),
                             metrics=GatewayMetrics())
    await call(context, http_scope(), client)
    assert access_log.lines[0]["client_disconnected"] is True


async def test_a_send_refused_by_the_server_counts_as_a_disconnect(access_log: Lines) -> None:
    class Gone(Client):
        async def send(self, message: Any) -> None:
            if message.get("more_body") is False:
                raise OSError("the client is gone")
            await super().send(message)

    with pytest.raises(OSError):
        await call(RequestContext(answering(slot=True), metrics=GatewayMetrics()),
                   http_scope(), Gone())
    assert access_log.lines[0]["client_disconnected"] is True


async def test_a_disconnect_after_the_whole_answer_is_no_disconnect(access_log: Lines) -> None:
    client = Client({"type": "http.disconnect"})
    context = RequestContext(answering(slot=True, then_read=True), metrics=GatewayMetrics())
    await call(context, http_scope(), client)
    assert access_log.lines[0]["client_disconnected"] is False


async def test_the_gateways_own_error_answers_log_their_code_and_the_model_asked_for(
        access_log: Lines) -> None:
    config = make_config([static_model("m", "http://127.0.0.1:9")],
                         gateway={"max_queue_size": 1})
    async with serving(config) as (url, gateway), httpx2.AsyncClient() as client:
        chat_url = url + "/v1/chat/completions"
        await client.post(chat_url, json={"model": "no-such-model"})
        await client.post(chat_url, content=b"{not json",
                          headers={"content-type": "application/json"})
        await client.post(chat_url, content=b"hi", headers={"content-type": "text/plain"})
        await client.get(url + "/v1/nowhere")
        gateway.drain()
        await client.post(chat_url, json={"model": "m"})
    lines = [line for line in access_log.lines if line["path"] != "/health"]
    assert [(line["status"], line["error"], line["model"]) for line in lines] == [
        (404, "model_not_found", "no-such-model"),
        (400, "invalid_json", "-"),
        (415, "unsupported_media_type", "-"),
        (404, "not_found", "-"),
        (503, "shutting_down", "-"),
    ]
    # The made-up name is in the log line only: a metric label per name would be unbounded.
    def answered(model: str) -> float | None:
        return gateway.metrics.registry.get_sample_value(
            "gateway_requests_total", {"model": model, "status": "404"})

    assert answered("no-such-model") is None
    assert answered("-") == 2
