"""The streaming passthrough on real sockets: incremental chunks, disconnects, headers."""

from __future__ import annotations

import anyio
import httpx2
import pytest

from backends.pool import ModelState
from proxy.app import Gateway
from tests.support import (
    chat,
    eventually,
    make_config,
    serving,
    serving_app,
    sim_model,
    wait_until,
)

pytestmark = pytest.mark.anyio


async def test_chunks_arrive_as_the_backend_sends_them() -> None:
    config = make_config([sim_model("slow", "--tokens-per-second", "20")])
    async with serving(config) as (url, _), httpx2.AsyncClient(timeout=30) as client:
        arrivals = []
        async with client.stream("POST", url + "/v1/chat/completions",
                                 json=chat("slow", max_tokens=10, stream=True)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-accel-buffering"] == "no"
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    arrivals.append((anyio.current_time(), line))
        assert arrivals[-1][1] == "data: [DONE]"
        # 10 tokens at 20/s: the stream lasts about half a second; the first token must not wait
        # for the last.
        assert arrivals[-1][0] - arrivals[1][0] > 0.3


async def test_client_disconnect_aborts_the_generation_at_the_backend() -> None:
    config = make_config([sim_model("slow", "--tokens-per-second", "20")])
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        async with client.stream("POST", url + "/v1/chat/completions",
                                 json=chat("slow", max_tokens=1000, stream=True)) as response:
            async for _ in response.aiter_lines():
                break
        backend = gateway.pool.backends["slow"]
        stats_url = backend.address + "/sim/stats"

        async def aborted() -> dict:
            return (await client.get(stats_url)).json()

        for _ in range(100):
            stats = await aborted()
            if stats["aborted"] == 1:
                break
            await anyio.sleep(0.02)
        assert stats["aborted"] == 1
        assert stats["running"] == 0
        assert gateway.accounting.in_flight("slow") == 0
        assert gateway.accounting.depth("slow") == 0
        assert backend.leases == 0


async def test_request_id_is_echoed_and_forwarded() -> None:
    config = make_config([sim_model("m")])
    async with serving(config) as (url, _), httpx2.AsyncClient(timeout=30) as client:
        response = await client.post(url + "/v1/chat/completions", json=chat("m"),
                                     headers={"x-request-id": "abc-123"})
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "abc-123"
        fresh = await client.post(url + "/v1/chat/completions", json=chat("m"))
        assert len(fresh.headers["x-request-id"]) == 24


def test_wait_until_helper_reports_failure() -> None:
    with pytest.raises(AssertionError):
        wait_until(lambda: False, timeout=0.05)


async def test_leaving_before_the_first_byte_frees_the_slot_and_aborts_the_generation() -> None:
    # A non-streamed answer of 20 tokens at 2 tokens/s: the headers would come after 10 s.
    config = make_config([sim_model("slow", "--tokens-per-second", "2")])
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        await gateway.pool.load("slow")
        with anyio.move_on_after(0.5):
            await client.post(url + "/v1/chat/completions", json=chat("slow", max_tokens=20))
        backend = gateway.pool.backends["slow"]
        with anyio.fail_after(2):
            while gateway.accounting.in_flight("slow") or backend.leases:
                await anyio.sleep(0.01)
        stats_url = backend.address + "/sim/stats"
        with anyio.fail_after(2):
            while (await client.get(stats_url)).json()["aborted"] != 1:
                await anyio.sleep(0.02)


async def test_leaving_during_a_cold_start_frees_the_slot_and_the_start_goes_on() -> None:
    config = make_config([sim_model("cold", "--startup-delay", "1.5")])
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        with anyio.move_on_after(0.3):
            await client.post(url + "/v1/chat/completions", json=chat("cold"))
        with anyio.fail_after(1):
            while gateway.accounting.in_flight("cold") or gateway.pool.backends["cold"].waiting:
                await anyio.sleep(0.01)
        response = await client.post(url + "/v1/chat/completions", json=chat("cold"))
        assert response.status_code == 200
        assert gateway.pool.backends["cold"].starts == 1


async def test_a_plain_answer_leaves_the_gateway_in_one_body_message(
        anyio_backend: str) -> None:
    """aiohttp (asyncio) says when the body is read to its end, so the last chunk ends the
    answer itself; httpx2 (trio) cannot tell until its iterator ends, so a closing message
    follows. Either way the client gets the whole answer."""
    gateway = Gateway(make_config([sim_model("m")]))
    bodies: list[dict] = []

    async def recording(scope: dict, receive: object, send: object) -> None:
        async def record(message: dict) -> None:
            if message["type"] == "http.response.body":
                bodies.append(message)
            await send(message)  # type: ignore[operator]

        await gateway(scope, receive, record)

    async with serving_app(recording) as url, httpx2.AsyncClient(timeout=30) as client:
        bodies.clear()
        response = await client.post(url + "/v1/chat/completions", json=chat("m"))
    assert response.status_code == 200
    assert response.json()["object"] == "chat.completion"
    more = [message.get("more_body", False) for message in bodies]
    assert more == ([False] if anyio_backend == "asyncio" else [True, False])
    assert b"".join(message.get("body", b"") for message in bodies) == response.content


async def test_a_stream_longer_than_the_idle_timeout_is_use_until_its_end() -> None:
    # 30 tokens at 10/s: the stream outlasts the idle timeout by half.
    idle_timeout = 2.0
    config = make_config([sim_model("m", "--tokens-per-second", "10",
                                    idle_timeout=idle_timeout)])
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        await gateway.pool.load("m")
        backend = gateway.pool.backends["m"]
        began = anyio.current_time()
        async with client.stream("POST", url + "/v1/chat/completions",
                                 json=chat("m", max_tokens=30, stream=True)) as response:
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        ended = anyio.current_time()
        assert lines[-1] == "data: [DONE]"
        assert ended - began > idle_timeout
        await anyio.sleep(idle_timeout * 0.75)
        assert backend.state is ModelState.READY
        await eventually(lambda: backend.state is ModelState.STOPPED)
        assert anyio.current_time() - ended >= idle_timeout
        assert backend.stop_reason == "idle"
