"""Redis unreachable and back, empty: the accounting refuses with 503 ``state_unavailable``
(never skips a limit) and says why, and once Redis answers again every process registers what it
holds, so the counts are exact again within seconds. On asyncio and trio."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import anyio
import pytest

from cluster.accounting import RedisAccounting
from kernel.config import ClusterSettings, Config
from kernel.errors import GatewayError
from tests.support import make_config, redis_server, static_model

pytestmark = pytest.mark.anyio


def config(redis_url: str) -> Config:
    cfg = make_config([static_model("a", "http://127.0.0.1:9", max_concurrent=1)])
    cluster = ClusterSettings(redis_url=redis_url, key_prefix="outage", lease_s=3.0,
                              enabled=True, heartbeat=0.5)
    return dataclasses.replace(cfg, cluster=cluster)


async def test_an_outage_refuses_then_the_counts_are_exact_again(
        tmp_path: Path, anyio_backend: str) -> None:
    first = contextlib.ExitStack()
    url = first.enter_context(redis_server(tmp_path))
    cfg = config(url)
    one, other = RedisAccounting(cfg), RedisAccounting(cfg)
    with first:
        async with one.running(), other.running():
            held = await one.join("a")
            assert held is not None and await one.try_acquire(held)
            first.close()  # Redis stops, and with it everything it held
            with pytest.raises(GatewayError) as refused:
                await other.join("a")
            assert (refused.value.status, refused.value.code) == (503, "state_unavailable")
            assert refused.value.retry_after is not None
            assert other.error is not None and "Redis unreachable" in other.error
            with redis_server(tmp_path):  # back, empty
                async def exact() -> bool:
                    # The slot the first holds is registered again: the other waits for it.
                    with contextlib.suppress(GatewayError):  # not reconnected yet
                        late = await other.join("a")
                        assert late is not None
                        taken = await other.try_acquire(late)
                        await other.leave(late)
                        return not taken and other.in_flight("a") == 1
                    return False

                # Seconds (a reconnect, a heartbeat of 0.5 s): 10 leaves room for a loaded machine.
                with anyio.fail_after(10.0):
                    while not await exact():
                        await anyio.sleep(0.1)
                await one.leave(held)
                again = await other.join("a")
                assert again is not None and await other.try_acquire(again)
                await other.leave(again)
