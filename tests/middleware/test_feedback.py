"""The loading feedback layer alone, around a tiny inner app that waits, driven by hand, on
asyncio and trio: what an answer after feedback becomes, and what a request that is not a
stream gets."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from backends.pool import ModelState
from kernel.accounting import InMemoryAccounting
from kernel.context import STATE
from kernel.errors import unavailable
from kernel.types import Message
from middleware.feedback import StreamFeedback
from middleware.progress import progress
from middleware.retry import RetryConnectFailures
from proxy.anthropic import AnthropicErrors
from relay.passthrough import UpstreamConnectError
from telemetry.metrics import GatewayMetrics
from tests.middleware.asgi import Client, admitted_scope, call
from tests.support import make_config, static_model

pytestmark = pytest.mark.anyio

EVERY = 0.1
WAIT = 0.45  # the inner app's wait: feedback begins within EVERY * 1.25


CONFIG = make_config([static_model("m", "http://127.0.0.1:9")],
                     gateway={"stream_keepalive": EVERY})


def layer(inner: Any) -> StreamFeedback:
    pool = SimpleNamespace(backends={"m": SimpleNamespace(state=ModelState.STARTING)})
    return StreamFeedback(inner, config=CONFIG, pool=pool,  # type: ignore[arg-type]
                          accounting=InMemoryAccounting(CONFIG))


def stream_scope(stream: bool = True) -> Any:
    scope = admitted_scope(CONFIG, "m")
    scope[STATE].stream = stream
    return scope


def answering_after(wait: float, *messages: Message) -> Any:
    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep(wait)
        for message in messages:
            await send(message)
    return inner


async def run(inner: Any, *, stream: bool = True) -> Client:
    app = layer(inner)
    async with app.running():
        return await call(app, stream_scope(stream))


def start(status: int, content_type: bytes) -> Message:
    return {"type": "http.response.start", "status": status,
            "headers": [(b"content-type", content_type)]}


def body(data: bytes, more: bool = False) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


def last_event(client: Client) -> dict[str, Any]:
    assert client.sent[-1]["more_body"] is False
    final = client.sent[-1]["body"]
    assert final.startswith(b"\n\ndata: ") and final.endswith(b"\n\n")
    assert final.count(b"\n") == 4  # the blank line, then data on one line
    return json.loads(final.removeprefix(b"\n\ndata: "))


async def test_an_error_answer_after_feedback_is_one_error_event(anyio_backend: str) -> None:
    envelope = {"error": {"message": "max_tokens is too large", "type": "BadRequestError",
                          "param": "max_tokens", "code": 400}}
    pretty = json.dumps(envelope, indent=2).encode()  # on several lines, as a backend may
    client = await run(answering_after(WAIT, start(400, b"application/json"),
                                       body(pretty[:20], more=True), body(pretty[20:])))
    assert client.status == 200
    assert client.headers["content-type"].startswith("text/event-stream")
    assert client.body.startswith(b": waiting for a slot of model 'm': number 1 in the queue")
    assert last_event(client) == envelope


async def test_an_answer_that_is_no_error_envelope_gets_a_generic_event(
        anyio_backend: str) -> None:
    client = await run(answering_after(WAIT, start(502, b"text/plain"), body(b"bad gateway")))
    error = last_event(client)["error"]
    assert error["code"] == "upstream_failed" and "status 502" in error["message"]


async def test_a_streamed_answer_follows_the_comments(anyio_backend: str) -> None:
    events = [b'data: {"n": 1}\n\n', b"data: [DONE]\n\n"]
    client = await run(answering_after(WAIT, start(200, b"text/event-stream"),
                                       body(events[0], more=True), body(events[1])))
    assert client.status == 200
    comments, answer = client.body.split(b"data: ", 1)
    assert len(comments.split(b"\n\n")) > 2  # two comments or more, and nothing else
    assert all(c.startswith(b": waiting") for c in comments.split(b"\n\n") if c)
    assert b"data: " + answer == b"".join(events)


async def test_a_request_that_is_no_stream_gets_no_feedback(anyio_backend: str) -> None:
    messages = [start(200, b"application/json"), body(b"{}")]
    client = await run(answering_after(WAIT, *messages), stream=False)
    assert client.sent == messages


async def test_a_stream_that_does_not_wait_is_passed_as_it_is(anyio_backend: str) -> None:
    messages = [start(200, b"text/event-stream"), body(b"data: [DONE]\n\n")]
    client = await run(answering_after(EVERY / 2, *messages))
    assert client.sent == messages


async def test_a_failure_after_feedback_ends_the_stream_and_is_raised(anyio_backend: str) -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep(WAIT)
        raise RuntimeError("a bug")

    client = Client.with_body()
    app = layer(failing)
    async with app.running():
        with pytest.raises(RuntimeError, match="a bug"):
            await app(stream_scope(), client.receive, client.send)
    assert client.status == 200
    assert last_event(client)["error"]["code"] == "internal_error"


async def test_an_error_after_feedback_on_an_anthropic_path_is_anthropics_error_event(
        anyio_backend: str) -> None:
    async def timing_out(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep(WAIT)
        raise unavailable("No slot of model 'm' came free in time.", code="queue_timeout")

    app = layer(timing_out)
    async with app.running():
        client = await call(AnthropicErrors(app), stream_scope())
    assert client.status == 200
    assert client.sent[-1]["more_body"] is False
    final = client.sent[-1]["body"]
    assert final.startswith(b"\n\nevent: error\ndata: ") and final.endswith(b"\n\n")
    assert json.loads(final.removeprefix(b"\n\nevent: error\ndata: ")) == {
        "type": "error", "error": {"type": "overloaded_error",
                                   "message": "No slot of model 'm' came free in time."}}


async def test_a_backend_error_after_feedback_on_an_anthropic_path_is_an_error_event(
        anyio_backend: str) -> None:
    envelope = {"type": "error", "error": {"type": "invalid_request_error",
                                           "message": "max_tokens: Field required"}}
    for answer, shaped in ((json.dumps(envelope).encode(), envelope),
                           (b"bad gateway", {"type": "error", "error": {
                               "type": "api_error", "message": "The backend of model 'm' "
                               "answered the stream with status 400."}})):
        app = layer(answering_after(WAIT, start(400, b"application/json"), body(answer)))
        async with app.running():
            client = await call(AnthropicErrors(app), stream_scope())
        final = client.sent[-1]["body"]
        assert final.startswith(b"\n\nevent: error\ndata: ") and final.count(b"\n") == 5
        assert json.loads(final.removeprefix(b"\n\nevent: error\ndata: ")) == shaped


async def test_a_gateway_error_answered_after_feedback_on_an_anthropic_path_is_anthropics(
        anyio_backend: str) -> None:
    async def answering_a_timeout(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep(WAIT)
        await unavailable("No slot of model 'm' came free in time.",
                          code="queue_timeout").answer(scope, send)

    app = layer(answering_a_timeout)
    async with app.running():
        client = await call(AnthropicErrors(app), stream_scope())
    final = client.sent[-1]["body"]
    assert final.startswith(b"\n\nevent: error\ndata: ") and final.count(b"\n") == 5
    assert json.loads(final.removeprefix(b"\n\nevent: error\ndata: "))["error"] == {
        "type": "overloaded_error", "message": "No slot of model 'm' came free in time."}


async def test_a_connect_failure_after_feedback_is_still_retried(anyio_backend: str) -> None:
    attempts = []

    async def connecting(scope: Any, receive: Any, send: Any) -> None:
        attempts.append(1)
        await anyio.sleep(WAIT)
        if len(attempts) == 1:
            raise UpstreamConnectError("m")
        await send(start(200, b"text/event-stream"))
        await send(body(b"data: [DONE]\n\n"))

    retry = RetryConnectFailures(connecting, config=make_config(
        [static_model("m", "http://127.0.0.1:9")],
        upstream={"backoff_base": 0.001, "backoff_max": 0.002}), metrics=GatewayMetrics())
    client = Client.with_body()
    scope = stream_scope()
    _, send = progress(scope, client.send)  # as the request context does, around every layer
    app = layer(retry)
    async with app.running():
        await app(scope, client.receive, send)
    assert len(attempts) == 2
    assert client.status == 200
    assert client.body.startswith(b": waiting") and client.body.endswith(b"data: [DONE]\n\n")


async def test_the_first_byte_is_the_answers_not_a_comments(anyio_backend: str) -> None:
    scope = stream_scope()
    tracker, send = progress(scope, Client.with_body().send)
    app = layer(answering_after(WAIT, start(200, b"text/event-stream"),
                                body(b"data: [DONE]\n\n")))
    async with app.running():
        began = time.perf_counter()
        await app(scope, Client.with_body().receive, send)
    assert tracker.sent > len(b"data: [DONE]\n\n")  # the comments count as bytes sent
    assert tracker.first_byte - began >= WAIT
