"""The contract of ``Accounting``, for every implementation (``open_accounting``), on asyncio and
trio: FIFO slots, the queue's bound, the wait's timeout, cancellation, capacity that follows the
ready replicas, the shared limit, places in line, the oldest wait and the demand the pool reads.
"""

from __future__ import annotations

import anyio
import pytest
from anyio.abc import TaskGroup
from anyio.lowlevel import checkpoint

from kernel.accounting import Accounting, Ticket
from kernel.config import Config, TenantSettings
from kernel.errors import GatewayError
from tests.support import make_config, sim_model

from .conftest import CONTRACT, OpenAccounting, opened, settle

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="session", params=sorted(CONTRACT))
def open_accounting(request: pytest.FixtureRequest) -> OpenAccounting:
    return opened(request)


def config(*, concurrent: int = 1, queue: int = 10, timeout: float = 5.0,
           total: int | None = None, replicas: int = 1) -> Config:
    return make_config(
        [sim_model("a", max_concurrent=concurrent, max_queue_size=queue, max_replicas=replicas),
         sim_model("b", max_concurrent=concurrent, max_queue_size=queue)],
        gateway={"queue_timeout": timeout, "max_concurrent_total": total,
                 "max_models_concurrent": 4})


async def joined(accounting: Accounting, model: str = "a",
                 tenant: TenantSettings | None = None) -> Ticket:
    ticket = await accounting.join(model, tenant)
    assert ticket is not None
    return ticket


async def holding(accounting: Accounting, model: str = "a",
                  tenant: TenantSettings | None = None) -> Ticket:
    ticket = await joined(accounting, model, tenant)
    assert await accounting.try_acquire(ticket)
    return ticket


class Line:
    """Tickets that wait for their slot in tasks, and what each wait ended in, in order."""

    def __init__(self, accounting: Accounting, tg: TaskGroup) -> None:
        self.accounting = accounting
        self.tg = tg
        self.got: list[int] = []
        self.refused: list[int] = []
        self.tickets: dict[int, Ticket] = {}
        self.waits: dict[int, anyio.CancelScope] = {}

    async def wait(self, number: int, model: str = "a",
                   tenant: TenantSettings | None = None) -> Ticket:
        """Join, try, and wait in a task; returns once the wait has begun."""
        ticket = self.tickets[number] = await joined(self.accounting, model, tenant)
        assert not await self.accounting.try_acquire(ticket)
        scope = self.waits[number] = anyio.CancelScope()

        async def waiting() -> None:
            with scope:
                taken = await self.accounting.acquire(ticket)
                (self.got if taken else self.refused).append(number)

        self.tg.start_soon(waiting)
        await settle(self.accounting)
        return ticket

    async def leave(self, number: int) -> None:
        await self.accounting.leave(self.tickets[number])


async def test_slots_go_out_in_the_order_requests_came(
        open_accounting: OpenAccounting, anyio_backend: str) -> None:
    async with open_accounting(config()) as accounting, anyio.create_task_group() as tg:
        first = await holding(accounting)
        line = Line(accounting, tg)
        for n in range(4):
            await line.wait(n)
        assert (accounting.depth("a"), accounting.in_flight("a")) == (4, 1)
        await accounting.leave(first)
        for n in range(4):
            await settle(accounting)
            assert line.got == list(range(n + 1))
            await line.leave(n)
        await settle(accounting)
    assert (accounting.depth("a"), accounting.in_flight("a")) == (0, 0)


async def test_no_one_takes_a_free_slot_past_those_in_line(
        open_accounting: OpenAccounting, anyio_backend: str) -> None:
    async with open_accounting(config(concurrent=1)) as accounting, \
            anyio.create_task_group() as tg:
        first = await holding(accounting)
        line = Line(accounting, tg)
        await line.wait(0)
        await accounting.leave(first)  # handed to the one in line, not to whoever asks first
        late = await joined(accounting)
        assert not await accounting.try_acquire(late)
        await settle(accounting)
        assert line.got == [0]
        await accounting.leave(late)
        await line.leave(0)


async def test_a_full_queue_refuses_without_counting(
        open_accounting: OpenAccounting, anyio_backend: str) -> None:
    async with open_accounting(config(queue=2)) as accounting:
        first = await holding(accounting)
        tickets = [await joined(accounting), await joined(accounting)]
        assert await accounting.join("a") is None
        assert accounting.depth("a") == 2
        other = await joined(accounting, "b")  # each model has its own bound
        # Holding a slot is no place in the queue: one that took its slot frees its place.
        await accounting.leave(first)
        assert await accounting.try_acquire(tickets[0])
        assert accounting.depth("a") == 1
        third = await joined(accounting)
        assert await accounting.join("a") is None
        for ticket in (*tickets, third, other):
            await accounting.leave(ticket)
        assert (accounting.depth("a"), accounting.in_flight("a")) == (0, 0)


