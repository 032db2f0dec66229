"""The members of a cluster prefix, on a real redis-server: one configuration for all (a process
with another is refused, naming the first differing key), and a member whose lease lapses is
told as lost by the others. On asyncio and trio."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from typing import Any

import anyio
import coredis
import pytest

from cluster.members import Membership
from kernel.config import ClusterSettings, Config, ConfigError
from tests.support import eventually, make_config, redis_server, static_model

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def config(redis_url: str, prefix: str, **model: Any) -> Config:
    cfg = make_config([static_model("a", "http://127.0.0.1:9", **model)])
    cluster = ClusterSettings(redis_url=redis_url, key_prefix=prefix, lease_s=1.0,
                              enabled=True, heartbeat=0.2)
    return dataclasses.replace(cfg, cluster=cluster)


async def test_a_process_with_another_configuration_is_refused(
        redis_url: str, anyio_backend: str) -> None:
    prefix = secrets.token_hex(6)
    async with coredis.Redis.from_url(redis_url, decode_responses=True) as client:
        first = Membership(config(redis_url, prefix, max_concurrent=4), "first")
        async with first.running(client):
            # The same configuration but for the address it binds: a member.
            same = config(redis_url, prefix, max_concurrent=4)
            same = dataclasses.replace(same, gateway=dataclasses.replace(
                same.gateway, bind="127.0.0.1:9999"))
            async with Membership(same, "same").running(client) as joined:
                assert set(joined.members) == {"first", "same"}
            other = Membership(config(redis_url, prefix, max_concurrent=5), "other")
            with pytest.raises(ConfigError) as refused:
                async with other.running(client):
                    pass
            message = str(refused.value)
            assert message.startswith('models["a"].max_concurrent = 5 here, but 4 in the cluster')
            assert "\n" not in message
        # Once the last member has left, a new configuration starts the cluster anew.
        async with Membership(config(redis_url, prefix, max_concurrent=5), "new").running(client):
            pass


async def test_a_member_whose_lease_lapses_is_lost(redis_url: str, anyio_backend: str) -> None:
    prefix = secrets.token_hex(6)
    events: list[tuple[str, str]] = []
    async with coredis.Redis.from_url(redis_url, decode_responses=True) as client:
        watcher = Membership(config(redis_url, prefix), "watcher",
                             on_event=lambda what, fields: events.append((what, fields["member"])))
        async with watcher.running(client):
            silent = Membership(config(redis_url, prefix), "silent")
            silent.attach(client)
            await silent.join()  # and never beats
            await eventually(lambda: ("member joined", "silent") in events, within=2.0)
            joined = anyio.current_time()
            await eventually(lambda: ("member lost", "silent") in events, within=3.0)
            # Within the lease (1 s) and a heartbeat of the watcher.
            assert anyio.current_time() - joined <= 1.0 + 0.5
            assert set(watcher.members) == {"watcher"}
