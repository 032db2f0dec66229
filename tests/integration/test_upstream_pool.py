"""The upstream connection pool: sized as check-config says, bounded, and reused."""

from __future__ import annotations

import contextlib

import anyio
import httpx2
import pytest

from tests.support import (
    HeldBackend,
    Simulator,
    chat,
    eventually,
    make_config,
    serving,
    serving_app,
    simulator,
    static_model,
)

pytestmark = pytest.mark.anyio


def client_limits(connections: int) -> httpx2.Limits:
    """The test client's connections, each kept idle 2 s, well within the test server's
    keep-alive (hypercorn's 5 s): on a loaded machine a round outlasts that, and a connection
    idle since its answer of the first round would be closed by the server as the next round
    sent on it (the client's race, not the gateway's)."""
    return httpx2.Limits(max_connections=connections, keepalive_expiry=2.0)


def connections(sim: Simulator) -> int:
    """The connections the simulator has accepted, this read's own among them."""
    stats = httpx2.get(sim.url + "/sim/stats", headers={"connection": "close"}, timeout=5)
    return int(stats.json()["connections"])


async def test_three_models_by_fifty_streams_stay_within_the_pool_and_reuse_it() -> None:
    with contextlib.ExitStack() as stack:
        # Idle connections kept a minute on both sides (the simulators' keep-alive, the
        # gateway's keepalive_expiry): on a loaded machine a round outlasts their 5 s and 4 s,
        # and a connection that expired between its streams would be opened again and counted.
        sims = [stack.enter_context(simulator("--tokens-per-second", "200", "--keep-alive", "60",
                                              model=f"m{i}"))
                for i in range(3)]
        # No background health check while the connections are counted.
        config = make_config([static_model(f"m{i}", sim.url, health_interval=3600.0)
                              for i, sim in enumerate(sims)],
                             gateway={"max_concurrent": 50, "max_models_concurrent": 3},
                             upstream={"keepalive_expiry": 60.0})
        assert config.upstream_pool_size == config.upstream_keepalive_size == 150
        async with serving(config) as (url, gateway), httpx2.AsyncClient(
                timeout=60, limits=client_limits(200)) as client:
            statuses: list[int] = []

            async def stream(model: str) -> None:
                async with client.stream("POST", url + "/v1/chat/completions",
                                         json=chat(model, max_tokens=10, stream=True)) as r:
                    async for _ in r.aiter_raw():
                        pass
                    statuses.append(r.status_code)

            async def round_of_150() -> None:
                async with anyio.create_task_group() as tg:
                    for i in range(150):
                        tg.start_soon(stream, f"m{i % 3}")

            for i in range(3):
                await gateway.pool.load(f"m{i}")
            # What the simulators have seen so far: the pool's health checks and this test's
            # own reads of their stats, each on a connection of its own (a kept-alive one could
            # expire during a slow round, and its reopening would count).
            before = [connections(sim) for sim in sims]
            await round_of_150()
            await round_of_150()
            after = [connections(sim) for sim in sims]
        assert statuses == [200] * 300
        opened = [a - b - 1 for a, b in zip(after, before, strict=True)]
        # Each simulator served 100 streams, at most 50 at a time: the gateway opened at most 50
        # connections to it (150 in all, the pool), and the second round ran on the first
        # round's connections.
        assert all(0 < n <= 50 for n in opened)
        assert sum(opened) <= config.upstream_pool_size


async def test_a_full_pool_is_kept_alive_for_the_next_round() -> None:
    """Every connection of a full pool is open at once (the answers are held), and all of them
    are kept: the second round opens none (on trio the keep-alive size is httpx2's own limit)."""
    backend = HeldBackend()
    async with contextlib.AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(serving_app(backend)) for _ in range(3)]
        config = make_config([static_model(f"m{i}", u) for i, u in enumerate(urls)],
                             gateway={"max_concurrent": 10, "max_models_concurrent": 3})
        full = config.upstream_pool_size
        url, gateway = await stack.enter_async_context(serving(config))
        client = await stack.enter_async_context(httpx2.AsyncClient(
            timeout=30, limits=client_limits(2 * full)))
        statuses: list[int] = []

        async def one(model: str) -> None:
            response = await client.post(url + "/v1/chat/completions", json=chat(model))
            statuses.append(response.status_code)

        async def held_round() -> None:
            backend.release = anyio.Event()
            expected = backend.received + full
            async with anyio.create_task_group() as tg:
                for i in range(full):
                    tg.start_soon(one, f"m{i % 3}")
                await eventually(lambda: backend.received == expected)
                assert len(backend.connections) == full
                backend.release.set()
            # The last lease ends after its connection went back to the pool.
            await eventually(lambda: not any(b.leases for b in gateway.pool.backends.values()))

        await held_round()
        await held_round()
    assert statuses == [200] * 2 * full


async def test_a_model_with_its_own_max_concurrent_gets_a_connection_for_each_slot() -> None:
    """A model's ``max_concurrent = 200`` above the gateway's 50 x 3 models: its 151st request
    and every one after it reach the backend (issue 16: they were 503 upstream_pool_exhausted)."""
    backend = HeldBackend()
    async with serving_app(backend) as backend_url:
        config = make_config([static_model("big", backend_url, max_concurrent=200)],
                             gateway={"max_concurrent": 50, "max_models_concurrent": 3})
        async with serving(config) as (url, _), httpx2.AsyncClient(
                timeout=30, limits=httpx2.Limits(max_connections=250)) as client:
            statuses: list[int] = []

            async def one() -> None:
                response = await client.post(url + "/v1/chat/completions", json=chat("big"))
                statuses.append(response.status_code)

            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    tg.start_soon(one)
                await eventually(lambda: backend.received == 200, within=30)
                backend.release.set()
    assert statuses == [200] * 200
