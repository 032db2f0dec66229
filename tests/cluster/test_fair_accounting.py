"""The tenants' order in the queues kept in Redis, across processes (two accountings on one
real redis-server and key prefix, as two gateway processes would be): a tenant's
``max_concurrent`` holds over both, a waiter in one is woken at once when the other gives a slot
back, a process that dies without a word gives its tenant's slots back within its lease, a
Redis restarted empty learns again which tenant holds what, and each tenant's requests are
counted over both (``/admin/tenants`` too, of two gateways in front of one backend). The order
itself (priorities with their bound, weights) is ``tests/accounting/test_tenants.py``'s, run on
Redis too. On asyncio and trio."""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import Iterator
from pathlib import Path

import anyio
import coredis
import httpx2
import pytest

from cluster.fair_accounting import FairRedisAccounting, redis_accounting
from cluster.script import LuaScript
from kernel.config import ClusterSettings, Config, TenantSettings
from kernel.errors import GatewayError
from tests.support import (
    HeldBackend,
    chat,
    eventually,
    make_config,
    redis_server,
    serving,
    serving_app,
    sim_model,
    static_model,
)

pytestmark = pytest.mark.anyio

LEASE_S = 1.0


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def config(redis_url: str, *tenants: dict[str, object]) -> Config:
    cfg = make_config(
        [sim_model("a", max_concurrent=4, max_queue_size=10),
         sim_model("b", max_concurrent=4, max_queue_size=10)],
        gateway={"queue_timeout": 10.0, "max_models_concurrent": 4}, tenants=list(tenants))
    cluster = ClusterSettings(redis_url=redis_url, key_prefix=secrets.token_hex(6),
                              lease_s=LEASE_S, enabled=True, heartbeat=0.3)
    return dataclasses.replace(cfg, cluster=cluster)


def tenant(cfg: Config, name: str) -> TenantSettings:
    return next(t for t in cfg.tenants if t.name == name)


async def test_a_tenants_bound_holds_across_processes(
        redis_url: str, anyio_backend: str) -> None:
    cfg = config(redis_url, {"name": "capped", "max_concurrent": 2}, {"name": "other"})
    capped, other = tenant(cfg, "capped"), tenant(cfg, "other")
    one, two = redis_accounting(cfg), redis_accounting(cfg)
    assert isinstance(one, FairRedisAccounting)
    async with one.running(), two.running():
        held = [await one.join(model, capped) for model in "ab"]
        for ticket in held:
            assert ticket is not None and await one.try_acquire(ticket)
        # The other process's request of the tenant waits, though slots of b are free...
        waiter = await two.join("b", capped)
        assert waiter is not None and not await two.try_acquire(waiter)
        # ...without holding up another tenant's behind it.
        late = await two.join("b", other)
        assert late is not None and await two.try_acquire(late)
        assert await two.in_flight_by_tenant("default") == {"capped": 3, "other": 1}
        async with anyio.create_task_group() as tg:
            got: list[float] = []

            async def wait() -> None:
                began = anyio.current_time()
                assert await two.acquire(waiter)
                got.append(anyio.current_time() - began)

            tg.start_soon(wait)
            await anyio.sleep(0.1)
            assert not got
            await one.leave(held[0])
        # Woken by its inbox, not by the once-a-second check.
        assert got[0] < 0.6, got
        await one.leave(held[1])
        for ticket in (waiter, late):
            await two.leave(ticket)
        assert await one.in_flight_by_tenant("default") == {"capped": 0, "other": 0}


async def test_a_dead_processs_slots_go_back_to_its_tenant_within_the_lease(
        redis_url: str, anyio_backend: str) -> None:
    cfg = config(redis_url, {"name": "capped", "max_concurrent": 1}, {"name": "other"})
    capped = tenant(cfg, "capped")
    dead = FairRedisAccounting(cfg)
    async with coredis.Redis.from_url(redis_url, decode_responses=True) as client:
        # A process that registers, takes its tenant's one slot, and never beats again.
        dead._script = LuaScript(client, dead.script)
        await dead._beat()
        held = await dead.join("a", capped)
        assert held is not None and await dead.try_acquire(held)
        live = FairRedisAccounting(cfg)
        async with live.running():
            waiter = await live.join("b", capped)
            assert waiter is not None and not await live.try_acquire(waiter)
            began = anyio.current_time()
            assert await live.acquire(waiter)
            # The lease, and the once-a-second check that sweeps it.
            assert anyio.current_time() - began < LEASE_S + 1.5
            assert await live.in_flight_by_tenant("default") == {"capped": 1}
            await live.leave(waiter)


