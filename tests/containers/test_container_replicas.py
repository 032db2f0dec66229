"""Two replicas of a model in real containers on a real Podman: a burst adds the second, both
serve, both are removed when idle; a restarted gateway adopts each replica as its own."""

from __future__ import annotations

import anyio
import httpx2
import pytest

from backends.pool import ModelState
from tests.support import chat, eventually, make_config, serving

from .conftest import containers_of
from .test_container_models import config_with, container_model

pytestmark = [pytest.mark.anyio, pytest.mark.containers]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiodocker runs on asyncio only


async def test_a_burst_adds_a_second_container_both_serve_and_both_go_when_idle(
        engine_url: str, instance: str) -> None:
    model = container_model("a", "--tokens-per-second", "20", max_replicas=2, max_concurrent=2,
                            scale_up_after=0.3, idle_timeout=2.0)
    config = config_with(engine_url, instance, [model])
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=60) as client:
        replicas = gateway.pool.replicas["a"]
        statuses: list[int] = []
        served: set[int] = set()

        async def one() -> None:
            async with client.stream("POST", url + "/v1/chat/completions",
                                     json=chat("a", max_tokens=10, stream=True)) as r:
                async for _ in r.aiter_raw():
                    pass
                statuses.append(r.status_code)

        async def watch() -> None:
            # Which replicas hold a stream, all along (a look at each answer's start can come
            # after its half-second stream, on a loaded machine).
            while True:
                served.update(b.replica for b in replicas if b.leases)
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as watching:
            watching.start_soon(watch)
            async with anyio.create_task_group() as tg:
                for _ in range(12):
                    tg.start_soon(one)
                await eventually(lambda: all(r.state is ModelState.READY for r in replicas), 30)
                names = [line.split()[0] for line in containers_of(instance)]
                assert names == [f"vllm-gateway-{instance}-a", f"vllm-gateway-{instance}-a-r1"]
            watching.cancel_scope.cancel()
        assert statuses == [200] * 12
        assert served == {0, 1}
        await eventually(lambda: all(r.state is ModelState.STOPPED for r in replicas), 20)
        assert containers_of(instance) == []


async def test_a_restarted_gateway_adopts_each_replica(engine_url: str, instance: str) -> None:
    models = [container_model("a", max_replicas=2, min_replicas=2)]
    keep = make_config(models, gateway={"instance": instance},
                       engines={"local": {"url": engine_url, "on_shutdown": "keep"}})
    async with serving(keep) as (_, gateway):
        await eventually(lambda: all(r.state is ModelState.READY
                                     for r in gateway.pool.replicas["a"]), 30)
    before = containers_of(instance)
    assert [line.split()[1] for line in before] == ["running", "running"]
    async with serving(config_with(engine_url, instance, models)) as (url, gateway):
        replicas = gateway.pool.replicas["a"]
        await eventually(lambda: all(r.state is ModelState.READY for r in replicas), 30)
        assert containers_of(instance) == before
        for _ in range(2):
            async with httpx2.AsyncClient(timeout=60) as client:
                assert (await client.post(url + "/v1/chat/completions",
                                          json=chat("a"))).status_code == 200
    assert containers_of(instance) == []
