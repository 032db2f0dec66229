"""The Anthropic paths' error layer alone: the gateway's own errors in Anthropic's shape, a
backend's answers as they came."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kernel.errors import GatewayError, bad_request, unavailable
from kernel.types import Receive, Scope, Send
from proxy.anthropic import AnthropicErrors
from tests.middleware.asgi import Client, call, http_scope

pytestmark = pytest.mark.anyio


def scope() -> Scope:
    return http_scope(path="/v1/messages")


def anthropic_error(client: Client) -> dict[str, Any]:
    payload = client.json()
    assert payload == {"type": "error", "error": {"type": payload["error"]["type"],
                                                  "message": payload["error"]["message"]}}
    assert int(client.headers["content-length"]) == len(client.body)
    return payload["error"]


async def test_an_error_a_layer_sends_is_said_in_anthropics_shape_with_its_headers() -> None:
    async def full(scope: Scope, receive: Receive, send: Send) -> None:
        await GatewayError(429, "Too many requests are waiting.", type="rate_limit_error",
                           code="queue_full", retry_after=3).send(send)

    client = await call(AnthropicErrors(full), scope())
    assert client.status == 429
    assert anthropic_error(client) == {"type": "rate_limit_error",
                                       "message": "Too many requests are waiting."}
    assert client.headers["retry-after"] == "3"


@pytest.mark.parametrize(("error", "status", "kind"), [
    (bad_request("No such thing.", status=404), 404, "not_found_error"),
    (bad_request("Too large.", status=413), 413, "request_too_large"),
    (bad_request("Not JSON."), 400, "invalid_request_error"),
    (unavailable("No capacity.", code="no_capacity", retry_after=1), 503, "overloaded_error"),
    (GatewayError(502, "Backend down.", type="upstream_error", code="upstream_failed"), 502,
     "api_error"),
])
async def test_an_error_a_layer_raises_is_said_in_anthropics_shape(
        error: GatewayError, status: int, kind: str) -> None:
    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        raise error

    client = await call(AnthropicErrors(failing), scope())
    assert client.status == status
    assert anthropic_error(client)["type"] == kind


async def test_a_backends_answers_and_errors_pass_as_they_came() -> None:
    backend_error = json.dumps({"error": {"message": "bad", "type": "BadRequestError",
                                          "param": None, "code": 400}}).encode()

    async def backend(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": backend_error})

    client = await call(AnthropicErrors(backend), scope())
    assert (client.status, client.body) == (400, backend_error)


async def test_a_stream_the_gateway_cuts_ends_with_an_anthropic_error_event() -> None:
    started = b'event: message_start\ndata: {"type": "message_start"}\n\n'

    async def cut(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": started, "more_body": True})
        await send(GatewayError(502, "The backend failed during the answer.",
                                type="upstream_error", code="upstream_failed").sse_message())

    client = await call(AnthropicErrors(cut), scope())
    assert client.status == 200
    last = client.sent[-1]
    assert last["more_body"] is False
    head, data = last["body"].decode().removesuffix("\n\n").split("data: ")
    assert head == "\n\nevent: error\n"  # a blank line first: it stands alone
    assert json.loads(data) == {"type": "error", "error": {
        "type": "api_error", "message": "The backend failed during the answer."}}


async def test_an_error_after_the_answer_started_is_not_answered_twice() -> None:
    async def late(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise unavailable("Gone.", code="shutting_down")

    client = Client.with_body()
    with pytest.raises(GatewayError):
        await call(AnthropicErrors(late), scope(), client)
    assert client.status == 200 and client.body == b""
