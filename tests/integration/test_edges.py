"""The edges of HTTP, each on real sockets: SSE error events after a cut event, 405s, hop-by-hop
headers, ``Expect: 100-continue``, forwarded headers, and an early 413."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator

import anyio
import httpx2
import pytest

from proxy.app import Gateway
from tests.integration.test_accounting import counters
from tests.support import chat, eventually, make_config, serving, static_model

pytestmark = pytest.mark.anyio

SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n")


async def back_to_zero(gateway: Gateway) -> None:
    await eventually(lambda: not any(counters(gateway)), within=5)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _read_request(conn: socket.socket) -> tuple[bytes, bytes]:
    """The request's head and its body (by content-length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return data, b""
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        more = conn.recv(65536)
        if not more:
            break
        body += more
    return head, body


@contextlib.contextmanager
def raw_backend(answer: Callable[[socket.socket, bytes], None]) -> Iterator[str]:
    """A healthy backend on a real socket; ``answer(conn, head)`` answers each POST."""
    stop = threading.Event()
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                head, _ = _read_request(conn)
                if head.startswith(b"GET"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"
                                 b"connection: close\r\n\r\n")
                else:
                    answer(conn, head)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        server.close()


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
