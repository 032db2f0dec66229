"""Loading feedback on streams, on a real socket: comments while a stream waits for its model or
a slot, the answer after them, an error event when the wait fails, and nothing changed for a
request that does not wait."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import anyio
import httpx2
import openai
import pytest

from proxy.app import Gateway
from tests.support import (
    answer_lifespan,
    chat,
    eventually,
    make_config,
    serving,
    serving_app,
    sim_model,
)

pytestmark = pytest.mark.anyio

EVERY = 0.5
# A tick is a quarter of EVERY; the rest is room for a loaded machine.
LATE = EVERY / 4 + 0.4


def back_to_zero(gateway: Gateway) -> bool:
    return (gateway.in_flight == 0 and not gateway.feedback._pending
            and all(gateway.accounting.depth(m.name) == 0
                    and gateway.accounting.in_flight(m.name) == 0
                    and gateway.pool.backends[m.name].leases == 0
                    and gateway.pool.backends[m.name].waiting == 0
                    for m in gateway.config.models))


async def read_timed(client: httpx2.AsyncClient, url: str, body: dict[str, Any]
                     ) -> tuple[int, float, list[tuple[float, bytes]]]:
    """The status, when it came, and each chunk of the body with when it came (seconds from
    the send)."""
    began = time.monotonic()
    chunks = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        status_at = time.monotonic() - began
        async for chunk in response.aiter_raw():
            chunks.append((time.monotonic() - began, chunk))
    return response.status_code, status_at, chunks


def comments(chunks: list[tuple[float, bytes]]) -> list[tuple[float, str]]:
    return [(at, line) for at, chunk in chunks for line in chunk.decode().split("\n")
            if line.startswith(":")]


async def test_a_cold_start_is_heard_from_the_first_keepalive_on(anyio_backend: str) -> None:
    config = make_config([sim_model("m", "--startup-delay", "2.2")],
                         gateway={"stream_keepalive": EVERY})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        status, status_at, chunks = await read_timed(client, url, chat("m", stream=True))
        assert status == 200
        assert EVERY <= status_at < EVERY + LATE  # the headers, long before the model is up
        heard = comments(chunks)
        assert heard[0][0] < EVERY + LATE
        assert all(line.startswith(": waiting for model 'm': starting, ") for _, line in heard)
        seconds = [int(line.split(", ")[-1].removesuffix(" s")) for _, line in heard]
        assert seconds == sorted(seconds) and seconds[0] <= 1 and seconds[-1] >= 2, heard
        assert len(heard) >= 3  # one every EVERY s while it started
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(heard)]
        assert all(EVERY * 0.8 < gap < EVERY + 0.4 for gap in gaps), gaps
        body = b"".join(chunk for _, chunk in chunks).decode()
        events = [e for e in body.split("\n\n") if e.startswith("data: {")]
        assert len(events) == 5 and body.endswith("data: [DONE]\n\n")  # role + 4 tokens
        await eventually(lambda: back_to_zero(gateway))


async def test_a_long_queue_wait_says_its_place(anyio_backend: str) -> None:
    config = make_config([sim_model("m", "--tokens-per-second", "10", max_concurrent=1)],
                         gateway={"stream_keepalive": EVERY})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        await gateway.pool.load("m")
        results: dict[str, Any] = {}

        async def first() -> None:  # holds the one slot for ~1.5 s
            results["first"] = (await client.post(url + "/v1/chat/completions",
                                                  json=chat("m", max_tokens=15))).status_code

        async def queued(name: str) -> None:
            results[name] = await read_timed(client, url, chat("m", stream=True, max_tokens=2))

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await eventually(lambda: gateway.accounting.in_flight("m") == 1)
            tg.start_soon(queued, "second")
            await eventually(lambda: gateway.accounting.depth("m") == 1)
            tg.start_soon(queued, "third")
        assert results["first"] == 200
        for name, place in (("second", 1), ("third", 2)):
            status, _, chunks = results[name]
            heard = comments(chunks)
            assert status == 200 and heard, name
            assert heard[0][1].startswith(
                f": waiting for a slot of model 'm': number {place} in the queue, "), heard
            assert b"".join(c for _, c in chunks).endswith(b"data: [DONE]\n\n")
        await eventually(lambda: back_to_zero(gateway))


async def test_the_openai_client_streams_through_the_comments(anyio_backend: str) -> None:
    config = make_config([sim_model("m", "--startup-delay", "2")],
                         gateway={"stream_keepalive": EVERY})
    async with serving(config) as (url, gateway):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        began = time.monotonic()
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True)
        # The stream is open (the 200 came) long before the model is up: the client reads the
        # comments that follow, then the answer.
        assert time.monotonic() - began < EVERY + LATE
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text == "tok " * 6
        await client.close()
        await eventually(lambda: back_to_zero(gateway))


def failing_model() -> dict[str, Any]:
    """A server that dies while it starts, after the feedback began."""
    return {"name": "m", "launcher": "process", "startup_timeout": 20.0,
            "command": ["{python}", "-c", "import time; time.sleep(1.2); raise SystemExit(3)"]}


async def test_a_start_that_fails_after_feedback_is_an_error_event(anyio_backend: str) -> None:
    config = make_config([failing_model()], gateway={"stream_keepalive": EVERY})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        status, _, chunks = await read_timed(client, url, chat("m", stream=True))
        body = b"".join(c for _, c in chunks)
        assert status == 200
        assert comments(chunks)
        head, sep, event = body.rpartition(b"\n\n\n\ndata: ")
        assert sep and head.startswith(b": waiting for model 'm'")  # a blank line before it
        assert event.endswith(b"\n\n") and event.count(b"\n") == 2  # data on one line
        error = json.loads(event)["error"]
        assert error["code"] == "model_start_failed" and "failed to start" in error["message"]
        await eventually(lambda: back_to_zero(gateway))

        openai_client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused",
                                           max_retries=0)
        await anyio.sleep(config.models[0].failure_backoff)
        with pytest.raises(openai.APIError, match="failed to start"):
            stream = await openai_client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
            async for _ in stream:
                pass
        await openai_client.close()
        await eventually(lambda: back_to_zero(gateway))


class FixedStream:
    """A backend whose streamed answer is the same bytes every time."""

    BODY = [b'data: {"id":"x","choices":[{"delta":{"content":"a"}}]}\n\n', b"data: [DONE]\n\n"]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["method"] == "GET":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"x-fixed", b"1")]})
        for chunk in self.BODY:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def _complete(received: bytes) -> bool:
    head, sep, body = received.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return body.endswith(b"0\r\n\r\n")


async def raw_exchange(url: str, body: bytes) -> bytes:
    """The response's bytes as they came off the socket, less the date and the request id."""
    host, port = url.removeprefix("http://").split(":")
    stream = await anyio.connect_tcp(host, int(port))
    async with stream:
        await stream.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                          b"content-type: application/json\r\nconnection: close\r\n"
                          b"x-request-id: same\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        with anyio.fail_after(10):
            while not _complete(received):
                received += await stream.receive()
    return b"\r\n".join(line for line in received.split(b"\r\n")
                        if not line.lower().startswith(b"date:"))


