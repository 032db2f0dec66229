"""A finished request leaves nothing for the garbage collector.

Every object a request makes must be freed by reference counting when it ends. One reference
cycle per request (say, the server's stream object reached back through the request's state)
keeps dozens of objects alive until a collection, and the collector's passes then cost CPU in
proportion to the request rate.
"""

from __future__ import annotations

import gc
import json
import socket

import anyio
import pytest

from tests.support import chat, make_config, serving, sim_model

pytestmark = pytest.mark.anyio

REQUESTS = 100


def _keep_alive_requests(port: int, count: int) -> list[int]:
    """``count`` chat completions over one kept-alive connection, with a blocking socket (the
    client makes no garbage of its own); the statuses."""
    body = json.dumps(chat("m")).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n"
               b"content-type: application/json\r\ncontent-length: "
               + str(len(body)).encode() + b"\r\n\r\n" + body)
    statuses = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        for _ in range(count):
            sock.sendall(request)
            statuses.append(int(reader.readline().split()[1]))
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            reader.read(length)
    return statuses


async def test_finished_requests_leave_no_reference_cycles() -> None:
    async with serving(make_config([sim_model("m")])) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        # The model's start, the upstream connection and every lazily made object first.
        assert await anyio.to_thread.run_sync(_keep_alive_requests, port, 5) == [200] * 5
        gc.collect()
        gc.disable()
        try:
            statuses = await anyio.to_thread.run_sync(_keep_alive_requests, port, REQUESTS)
            unreachable = gc.collect()
        finally:
            gc.enable()
    assert statuses == [200] * REQUESTS
    # A cycle per request left ~27 objects each here (2,700); what may be left is the
    # connection's (hypercorn's trio server leaves its ~50 to the collector), not the requests'.
    assert unreachable < REQUESTS
