"""The tenants' order in a model's queue, for every implementation (``open_accounting``), on
asyncio and trio: a higher priority first, but no one waits more than ``max_priority_wait``
behind later arrivals of a higher one; equal priorities share the slots by weight, not by who
came first; a tenant at its ``max_concurrent`` (over all models) waits without holding up those
behind it; places in line follow the grant order; with the default tenant alone, FIFO.
"""

from __future__ import annotations

from collections.abc import Iterable

import anyio
import pytest

from kernel.accounting import InMemoryAccounting
from kernel.config import Config, TenantSettings
from kernel.fair_accounting import in_memory_accounting
from tests.support import make_config, sim_model

from .conftest import OpenAccounting, settle
from .test_contract import Line, holding, joined

pytestmark = pytest.mark.anyio


def config(*tenants: dict[str, object], concurrent: int = 1, priority_wait: float = 10.0,
           timeout: float = 30.0) -> Config:
    return make_config(
        [sim_model("a", max_concurrent=concurrent, max_queue_size=50),
         sim_model("b", max_concurrent=concurrent, max_queue_size=50)],
        gateway={"queue_timeout": timeout, "max_priority_wait": priority_wait,
                 "max_models_concurrent": 4},
        tenants=list(tenants))


def tenant(cfg: Config, name: str) -> TenantSettings:
    return next(t for t in cfg.tenants if t.name == name)


async def waiting(line: Line, tenant: TenantSettings, numbers: Iterable[int]) -> None:
    for n in numbers:
        await line.wait(n, tenant=tenant)


async def one_at_a_time(line: Line, count: int) -> None:
    """The slot goes out ``count`` times, each holder leaving as soon as it got it."""
    for _ in range(count):
        await settle(line.accounting)
        await line.leave(line.got[-1])


async def test_a_higher_priority_is_granted_first(
        open_accounting: OpenAccounting, anyio_backend: str) -> None:
    cfg = config({"name": "low", "priority": 0}, {"name": "high", "priority": 5})
    low, high = tenant(cfg, "low"), tenant(cfg, "high")
    async with open_accounting(cfg) as accounting, anyio.create_task_group() as tg:
        first = await holding(accounting, tenant=low)
        line = Line(accounting, tg)
        await line.wait(0, tenant=low)
        await line.wait(1, tenant=low)
        await line.wait(2, tenant=high)
        # The places say the grant order: the late high one is next.
        assert [accounting.position(line.tickets[n]) for n in range(3)] == [2, 3, 1]
        await accounting.leave(first)
        for expected in ([2], [2, 0], [2, 0, 1]):
            await settle(accounting)
            assert line.got == expected
            await line.leave(expected[-1])
    assert (accounting.depth("a"), accounting.in_flight("a")) == (0, 0)


async def test_a_low_priority_waits_at_most_max_priority_wait_behind_a_saturated_high_one(
        open_accounting: OpenAccounting, anyio_backend: str) -> None:
    """The high tenant keeps two waiting at every moment, each holding the slot 0.05 s: without
    the bound the low one would never get it."""
    bound, hold = 0.3, 0.05
    cfg = config({"name": "low", "priority": -1}, {"name": "high", "priority": 1},
                 priority_wait=bound)
    low, high = tenant(cfg, "low"), tenant(cfg, "high")
    async with open_accounting(cfg) as accounting, anyio.create_task_group() as tg:
        line = Line(accounting, tg)
        running = await holding(accounting, tenant=high)
        await line.wait(0, tenant=high)
        await line.wait(1, tenant=high)
        began = anyio.current_time()
        await line.wait(-1, tenant=low)
        number = 2
        while -1 not in line.got:
            await anyio.sleep(hold)
            await accounting.leave(running)
            await settle(accounting)
            running = line.tickets[line.got[-1]]
            await line.wait(number, tenant=high)
            number += 1
        waited = anyio.current_time() - began
        highs_granted_meanwhile = len(line.got) - 1
        assert bound <= waited < bound + 3 * hold + 0.25, waited
        assert highs_granted_meanwhile >= 2  # later high ones went first meanwhile
        tg.cancel_scope.cancel()


