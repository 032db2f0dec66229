"""Draining, driven by hand: refusing once draining, and how each request in flight ends."""

from __future__ import annotations

import json

import anyio
import pytest

from kernel.types import Receive, Scope, Send
from middleware.draining import Draining
from tests.middleware.asgi import Client, call, http_scope, settle, start

pytestmark = pytest.mark.anyio


class Answering:
    """An inner app that sends what its request is told to, then waits for the next step."""

    def __init__(self, content_type: bytes = b"text/event-stream") -> None:
        self.content_type = content_type
        self.step = anyio.Event()
        self.cancelled = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if scope["state"]["answer"]:
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", self.content_type)]})
                await send({"type": "http.response.body", "body": b"data: 1\n\n",
                            "more_body": True})
            await self.step.wait()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise


def request(*, answer: bool) -> Scope:
    scope = http_scope()
    scope["state"] = {"answer": answer}
    return scope


def shutting_down_error(client: Client) -> dict:
    assert client.status == 503
    assert client.headers["retry-after"] == "1"
    return client.error()


async def test_once_draining_new_requests_get_503_and_never_reach_the_app() -> None:
    inner = Answering()
    draining = Draining(inner)
    draining.drain()
    client = await call(draining, request(answer=True))
    assert shutting_down_error(client)["code"] == "shutting_down"
    assert draining.in_flight == 0


async def test_requests_in_flight_go_on_while_draining_and_until_idle_waits_for_them() -> None:
    inner = Answering()
    draining = Draining(inner)
    idle = anyio.Event()

    async def wait_idle() -> None:
        await draining.until_idle()
        idle.set()

    async with anyio.create_task_group() as tg:
        client = await start(tg, draining, request(answer=True))
        draining.drain()
        tg.start_soon(wait_idle)
        await settle()
        assert (draining.in_flight, idle.is_set()) == (1, False)
        inner.step.set()
        await settle()
        assert idle.is_set()
    assert client.status == 200
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_ended_before_answering_a_request_gets_503() -> None:
    inner = Answering()
    draining = Draining(inner)
    async with anyio.create_task_group() as tg:
        client = await start(tg, draining, request(answer=False))
        draining.end_in_flight()
    assert inner.cancelled == 1
    assert shutting_down_error(client)["code"] == "shutting_down"
    assert draining.in_flight == 0


async def test_an_ended_stream_gets_an_sse_error_event_and_ends() -> None:
    inner = Answering()
    draining = Draining(inner)
    async with anyio.create_task_group() as tg:
        client = await start(tg, draining, request(answer=True))
        draining.end_in_flight()
    assert inner.cancelled == 1
    last = client.sent[-1]
    assert last["more_body"] is False
    event = last["body"].decode()
    # A blank line first, so that the event stands alone after a partial one.
    assert event.startswith("\n\ndata: ") and event.endswith("\n\n")
    assert json.loads(event[len("\n\ndata: "):])["error"]["code"] == "shutting_down"


async def test_an_ended_plain_body_is_cut_off_not_finished() -> None:
    inner = Answering(content_type=b"application/json")
    draining = Draining(inner)
    async with anyio.create_task_group() as tg:
        client = await start(tg, draining, request(answer=True))
        draining.end_in_flight()
    assert inner.cancelled == 1
    # No closing message: the server closes the connection, so the body cannot pass for whole.
    assert [m.get("more_body") for m in client.sent] == [None, True]


async def test_a_finished_answer_gets_nothing_more() -> None:
    sent_all = anyio.Event()
    hold = anyio.Event()

    async def finishes_then_lingers(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        sent_all.set()
        await hold.wait()  # cleanup after the answer (closing the upstream, say)

    draining = Draining(finishes_then_lingers)
    async with anyio.create_task_group() as tg:
        client = await start(tg, draining, http_scope())
        await sent_all.wait()
        draining.end_in_flight()
    assert client.body == b"data: [DONE]\n\n"