async def test_without_tenants_rules_the_one_tenant_counts_every_processs_requests(
        redis_url: str, anyio_backend: str) -> None:
    cfg = config(redis_url)
    assert not cfg.fair_queues
    one, two = redis_accounting(cfg), redis_accounting(cfg)
    assert type(one) is not FairRedisAccounting
    async with one.running(), two.running():
        mine, theirs = await one.join("a"), await two.join("b")
        assert mine is not None and theirs is not None
        assert await two.in_flight_by_tenant("default") == {"default": 2}
        await one.leave(mine)
        assert await two.in_flight_by_tenant("default") == {"default": 1}
        await two.leave(theirs)
        assert await one.in_flight_by_tenant("default") == {"default": 0}


async def test_a_redis_restarted_empty_learns_again_what_each_tenant_holds(
        tmp_path: Path, anyio_backend: str) -> None:
    first = contextlib.ExitStack()
    cfg = config(first.enter_context(redis_server(tmp_path)),
                 {"name": "capped", "max_concurrent": 1}, {"name": "other"})
    capped = tenant(cfg, "capped")
    one, two = redis_accounting(cfg), redis_accounting(cfg)
    with first:
        async with one.running(), two.running():
            held = await one.join("a", capped)
            assert held is not None and await one.try_acquire(held)
            first.close()  # Redis stops, and with it everything it held
            with redis_server(tmp_path):  # back, empty
                async def registered() -> bool:
                    with contextlib.suppress(GatewayError):  # not reconnected yet
                        return await two.in_flight_by_tenant("default") == {"capped": 1}
                    return False

                with anyio.fail_after(5.0):
                    while not await registered():
                        await anyio.sleep(0.1)
                # Its one slot is the tenant's again: another of its requests waits.
                late = await two.join("b", capped)
                assert late is not None and not await two.try_acquire(late)
                await one.leave(held)
                assert await two.try_acquire(late)
                await two.leave(late)


async def test_two_gateways_hold_a_tenants_bound_and_count_its_requests_together(
        redis_url: str, anyio_backend: str) -> None:
    keys = {"capped": "sk-capped-000000000001", "other": "sk-other-0000000000001"}
    backend = HeldBackend()
    async with contextlib.AsyncExitStack() as stack:
        backend_url = await stack.enter_async_context(serving_app(backend))
        cfg = make_config(
            [static_model("m", backend_url, max_concurrent=4)], admin={"token": "admin-token"},
            tenants=[{"name": "capped", "keys": [keys["capped"]], "max_concurrent": 1},
                     {"name": "other", "keys": [keys["other"]]}])
        cfg = dataclasses.replace(cfg, cluster=ClusterSettings(
            redis_url=redis_url, key_prefix=secrets.token_hex(6), lease_s=LEASE_S,
            enabled=True, heartbeat=0.3))
        first, second = [(await stack.enter_async_context(serving(cfg)))[0] for _ in range(2)]
        client = await stack.enter_async_context(httpx2.AsyncClient(timeout=30))
        statuses: list[int] = []
        async with anyio.create_task_group() as tg:
            async def post(url: str, name: str) -> None:
                answer = await client.post(url + "/v1/chat/completions", json=chat("m"),
                                           headers={"authorization": f"Bearer {keys[name]}"})
                statuses.append(answer.status_code)

            tg.start_soon(post, first, "capped")
            await eventually(lambda: backend.received == 1, within=5.0)
            tg.start_soon(post, second, "capped")  # at its bound in the other gateway: waits
            tg.start_soon(post, second, "other")  # and holds no one up
            await eventually(lambda: backend.received == 2, within=5.0)
            await anyio.sleep(0.3)
            assert backend.received == 2
            tenants = (await client.get(second + "/admin/tenants", headers={
                "authorization": "Bearer admin-token"})).json()["data"]
            assert {t["name"]: t["in_flight"] for t in tenants} == {
                "capped": 2, "other": 1, "default": 0}
            backend.release.set()
        assert statuses == [200] * 3