async def test_equal_priorities_share_the_slots_by_weight(
        open_accounting: OpenAccounting, anyio_backend: str) -> None:
    cfg = config({"name": "heavy", "weight": 3}, {"name": "light"})
    heavy, light = tenant(cfg, "heavy"), tenant(cfg, "light")
    async with open_accounting(cfg) as accounting, anyio.create_task_group() as tg:
        first = await holding(accounting, tenant=light)
        line = Line(accounting, tg)
        for n in range(10):
            await line.wait(n, tenant=light)
            await line.wait(100 + n, tenant=heavy)
        await accounting.leave(first)
        await one_at_a_time(line, 12)
        await settle(accounting)
        heavy_got = sum(n >= 100 for n in line.got[:12])
        assert heavy_got == 9, line.got
        tg.cancel_scope.cancel()


async def test_a_tenant_at_its_max_concurrent_waits_without_holding_up_others(
        open_accounting: OpenAccounting, anyio_backend: str) -> None:
    cfg = config({"name": "capped", "max_concurrent": 2}, {"name": "other"}, concurrent=4)
    capped, other = tenant(cfg, "capped"), tenant(cfg, "other")
    async with open_accounting(cfg) as accounting, anyio.create_task_group() as tg:
        on_a = [await holding(accounting, "a", tenant=capped) for _ in range(2)]
        line = Line(accounting, tg)
        # Its bound counts over every model: the slots of b are free, and it waits for one.
        await line.wait(0, "b", tenant=capped)
        # A later one of another tenant takes a free slot of b at once.
        late = await holding(accounting, "b", tenant=other)
        assert (accounting.depth("b"), accounting.in_flight("b")) == (1, 1)
        # The capped tenant gives back a slot of a: its waiter on b goes.
        await accounting.leave(on_a[0])
        await settle(accounting)
        assert line.got == [0]
        for ticket in (late, on_a[1], line.tickets[0]):
            await accounting.leave(ticket)
        assert accounting.in_flight("a") == accounting.in_flight("b") == 0
        # Every count went back: the capped tenant takes two slots again at once.
        again = [await joined(accounting, model, capped) for model in "ab"]
        assert [await accounting.try_acquire(t) for t in again] == [True, True]
        assert not await accounting.try_acquire(await joined(accounting, "a", capped))
        tg.cancel_scope.cancel()


async def test_equal_priorities_take_turns_and_a_late_one_has_not_saved_up_a_share(
        open_accounting: OpenAccounting, anyio_backend: str) -> None:
    """The big tenant had the model alone for a while; the small one, arriving behind its
    waiters, is next, then gets every other slot: not first-come order, and not all the slots
    until it has caught up."""
    cfg = config({"name": "big"}, {"name": "small"})
    big, small = tenant(cfg, "big"), tenant(cfg, "small")
    async with open_accounting(cfg) as accounting, anyio.create_task_group() as tg:
        first = await holding(accounting, tenant=big)
        line = Line(accounting, tg)
        await waiting(line, big, range(8))
        await accounting.leave(first)
        await one_at_a_time(line, 4)
        await waiting(line, small, range(10, 14))
        assert [accounting.position(line.tickets[n]) for n in (5, 10)] == [2, 1]
        await one_at_a_time(line, 6)
        assert line.got[4:10] == [4, 10, 5, 11, 6, 12], line.got
        tg.cancel_scope.cancel()


def test_the_default_tenant_alone_is_fifo_at_no_extra_cost() -> None:
    assert type(in_memory_accounting(config())) is InMemoryAccounting
    assert type(in_memory_accounting(config({"name": "default", "priority": 3}))) is \
        InMemoryAccounting
    assert type(in_memory_accounting(config({"name": "default", "max_concurrent": 3}))) is not \
        InMemoryAccounting
