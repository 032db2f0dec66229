"""The edges of HTTP, each on real sockets: SSE error events after a cut event, 405s, hop-by-hop
headers, ``Expect: 100-continue``, forwarded headers, and an early 413."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable
from typing import Any

import anyio
import httpx2
import pytest

from proxy.app import Gateway
from tests.integration.test_accounting import counters
from tests.support import (
    chat,
    eventually,
    make_config,
    raw_backend,
    serving,
    serving_app,
    static_model,
)

pytestmark = pytest.mark.anyio

SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n")


async def back_to_zero(gateway: Gateway) -> None:
    await eventually(lambda: not any(counters(gateway)), within=5)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse_events(raw: bytes) -> list[str]:
    """The data of each event a client dispatches, as the SSE rules read the stream."""
    events, data = [], []
    for line in raw.decode().split("\n"):
        if not line:
            if data:
                events.append("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return events


async def stream(url: str, model: str = "m") -> bytes:
    async with httpx2.AsyncClient(timeout=30) as client, client.stream(
            "POST", url + "/v1/chat/completions",
            json=chat(model, stream=True)) as response:
        assert response.status_code == 200
        raw = b""
        with contextlib.suppress(httpx2.RemoteProtocolError):
            async for part in response.aiter_raw():
                raw += part
        return raw


async def test_an_error_event_after_a_half_sent_event_stands_alone() -> None:
    def cut_mid_event(conn: socket.socket, head: bytes) -> None:
        conn.sendall(SSE_HEAD + _chunk(b'data: {"n": 1}\n\n') + _chunk(b'data: {"half'))

    with raw_backend(cut_mid_event) as backend:
        config = make_config([static_model("m", backend)])
        async with serving(config) as (url, gateway):
            events = sse_events(await stream(url))
            await back_to_zero(gateway)
    assert events[0] == '{"n": 1}'
    assert json.loads(events[-1])["error"]["code"] == "upstream_failed"


async def test_a_stream_ended_by_draining_after_a_half_sent_event_gets_a_whole_error_event(
        ) -> None:
    held = threading.Event()
    closed = threading.Event()

    def half_then_hold(conn: socket.socket, head: bytes) -> None:
        conn.sendall(SSE_HEAD + _chunk(b'data: {"n": 1}\n\n') + _chunk(b'data: {"half'))
        held.set()
        conn.recv(1)  # until the gateway closes the connection
        closed.set()

    with raw_backend(half_then_hold) as backend:
        config = make_config([static_model("m", backend)])
        async with serving(config) as (url, gateway):
            async with anyio.create_task_group() as tg:
                result: list[bytes] = []

                async def client_stream() -> None:
                    result.append(await stream(url))

                tg.start_soon(client_stream)
                await anyio.to_thread.run_sync(held.wait)
                await anyio.sleep(0.2)  # the half event reached the client
                gateway.end_in_flight()
            events = sse_events(result[0])
            await back_to_zero(gateway)
            assert closed.wait(5)
    assert json.loads(events[-1])["error"]["code"] == "shutting_down"


def recording_backend(heads: list[bytes], *, extra: bytes = b"") -> Callable[[socket.socket,
                                                                              bytes], None]:
    """A POST handler that keeps each request's head and answers a small JSON body."""
    def answer(conn: socket.socket, head: bytes) -> None:
        heads.append(head.lower())
        body = b'{"object": "chat.completion", "choices": []}'
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     + extra + b"content-length: %d\r\n\r\n" % len(body) + body)

    return answer


