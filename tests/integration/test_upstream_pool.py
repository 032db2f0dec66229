"""The upstream connection pool: sized as check-config says, bounded, and reused."""

from __future__ import annotations

import contextlib

import anyio
import httpx2
import pytest

from tests.support import chat, make_config, serving, simulator, static_model

pytestmark = pytest.mark.anyio


async def test_three_models_by_fifty_streams_stay_within_the_pool_and_reuse_it() -> None:
    with contextlib.ExitStack() as stack:
        sims = [stack.enter_context(simulator("--tokens-per-second", "200", model=f"m{i}"))
                for i in range(3)]
        # No background health check while the connections are counted.
        config = make_config([static_model(f"m{i}", sim.url, health_interval=3600.0)
                              for i, sim in enumerate(sims)],
                             gateway={"max_concurrent": 50, "max_models_concurrent": 3})
        assert config.upstream_pool_size == config.upstream_keepalive_size == 150
        async with serving(config) as (url, gateway), httpx2.AsyncClient(
                timeout=60, limits=httpx2.Limits(max_connections=200)) as client:
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
            # own reads of their stats (tests.support.HTTP keeps its connection alive).
            before = [sim.stats() for sim in sims]
            await round_of_150()
            await round_of_150()
            after = [sim.stats() for sim in sims]
        assert statuses == [200] * 300
        opened = [a["connections"] - b["connections"] for a, b in zip(after, before, strict=True)]
        # Each simulator served 100 streams, at most 50 at a time: the gateway opened at most 50
        # connections to it (150 in all, the pool), and the second round ran on the first
        # round's connections.
        assert all(0 < n <= 50 for n in opened)
        assert sum(opened) <= config.upstream_pool_size
