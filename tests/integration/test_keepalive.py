"""Idle upstream connections are closed before the backend closes them.

vLLM's HTTP server closes a connection after 5 s idle (the simulator too, by default). A
gateway that keeps it longer can send a request down a connection the backend is closing, and
the client gets 502 ``upstream_failed``. On loopback the backend's close reaches the gateway at
once and that window is microseconds wide; between two hosts it is a round trip wide. A relay
that delivers each direction late, as a network does, makes the window real here.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx2
import pytest
from anyio.abc import SocketAttribute, SocketStream

from tests.support import chat, gateway_process, simulator

pytestmark = pytest.mark.anyio

LATENCY = 0.05  # one way: the backend's close reaches the gateway 50 ms late
REQUESTS = 12  # one minute
BACKEND_KEEP_ALIVE = 5.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the gateways run in their own processes, one per transport


async def _pipe(source: SocketStream, sink: SocketStream, scope: anyio.CancelScope) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        while True:
            data = await source.receive()
            await anyio.sleep(LATENCY)
            await sink.send(data)
    # One side closed: so does the other, as late as the bytes.
    await anyio.sleep(LATENCY)
    scope.cancel()


async def _relay(target: int, client: SocketStream) -> None:
    async with client, await anyio.connect_tcp("127.0.0.1", target) as backend:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_pipe, client, backend, tg.cancel_scope)
            tg.start_soon(_pipe, backend, client, tg.cancel_scope)


@contextlib.asynccontextmanager
async def delaying_relay(target: int) -> AsyncIterator[str]:
    """A TCP relay to ``127.0.0.1:target`` that delays each direction by ``LATENCY``."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, functools.partial(_relay, target))
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            tg.cancel_scope.cancel()


async def _spaced_requests(url: str) -> list[int]:
    """Requests for a minute, each sent 4.9 to 5.1 s after the previous answer ended."""
    statuses = []
    async with httpx2.AsyncClient(timeout=30) as client:
        for i in range(REQUESTS):
            response = await client.post(url + "/v1/chat/completions", json=chat("sim"))
            statuses.append(response.status_code)
            await anyio.sleep(BACKEND_KEEP_ALIVE - 0.1 + 0.2 * i / (REQUESTS - 1))
    return statuses


@pytest.mark.timeout(180)
async def test_requests_spaced_at_the_backends_keep_alive_all_succeed(tmp_path: Path) -> None:
    with simulator("--keep-alive", str(BACKEND_KEEP_ALIVE)) as sim, contextlib.ExitStack() as s:
        async with delaying_relay(int(sim.url.rsplit(":", 1)[1])) as relay:
            config = ("[[models]]\nname = \"sim\"\nlauncher = \"static\"\n"
                      f"url = \"{relay}\"\nstartup_timeout = 5.0\n")
            urls = {}
            for worker in ("uvloop", "trio"):  # aiohttp and httpx2
                directory = tmp_path / worker
                directory.mkdir()
                urls[worker], _ = s.enter_context(
                    gateway_process(config, directory, "--worker", worker))
            statuses: dict[str, list[int]] = {}

            async def run(worker: str) -> None:
                statuses[worker] = await _spaced_requests(urls[worker])

            began = time.monotonic()
            async with anyio.create_task_group() as tg:
                for worker in urls:
                    tg.start_soon(run, worker)
            assert time.monotonic() - began >= 60
    assert statuses == {"uvloop": [200] * REQUESTS, "trio": [200] * REQUESTS}
