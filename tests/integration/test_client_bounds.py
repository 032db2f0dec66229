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

from middleware import admission, request_context
from tests.integration.test_accounting import all_back_to_zero
from tests.middleware.test_request_context import Lines
from tests.support import (
    chat,
    eventually,
    make_config,
    serving,
    sim_model,
    simulator,
    static_model,
)

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
    # Streams that outlast the test: vLLM (and so the simulator) refuses max_tokens past its
    # context.
    with simulator("--max-model-len", "10000000", model="m") as sim:
        config = make_config([static_model("m", sim.url, max_concurrent=2)],
                             gateway={"send_timeout": send_timeout, "queue_timeout": 30})
        async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
            port = int(url.rsplit(":", 1)[1])
            long_stream = json.dumps(chat("m", max_tokens=10_000_000, stream=True)).encode()
            stuck = [_not_reading(port, long_stream) for _ in range(2)]
            try:
                with anyio.fail_after(10):
                    while gateway.accounting.in_flight("m") < 2:
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


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one whole response (by its content-length) off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


async def test_a_body_sent_a_byte_at_a_time_gets_408_after_body_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission, "LINGER_S", 0.5)
    config = make_config([sim_model("m")], gateway={"body_timeout": 1.0})
    async with serving(config) as (url, gateway):
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps(chat("m")).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(_request(port, body)[:-len(body)])
            began = time.monotonic()
            for byte in body[:8]:  # a byte every 0.2 s: 1.6 s for 8 of them
                sock.sendall(bytes([byte]))
                await anyio.sleep(0.2)
            status, _, answer = await anyio.to_thread.run_sync(_response, sock)
            waited = time.monotonic() - began
        assert status == 408
        assert json.loads(answer)["error"]["code"] == "request_timeout"
        assert 1.0 <= waited < 2.5
        await eventually(lambda: gateway.admission.budget.held == 0 and not gateway.in_flight)


async def test_a_flood_of_large_bodies_past_the_budget_gets_503s_and_leaks_nothing() -> None:
    mib = 1 << 20
    with simulator("--tokens-per-second", "10", model="m") as sim:
        config = make_config([static_model("m", sim.url)],
                             gateway={"max_body_bytes": 2 * mib,
                                      "max_buffered_body_bytes": 3 * mib})
        async with serving(config) as (url, gateway), \
                httpx2.AsyncClient(timeout=30) as client:
            # Two bodies of 1 MiB fit in 3 MiB, a third does not; each answer takes 1 s.
            body = chat("m", max_tokens=10,
                        messages=[{"role": "user", "content": "x " * (mib // 2)}])
            answers: list[httpx2.Response] = []

            async def one() -> None:
                answers.append(await client.post(url + "/v1/chat/completions", json=body))

            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(one)
                await eventually(lambda: len(answers) == 8)
                assert gateway.admission.budget.held <= 3 * mib
            refused = [a for a in answers if a.status_code == 503]
            assert len(refused) == 8
            assert all(a.headers["retry-after"] == "1" for a in refused)
            assert {a.json()["error"]["code"] for a in refused} == {"body_budget_full"}
            assert sum(a.status_code == 200 for a in answers) == 2
            assert sim.stats()["requests"] == 2
            await all_back_to_zero(gateway, client)
            await eventually(lambda: gateway.admission.budget.held == 0, within=5)