async def test_answers_that_do_not_wait_are_unchanged_byte_for_byte(anyio_backend: str) -> None:
    async with serving_app(FixedStream()) as backend:
        seen = {}
        for keepalive in (0, EVERY):
            models = [{"name": "m", "launcher": "static", "url": backend}]
            config = make_config(models, gateway={"stream_keepalive": keepalive})
            async with serving(config) as (url, gateway):
                assert (gateway.feedback is None) == (keepalive == 0)
                await gateway.pool.load("m")
                seen[keepalive] = [
                    await raw_exchange(url, json.dumps(chat("m", stream=stream)).encode())
                    for stream in (True, False)]
                seen[keepalive].append(await raw_exchange(url, b'{"model": "nope"}'))
        assert seen[0] == seen[EVERY]
        assert seen[0][0].startswith(b"HTTP/1.1 200") and b"x-fixed: 1" in seen[0][0]
        assert all(chunk in seen[0][0] for chunk in FixedStream.BODY)
        assert seen[0][2].startswith(b"HTTP/1.1 404")


async def test_a_client_that_leaves_during_feedback_frees_everything(anyio_backend: str) -> None:
    config = make_config([sim_model("m", "--startup-delay", "3")],
                         gateway={"stream_keepalive": EVERY})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        async with client.stream("POST", url + "/v1/chat/completions",
                                 json=chat("m", stream=True)) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                assert chunk.startswith(b": waiting for model 'm': starting")
                break
        await eventually(lambda: back_to_zero(gateway))
        assert gateway.pool.backends["m"].state.value == "starting"  # the start goes on


async def test_a_queue_timeout_after_feedback_is_an_error_event(anyio_backend: str) -> None:
    config = make_config([sim_model("m", "--tokens-per-second", "10", max_concurrent=1)],
                         gateway={"stream_keepalive": EVERY, "queue_timeout": 1.2})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        await gateway.pool.load("m")
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: client.post(url + "/v1/chat/completions",
                                              json=chat("m", max_tokens=25)))
            await eventually(lambda: gateway.accounting.in_flight("m") == 1)
            status, _, chunks = await read_timed(client, url, chat("m", stream=True))
        body = b"".join(c for _, c in chunks)
        assert status == 200 and comments(chunks)
        event = body.rpartition(b"\n\n\n\ndata: ")[2]
        assert json.loads(event)["error"]["code"] == "queue_timeout"
        await eventually(lambda: back_to_zero(gateway))
