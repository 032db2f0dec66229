"""The predecessor's load scenarios and a disconnect soak, on real sockets.

After each, every gateway counter is back to zero and the simulators run nothing.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import anyio
import httpx2
import pytest

from proxy.app import Gateway
from tests.support import (
    HeldBackend,
    chat,
    gateway_process,
    make_config,
    serving,
    serving_app,
    sim_model,
)

pytestmark = pytest.mark.anyio


def counters(gateway: Gateway) -> list[int]:
    return [n for model in gateway.config.models for n in (
        gateway.accounting.depth(model.name), gateway.accounting.in_flight(model.name),
        gateway.pool.backends[model.name].leases)]


async def sim_running(client: httpx2.AsyncClient, gateway: Gateway) -> int:
    total = 0
    for backend in gateway.pool.backends.values():
        if backend.address:
            total += (await client.get(backend.address + "/sim/stats")).json()["running"]
    return total


async def all_back_to_zero(gateway: Gateway, client: httpx2.AsyncClient) -> None:
    """The client may read the last byte a moment before the gateway's layers unwind."""
    with anyio.fail_after(5):
        while any(counters(gateway)) or await sim_running(client, gateway):
            await anyio.sleep(0.02)


def big_client() -> httpx2.AsyncClient:
    return httpx2.AsyncClient(timeout=60, limits=httpx2.Limits(max_connections=1100))


async def test_three_models_with_fifty_concurrent_each_all_succeed() -> None:
    models = [sim_model(f"m{i}", "--tokens-per-second", "100") for i in range(3)]
    config = make_config(models, gateway={"max_concurrent": 50, "max_models_concurrent": 3})
    async with serving(config) as (url, gateway), big_client() as client:
        statuses: list[int] = []

        async def one(model: str) -> None:
            response = await client.post(url + "/v1/chat/completions",
                                         json=chat(model, max_tokens=10))
            statuses.append(response.status_code)

        async with anyio.create_task_group() as tg:
            for i in range(150):
                tg.start_soon(one, f"m{i % 3}")
        assert statuses == [200] * 150
        await all_back_to_zero(gateway, client)


def scrape(text: str, name: str, **labels: str) -> float:
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_burst_gets_429_for_the_excess_only(tmp_path: Path) -> None:
    # The backend holds every answer until the burst is over: exactly max_concurrent +
    # max_queue_size requests are admitted, the rest are refused at once, none is lost.
    # The gateway runs as its own process, as deployed; the test holds the backend.
    backend = HeldBackend()
    async with serving_app(backend) as backend_url:
        config = f"""
[gateway]
max_concurrent = 50
max_queue_size = 200
[[models]]
name = "m"
launcher = "static"
url = "{backend_url}"
"""
        with gateway_process(config, tmp_path) as (url, _):
            async with big_client() as client:
                statuses: list[int] = []

                async def one() -> None:
                    response = await client.post(url + "/v1/chat/completions",
                                                 json=chat("m"))
                    statuses.append(response.status_code)
                    if response.status_code == 429:
                        assert int(response.headers["retry-after"]) >= 1
                        assert response.json()["error"]["code"] == "queue_full"

                async with anyio.create_task_group() as tg:
                    for _ in range(1000):
                        tg.start_soon(one)
                    # The excess is refused at once; the admitted reach the backend once the
                    # model's first health check passes.
                    with anyio.fail_after(60):
                        while len(statuses) < 750 or backend.received < 50:
                            await anyio.sleep(0.05)
                    metrics = (await client.get(url + "/metrics")).text
                    assert backend.received == 50
                    assert scrape(metrics, "gateway_queue_depth", model="m") == 200
                    assert scrape(metrics, "gateway_in_flight", model="m") == 50
                    backend.release.set()
                with anyio.fail_after(5):
                    while True:
                        metrics = (await client.get(url + "/metrics")).text
                        if not scrape(metrics, "gateway_in_flight", model="m"):
                            break
                        await anyio.sleep(0.02)
            assert statuses.count(200) == 250
            assert statuses.count(429) == 750
            assert backend.received == 250
            assert scrape(metrics, "gateway_rejected_total", model="m", reason="queue_full") == 750
            assert scrape(metrics, "gateway_queue_depth", model="m") == 0
            assert scrape(metrics, "gateway_in_flight", model="m") == 0


async def test_a_client_leaving_the_queue_is_uncounted_at_once() -> None:
    config = make_config([sim_model("m", "--tokens-per-second", "10")],
                         gateway={"max_concurrent": 1})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        await gateway.pool.load("m")
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(client.post, url + "/v1/chat/completions",
                                            json=chat("m", max_tokens=30)))
            while gateway.accounting.in_flight("m") == 0:
                await anyio.sleep(0.01)
            with anyio.move_on_after(0.3):
                await client.post(url + "/v1/chat/completions", json=chat("m"))
            assert gateway.accounting.in_flight("m") == 1
            with anyio.fail_after(0.5):
                while gateway.accounting.depth("m"):
                    await anyio.sleep(0.01)
            assert gateway.metrics.rejected.labels("m", "client_disconnected")._value.get() == 1


async def test_disconnect_soak_leaves_every_counter_at_zero(tmp_path: Path) -> None:
    rng = random.Random(1234)
    models = [sim_model(f"m{i}", "--tokens-per-second", "200") for i in range(2)]
    config = make_config(models, gateway={"max_concurrent": 8, "max_queue_size": 1000})
    async with serving(config) as (url, gateway), big_client() as client:
        outcomes = {"done": 0, "left": 0}

        async def one(i: int) -> None:
            model = f"m{i % 2}"
            stream = rng.random() < 0.5
            body = chat(model, max_tokens=rng.randint(1, 20), stream=stream)
            if rng.random() < 0.3:
                with anyio.move_on_after(rng.uniform(0.0, 0.15)):
                    async with client.stream("POST", url + "/v1/chat/completions",
                                             json=body) as response:
                        async for _ in response.aiter_raw():
                            pass
                    return
                outcomes["left"] += 1
                return
            response = await client.post(url + "/v1/chat/completions", json=body)
            assert response.status_code == 200
            outcomes["done"] += 1

        async with anyio.create_task_group() as tg:
            for i in range(1000):
                tg.start_soon(one, i)
                if i % 100 == 99:
                    await anyio.sleep(0.05)
        assert outcomes["left"] > 100
        await all_back_to_zero(gateway, client)