async def test_a_wait_ends_after_the_queue_timeout_with_nothing_taken(
        open_accounting: OpenAccounting, anyio_backend: str) -> None:
    async with open_accounting(config(timeout=0.05)) as accounting:
        first = await holding(accounting)
        late = await joined(accounting)
        began = anyio.current_time()
        assert await accounting.acquire(late) is False
        assert 0.05 <= anyio.current_time() - began < 1.0
        # Out of the queue already, holding nothing: its leave changes nothing.
        assert (accounting.depth("a"), accounting.in_flight("a")) == (0, 1)
        assert accounting.position(late) is None
        await accounting.leave(late)
        assert accounting.in_flight("a") == 1
        await accounting.leave(first)
        assert accounting.in_flight("a") == 0


async def test_a_cancelled_wait_leaves_the_line_and_holds_nothing(
        open_accounting: OpenAccounting, anyio_backend: str) -> None:
    async with open_accounting(config()) as accounting, anyio.create_task_group() as tg:
        first = await holding(accounting)
        line = Line(accounting, tg)
        await line.wait(0)
        await line.wait(1)
        line.waits[0].cancel()
        await settle(accounting)
        assert accounting.depth("a") == 1
        assert accounting.position(line.tickets[1]) == 1
        await accounting.leave(first)
        await settle(accounting)
        assert line.got == [1]  # the cancelled one's place is gone
        await line.leave(0)
        await line.leave(1)
    assert (accounting.depth("a"), accounting.in_flight("a")) == (0, 0)


@pytest.mark.parametrize("total", [None, 1])
async def test_a_wait_cancelled_at_any_point_of_the_handover_gives_back_what_it_took(
        open_accounting: OpenAccounting, anyio_backend: str, total: int | None) -> None:
    """Cancel a waiter after each number of scheduling steps while its slot is handed to it,
    so the cancellation lands before, during and after the handover."""
    for steps in range(15):
        async with open_accounting(config(total=total)) as accounting, \
                anyio.create_task_group() as tg:
            first = await holding(accounting)
            line = Line(accounting, tg)
            await line.wait(0)
            await accounting.leave(first)
            for _ in range(steps):
                await checkpoint()
            line.waits[0].cancel()
            await settle(accounting)
            await line.leave(0)
            assert (accounting.depth("a"), accounting.in_flight("a")) == (0, 0), steps
            # Whatever the cancelled waiter took, it gave back: the next one takes it at once.
            again = await joined(accounting)
            assert await accounting.try_acquire(again), steps
            await accounting.leave(again)


async def test_leave_is_idempotent_and_gives_back_once(
        open_accounting: OpenAccounting, anyio_backend: str) -> None:
    async with open_accounting(config(concurrent=2)) as accounting:
        ticket = await holding(accounting)
        other = await holding(accounting)
        await accounting.leave(ticket)
        await accounting.leave(ticket)
        assert accounting.in_flight("a") == 1
        third = await holding(accounting)  # one slot was free, not two
        assert not await accounting.try_acquire(await joined(accounting))
        for each in (other, third):
            await accounting.leave(each)


async def test_the_slots_follow_the_ready_replicas(
        open_accounting: OpenAccounting, anyio_backend: str) -> None:
    async with open_accounting(config(concurrent=2, replicas=3)) as accounting, \
            anyio.create_task_group() as tg:
        # None ready yet: one replica's slots, so that requests may start the first.
        held = [await holding(accounting) for _ in range(2)]
        line = Line(accounting, tg)
        for n in range(4):
            await line.wait(n)
        # (Two handed out at once run in the order the event loop wakes them.)
        accounting.serving("a", 2)
        await settle(accounting)
        assert sorted(line.got) == [0, 1]
        accounting.serving("a", 3)
        await settle(accounting)
        assert sorted(line.got) == [0, 1, 2, 3]
        assert accounting.in_flight("a") == 6
        # Down to one replica: those in flight stay, a newcomer waits for room below two.
        accounting.serving("a", 1)
        await line.wait(4)
        for ticket in held:
            await accounting.leave(ticket)
        for n in range(2):
            await line.leave(n)
        await settle(accounting)
        assert 4 not in line.got
        await line.leave(2)
        await settle(accounting)
        assert line.got[-1] == 4
        await line.leave(3)
        await line.leave(4)
        # No replica ready: still one replica's slots.
        accounting.serving("a", 0)
        assert [await accounting.try_acquire(await joined(accounting)) for _ in range(3)] == [
            True, True, False]
        tg.cancel_scope.cancel()


async def test_the_shared_limit_bounds_all_models_together(
        open_accounting: OpenAccounting, anyio_backend: str) -> None:
    async with open_accounting(config(concurrent=2, total=2)) as accounting, \
            anyio.create_task_group() as tg:
        first = await holding(accounting, "a")
        second = await holding(accounting, "b")
        line = Line(accounting, tg)
        # It has a slot of its model's but waits for the shared one: queued, not in flight.
        await line.wait(0, "a")
        assert (accounting.depth("a"), accounting.in_flight("a")) == (1, 1)
        assert accounting.demand("a") == 2
        await accounting.leave(second)
        await settle(accounting)
        assert line.got == [0]
        assert (accounting.depth("a"), accounting.in_flight("a"), accounting.in_flight("b")) == (
            0, 2, 0)
        await accounting.leave(first)
        await line.leave(0)
    assert accounting.demand("a") == accounting.demand("b") == 0


