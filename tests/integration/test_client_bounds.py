"""Bounds on what one client can hold: a client that stops reading, a slow or huge body.

Real sockets throughout: a client that does not read is a socket with a tiny receive buffer that
is never read, and the gateway only sees it as a ``send`` that does not return.
"""

from __future__ import annotations

import json
import socket
import time

import anyio
import httpx2
import pytest

from middleware import request_context
from tests.integration.test_accounting import all_back_to_zero
from tests.middleware.test_request_context import Lines
from tests.support import chat, make_config, serving, simulator, static_model

pytestmark = pytest.mark.anyio


@pytest.fixture
def access_log(monkeypatch: pytest.MonkeyPatch) -> Lines:
    lines = Lines()
    monkeypatch.setattr(request_context, "access_log", lines)
    return lines


def _request(port: int, body: bytes, *, path: str = "/v1/chat/completions",
             headers: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n").encode() \
        + headers + b"\r\n" + body


def _not_reading(port: int, body: bytes) -> socket.socket:
    """A client that sends its request and never reads a byte of the answer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", port))
    sock.sendall(_request(port, body))
    return sock


async def test_clients_that_stop_reading_lose_their_slots_after_send_timeout(
        access_log: Lines) -> None:
    send_timeout = 1.0
    with simulator(model="m") as sim:
        config = make_config([static_model("m", sim.url, max_concurrent=2)],
                             gateway={"send_timeout": send_timeout, "queue_timeout": 30})
        async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
            port = int(url.rsplit(":", 1)[1])
            long_stream = json.dumps(chat("m", max_tokens=10_000_000, stream=True)).encode()
            stuck = [_not_reading(port, long_stream) for _ in range(2)]
            try:
                with anyio.fail_after(10):
                    while gateway.semaphores.in_flight("m") < 2:
                        await anyio.sleep(0.01)
                began = time.monotonic()
                response = await client.post(url + "/v1/chat/completions", json=chat("m"))
                waited = time.monotonic() - began
                assert response.status_code == 200
                # The two streams first fill the socket buffers (well under a second here),
                # then stall for send_timeout; the stall is seen within a tick of it.
                assert send_timeout <= waited < send_timeout + 2.0, waited
                await all_back_to_zero(gateway, client)
                assert sim.stats()["aborted"] == 2
                assert sorted(line["error"] or "" for line in access_log.lines
                              if line["path"] == "/v1/chat/completions") == [
                    "", "send_timeout", "send_timeout"]
            finally:
                for sock in stuck:
                    sock.close()
