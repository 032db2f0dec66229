"""What a client sees when a backend is slow, down, restarting or dies mid-answer.

Every row of the passthrough's failure semantics, on real sockets, with the simulator's fault
switches; static models point at simulators the test runs, so the test can kill them.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import anyio
import httpx2
import pytest

from kernel.config import Config
from tests.support import (
    chat,
    make_config,
    raw_backend,
    serving,
    sim_model,
    simulator,
    static_model,
)

pytestmark = pytest.mark.anyio

FAST_RETRIES = {"retries": 3, "backoff_base": 0.01, "backoff_max": 0.05}


async def post(url: str, body: dict, **kwargs: object) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=30) as client:
        return await client.post(url + "/v1/chat/completions", json=body, **kwargs)


async def test_backend_down_after_retries_is_502_upstream_unavailable() -> None:
    with simulator() as sim:
        config = make_config([static_model("m", sim.url, served_name="sim")],
                             upstream=FAST_RETRIES)
        async with serving(config) as (url, gateway):
            assert (await post(url, chat("m"))).status_code == 200
            sim.process.kill()
            sim.process.wait()
            response = await post(url, chat("m"))
            assert response.status_code == 502
            assert response.json()["error"]["code"] == "upstream_unavailable"
            assert "127.0.0.1" not in response.text
            assert gateway.metrics.retries.labels("m")._value.get() == 3


async def test_a_retried_request_reaches_the_backend_once() -> None:
    with simulator() as first:
        port = int(first.url.rsplit(":", 1)[1])
        config = make_config([static_model("m", first.url, served_name="sim")],
                             upstream={"retries": 8, "backoff_base": 0.1, "backoff_max": 0.2})
        async with serving(config) as (url, _):
            assert (await post(url, chat("m"))).status_code == 200
            first.process.kill()
            first.process.wait()
            async with anyio.create_task_group() as tg:
                results = []

                async def request() -> None:
                    results.append(await post(url, chat("m")))

                tg.start_soon(request)
                await anyio.sleep(0.3)
                with simulator(port=port) as second:
                    while not results:
                        await anyio.sleep(0.05)
                    assert results[0].status_code == 200
                    assert second.stats()["requests"] == 1


async def test_no_first_byte_in_time_is_504() -> None:
    config = make_config([sim_model("m", "--tokens-per-second", "2")],
                         upstream={"timeout": 0.5})
    async with serving(config) as (url, gateway):
        response = await post(url, chat("m", max_tokens=10))
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        assert gateway.accounting.in_flight("m") == 0


def _not_reading_server(server: socket.socket, stop: threading.Event) -> None:
    """A backend that is healthy, but never reads a request body nor answers it."""
    server.settimeout(0.1)
    held = []
    while not stop.is_set():
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        if conn.recv(65536).startswith(b"GET"):
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            conn.close()
        else:
            held.append(conn)
    for conn in held:
        conn.close()


async def test_a_backend_that_does_not_take_the_request_is_504_after_the_write_timeout() -> None:
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        thread = threading.Thread(target=_not_reading_server, args=(server, stop), daemon=True)
        thread.start()
        try:
            config = make_config(
                [static_model("m", f"http://127.0.0.1:{server.getsockname()[1]}")],
                gateway={"max_body_bytes": 64 << 20},
                upstream={"write_timeout": 0.5, "timeout": 0.5, "retries": 0})
            body = chat("m", messages=[{"role": "user", "content": "x" * (24 << 20)}])
            async with serving(config) as (url, gateway):
                with anyio.fail_after(10):
                    response = await post(url, body)
                assert response.status_code == 504
                assert response.json()["error"]["code"] == "upstream_timeout"
                assert gateway.accounting.in_flight("m") == 0
        finally:
            stop.set()
            thread.join()


async def test_backend_dying_mid_stream_ends_the_stream_with_an_error_event() -> None:
    config = make_config([sim_model("m", "--die-after-tokens", "3")])
    async with serving(config) as (url, _), httpx2.AsyncClient(timeout=30) as client:
        async with client.stream("POST", url + "/v1/chat/completions",
                                 json=chat("m", max_tokens=20, stream=True)) as response:
            assert response.status_code == 200
            events = [line[6:] async for line in response.aiter_lines()
                      if line.startswith("data: ")]
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["code"] == "upstream_failed"
    assert sum("tok" in e for e in events) == 3


@contextlib.contextmanager
def faulty_backend(reply: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """A healthy backend that takes each model request whole, records its head, sends
    ``reply`` (the start of an answer, or nothing) and closes the connection."""
    heads: list[bytes] = []

    def answer(conn: socket.socket, head: bytes) -> None:
        heads.append(head)
        conn.sendall(reply)
        time.sleep(0.2)

    with raw_backend(answer) as url:
        yield url, heads


@pytest.mark.parametrize("reply", [b"", b"HTTP/1.1 200 OK\r\n"],
                         ids=["no-answer", "status-line-only"])
async def test_a_backend_that_fails_after_taking_the_request_is_502_and_never_retried(
        reply: bytes) -> None:
    # The generation may be running: a second try would run (and bill) it twice.
    with faulty_backend(reply) as (backend_url, requests):
        config = make_config([static_model("m", backend_url)], upstream=FAST_RETRIES)
        async with serving(config) as (url, gateway):
            response = await post(url, chat("m"))
            assert response.status_code == 502
            assert response.json()["error"]["code"] == "upstream_failed"
            assert "127.0.0.1" not in response.text
            assert len(requests) == 1
            assert requests[0].startswith(b"POST /v1/chat/completions ")
            assert gateway.metrics.retries.labels("m")._value.get() == 0
            assert gateway.accounting.in_flight("m") == 0




async def test_backend_dying_mid_body_cuts_the_client_connection() -> None:
    def cut_off(conn: socket.socket, head: bytes) -> None:
        """A plain JSON answer, part of it, then the backend dies."""
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000\r\n\r\n{\"partial\": ")
        time.sleep(0.2)

    with raw_backend(cut_off) as backend:
        config = make_config([static_model("m", backend)])
        async with serving(config) as (url, _), httpx2.AsyncClient(timeout=30) as client:
            with pytest.raises(httpx2.RemoteProtocolError):
                await client.post(url + "/v1/chat/completions", json=chat("m"))


async def test_backend_500_is_passed_through_once_unchanged() -> None:
    with simulator("--error-rate", "1") as sim:
        config = make_config([static_model("m", sim.url, served_name="sim")],
                             upstream=FAST_RETRIES)
        async with httpx2.AsyncClient() as client:
            direct = await client.post(sim.url + "/v1/chat/completions", json=chat("sim"))
        async with serving(config) as (url, _):
            response = await post(url, chat("m"))
        assert response.status_code == 500
        assert response.json() == direct.json()
        assert sim.stats()["requests"] == 2


async def test_retry_budget_bounds_attempts_against_a_dead_backend() -> None:
    with simulator() as sim:
        config = make_config(
            [static_model("m", sim.url, served_name="sim")],
            upstream={**FAST_RETRIES, "retry_budget_min": 5, "retry_budget_ratio": 0.1})
        async with serving(config) as (url, gateway):
            assert (await post(url, chat("m"))).status_code == 200
            sim.process.kill()
            sim.process.wait()
            statuses = []

            async def one() -> None:
                statuses.append((await post(url, chat("m"))).status_code)

            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(one)
            assert statuses == [502] * 50
            # 51 requests in the window: at most 5 + 0.1 * 51 retries.
            assert gateway.metrics.retries.labels("m")._value.get() <= 10


async def test_pool_exhaustion_is_503_at_once_without_retry(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The pool is sized to what the slots let be in flight; one connection for four slots is
    # the mis-sizing this answer guards against.
    monkeypatch.setattr(Config, "upstream_pool_size", property(lambda self: 1))
    config = make_config(
        [sim_model("m", "--tokens-per-second", "10", max_concurrent=4)],
        gateway={"max_concurrent": 1, "max_models_concurrent": 1},
        upstream={**FAST_RETRIES, "pool_timeout": 0.2})
    async with serving(config) as (url, gateway):
        assert (await post(url, chat("m", max_tokens=1))).status_code == 200
        statuses = []

        async def one(tokens: int) -> None:
            statuses.append((await post(url, chat("m", max_tokens=tokens))).status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 10)
            await anyio.sleep(0.2)
            tg.start_soon(one, 1)
        assert sorted(statuses) == [200, 503]
        assert gateway.metrics.retries.labels("m")._value.get() == 0