def raw_exchange(port: int, head: bytes, body: bytes = b"", *,
                 wait_for_continue: bool = False) -> tuple[bytes, bytes]:
    """One request on a raw socket; the response's head (lower case) and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + b"\r\n")
        data = b""
        if wait_for_continue:
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            interim, _, data = data.partition(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100"), interim
        sock.sendall(body)
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        response, _, rest = data.partition(b"\r\n\r\n")
        length = int(response.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(rest) < length:
            rest += sock.recv(65536)
    return response.lower(), rest


def post_head(port: int, body: bytes, *headers: bytes) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n" % (port, len(body))
            + b"".join(h + b"\r\n" for h in headers))


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_every_405_says_which_methods_are_allowed() -> None:
    config = make_config([static_model("m", "http://127.0.0.1:9")],
                         admin={"token": "t0ken"})
    async with serving(config) as (url, _), httpx2.AsyncClient() as client:
        admin = {"authorization": "Bearer t0ken"}
        for method, path, allowed, headers in [
                ("GET", "/v1/chat/completions", "POST", {}),
                ("POST", "/v1/models", "GET, HEAD", {}),
                ("POST", "/health", "GET, HEAD", {}),
                ("POST", "/admin/models", "GET", admin),
                ("GET", "/admin/drain", "POST", admin),
                ("GET", "/admin/models/m/load", "POST", admin)]:
            response = await client.request(method, url + path, headers=headers)
            assert response.status_code == 405, (method, path)
            assert response.headers["allow"] == allowed, (method, path)
            assert response.json()["error"]["code"] == "method_not_allowed"


async def test_headers_named_in_connection_are_dropped_both_ways() -> None:
    heads: list[bytes] = []
    answer = recording_backend(heads, extra=b"connection: x-backend-hop\r\nx-backend-hop: 1\r\n"
                               b"x-kept: 1\r\n")
    with raw_backend(answer) as backend:
        config = make_config([static_model("m", backend)])
        async with serving(config) as (url, gateway):
            body = json.dumps(chat("m")).encode()
            head, _ = await anyio.to_thread.run_sync(lambda: raw_exchange(
                port_of(url), post_head(port_of(url), body, b"connection: keep-alive, X-Hop",
                                        b"x-hop: secret", b"x-other: 1"), body))
            await back_to_zero(gateway)
    assert b"x-hop" not in heads[0] and b"x-other: 1" in heads[0]
    assert b"x-backend-hop" not in head and b"x-kept: 1" in head


async def test_expect_100_continue_is_answered_by_the_gateway_not_forwarded() -> None:
    heads: list[bytes] = []
    with raw_backend(recording_backend(heads)) as backend:  # it never sends 100 itself
        config = make_config([static_model("m", backend)], upstream={"timeout": 2.0})
        async with serving(config) as (url, gateway):
            body = json.dumps(chat("m")).encode()
            head, _ = await anyio.to_thread.run_sync(lambda: raw_exchange(
                port_of(url), post_head(port_of(url), body, b"expect: 100-continue"), body,
                wait_for_continue=True))
            await back_to_zero(gateway)
    assert head.startswith(b"http/1.1 200")
    assert b"expect:" not in heads[0]


async def test_client_forwarded_headers_reach_the_backend_as_the_gateway_knows_them() -> None:
    heads: list[bytes] = []
    with raw_backend(recording_backend(heads)) as backend:
        config = make_config([static_model("m", backend)])
        async with serving(config) as (url, gateway), httpx2.AsyncClient() as client:
            response = await client.post(url + "/v1/chat/completions", json=chat("m"), headers={
                "x-forwarded-for": "203.0.113.9", "x-forwarded-host": "evil.example",
                "x-forwarded-proto": "https", "forwarded": "for=203.0.113.9"})
            assert response.status_code == 200
            await back_to_zero(gateway)
    head = heads[0]
    assert b"203.0.113.9" not in head and b"evil.example" not in head
    assert b"\r\nforwarded:" not in head
    assert b"x-forwarded-for: 127.0.0.1\r\n" in head
    assert b"x-forwarded-proto: http\r\n" in head


async def test_a_host_applications_own_state_keys_do_not_break_the_gateway() -> None:
    heads: list[bytes] = []
    with raw_backend(recording_backend(heads)) as backend:
        gateway = Gateway(make_config([static_model("m", backend)]))
        seen_after: list[object] = []

        async def host(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                # The host's lifespan state, copied by the server into each request's state.
                scope["state"].update(model="the host's own", error="none", retries="many")
            await gateway(scope, receive, send)
            if scope["type"] == "http":
                seen_after.append(scope["state"]["model"])

        async with serving_app(host) as url, httpx2.AsyncClient() as client:
            assert (await client.get(url + "/v1/models")).status_code == 200
            response = await client.post(url + "/v1/chat/completions", json=chat("m"))
            assert response.status_code == 200
            missing = await client.post(url + "/v1/chat/completions", json=chat("nope"))
            assert missing.json()["error"]["code"] == "model_not_found"
            await back_to_zero(gateway)
    assert set(seen_after) == {"the host's own"}


async def test_a_413_refused_before_the_body_was_read_reaches_the_client() -> None:
    config = make_config([static_model("m", "http://127.0.0.1:9")],
                         gateway={"max_body_bytes": 1 << 20})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        for _ in range(3):  # the connection is reused: nothing of a body was left on it
            response = await client.post(url + "/v1/chat/completions",
                                         content=b"x" * (8 << 20),
                                         headers={"content-type": "application/json"})
            assert response.status_code == 413
            assert response.json()["error"]["code"] == "request_too_large"
        await back_to_zero(gateway)
        assert gateway.admission.budget.held == 0


async def test_hypercorn_writes_status_lines_without_a_reason_phrase() -> None:
    """As the README says where it compares the servers: h11 under hypercorn writes
    ``HTTP/1.1 200 `` and hypercorn has no setting for the phrase (HTTP/1.1 clients ignore it).
    Should hypercorn ever write one, this fails, and the README must say so."""
    config = make_config([static_model("m", "http://127.0.0.1:9")])
    async with serving(config) as (url, _):
        head, _ = await anyio.to_thread.run_sync(
            raw_exchange, port_of(url), b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n")
    assert head.split(b"\r\n")[0] == b"http/1.1 200 "