async def test_the_shared_slots_go_in_the_order_the_models_slots_went(
        open_accounting: OpenAccounting, anyio_backend: str) -> None:
    """Two get their model's slots at once (replicas became ready) with no shared one free:
    the first in line gets the next shared one, whichever task the event loop runs first."""
    for _ in range(10):
        async with open_accounting(config(replicas=3, total=2)) as accounting, \
                anyio.create_task_group() as tg:
            first = await holding(accounting, "a")
            other = await holding(accounting, "b")
            line = Line(accounting, tg)
            await line.wait(0)
            await line.wait(1)
            accounting.serving("a", 3)
            await settle(accounting)
            assert (line.got, accounting.depth("a")) == ([], 2)
            await accounting.leave(other)
            await settle(accounting)
            assert line.got == [0]
            await accounting.leave(first)
            await settle(accounting)
            assert line.got == [0, 1]
            await line.leave(0)
            await line.leave(1)


async def test_each_queued_request_knows_its_place(
        open_accounting: OpenAccounting, anyio_backend: str) -> None:
    async with open_accounting(config()) as accounting, anyio.create_task_group() as tg:
        first = await holding(accounting)
        assert accounting.position(first) is None  # holds its slot: not in the queue
        line = Line(accounting, tg)
        for n in range(3):
            await line.wait(n)
        assert [accounting.position(line.tickets[n]) for n in range(3)] == [1, 2, 3]
        line.waits[1].cancel()
        await settle(accounting)
        assert [accounting.position(line.tickets[n]) for n in (0, 2)] == [1, 2]
        await accounting.leave(first)
        await settle(accounting)
        assert [accounting.position(line.tickets[n]) for n in (0, 2)] == [None, 1]
        tg.cancel_scope.cancel()


async def test_the_oldest_wait_is_that_of_the_first_in_line(
        open_accounting: OpenAccounting, anyio_backend: str) -> None:
    async with open_accounting(config()) as accounting, anyio.create_task_group() as tg:
        first = await holding(accounting)
        assert accounting.oldest_wait("a") is None
        line = Line(accounting, tg)
        await line.wait(0)
        await anyio.sleep(0.05)
        second = anyio.current_time()
        await line.wait(1)
        waited = accounting.oldest_wait("a")
        assert waited is not None and 0.05 <= waited < 1.0
        assert accounting.oldest_wait("b") is None
        await accounting.leave(first)
        await settle(accounting)
        waited = accounting.oldest_wait("a")
        # The second's, now first in line (the first's is 0.05 s longer).
        assert waited is not None and waited <= anyio.current_time() - second + 0.01
        tg.cancel_scope.cancel()
    assert accounting.oldest_wait("a") is None


async def test_demand_counts_those_queued_and_those_holding_a_slot(
        open_accounting: OpenAccounting, anyio_backend: str) -> None:
    async with open_accounting(config()) as accounting, anyio.create_task_group() as tg:
        assert accounting.demand("a") == 0
        first = await holding(accounting)
        idle = await joined(accounting)  # joined, not yet trying
        line = Line(accounting, tg)
        await line.wait(0)
        assert accounting.demand("a") == 3
        assert accounting.demand("b") == 0
        await accounting.leave(idle)
        assert accounting.demand("a") == 2
        await accounting.leave(first)
        await settle(accounting)
        assert accounting.demand("a") == 1
        await line.leave(0)
    assert accounting.demand("a") == 0


async def test_a_reload_changes_the_limits_for_the_next_requests_and_keeps_the_holders(
        open_accounting: OpenAccounting) -> None:
    async with open_accounting(config(queue=3)) as accounting, anyio.create_task_group() as tg:
        line = Line(accounting, tg)
        first = await holding(accounting)
        await line.wait(1)
        await line.wait(2)
        accounting.reconfigure(config(concurrent=2, queue=2))
        await settle(accounting)
        # One more slot: the first in line has it at once; the holder keeps its own.
        assert line.got == [1] and accounting.in_flight("a") == 2
        await line.wait(3)
        assert await accounting.join("a") is None  # 2 and 3 fill the new queue's 2 places
        await accounting.leave(first)
        await settle(accounting)
        assert line.got == [1, 2]
        for number in (1, 2):
            await line.leave(number)
        await settle(accounting)
        assert line.got == [1, 2, 3]
        await line.leave(3)


async def test_a_reload_adds_a_model_and_a_removed_one_keeps_its_holders_then_is_gone(
        open_accounting: OpenAccounting) -> None:
    async with open_accounting(config()) as accounting:
        held = await holding(accounting, "b")
        accounting.reconfigure(make_config([sim_model("a"), sim_model("c", max_concurrent=1)]))
        await settle(accounting)
        assert accounting.in_flight("b") == 1
        await holding(accounting, "c")
        assert accounting.in_flight("c") == 1
        await accounting.leave(held)
        await settle(accounting)
        assert accounting.demand("b") == 0
        with pytest.raises(GatewayError) as removed:
            await accounting.join("b")
        assert removed.value.status == 404
