"""Two gateways in one event loop on a real redis-server, in front of a simulator the gateway
launches: the one that does not own the pool serves through a view of the owner's server, which
ends when the owner reaps the model as idle; its next request has the owner start the model
again. On asyncio and trio."""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from backends.states import ModelState
from kernel.config import ClusterSettings, Config
from proxy.app import Gateway
from tests.support import chat, eventually, make_config, redis_server, serving, sim_model

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def config(redis_url: str, prefix: str) -> Config:
    cfg = make_config([sim_model("m", idle_timeout=1.0)])
    cluster = ClusterSettings(redis_url=redis_url, key_prefix=prefix, lease_s=2.0,
                              enabled=True, heartbeat=0.5)
    return dataclasses.replace(cfg, cluster=cluster)


async def test_a_view_follows_the_owners_server(
        redis_url: str, tmp_path: Path, anyio_backend: str) -> None:
    cfg = config(redis_url, secrets.token_hex(6))
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(httpx2.AsyncClient(timeout=30))
        gateways: list[tuple[str, Gateway]] = [
            await stack.enter_async_context(serving(cfg)) for _ in range(2)]

        def owner_and_other() -> tuple[Gateway, tuple[str, Gateway]]:
            owners = [g for _, g in gateways if g.node and g.node.owner.holds()]
            assert len(owners) == 1
            return owners[0], next((u, g) for u, g in gateways if g is not owners[0])

        owner, (url, other) = owner_and_other()
        answer = await client.post(url + "/v1/chat/completions", json=chat("m"))
        assert answer.status_code == 200, answer.text
        real, view = owner.pool.backends["m"], other.pool.backends["m"]
        assert real.state is view.state is ModelState.READY
        assert view.address == real.address and view.mirrored and not real.mirrored
        # Idle for its idle_timeout (1 s): the owner stops its server, and the view ends.
        await eventually(lambda: view.state is real.state is ModelState.STOPPED, within=5.0)
        assert view.reason == "the pool's owner no longer serves it"
        answer = await client.post(url + "/v1/chat/completions", json=chat("m"))
        assert answer.status_code == 200, answer.text
        assert real.starts == 2 and view.address == real.address
