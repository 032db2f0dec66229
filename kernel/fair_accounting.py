"""Priorities and fair shares in a model's queue, for the tenants of ``[[tenants]]``.

``FairAccounting`` is ``InMemoryAccounting`` with another order of handing out a model's slots.
``in_memory_accounting`` picks it where the config asks for it (more than one tenant, or a
tenant's ``max_concurrent``); with the default tenant alone the rules below are FIFO, which
``InMemoryAccounting`` does at no cost.

When a slot of a model is free, it goes to one of the model's waiters whose tenant holds fewer
slots (of every model) than its ``max_concurrent``; the others are passed over, and hold no one
up behind them, until their tenant gives a slot back. Among those:

1. a waiter of a lower priority than the highest one waiting that has waited
   ``gateway.max_priority_wait``, the first come first: a low priority is slower, never starved;
2. else the highest priority; within a priority, the tenant whose virtual time (slots granted
   divided by its weight) is least, each tenant's waiters in the order they came (start-time
   fair queueing). A tenant that begins to wait starts at the priority's clock (the virtual time
   of the last grant there): one that was away neither saved up a share nor owes one.

A ticket that holds its model's slot and waits for a shared one (``max_concurrent_total``)
waits in the order its model's slot came. The places the loading feedback reads are the order
of these rules as of the queue's last change (what a tenant's limit or the time will change is
not foreseen): those holding their model's slot, then the waiters in grant order, then those
that joined and do not wait yet.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

import anyio

from kernel.accounting import InMemoryAccounting, Ticket, _Line

if TYPE_CHECKING:
    from kernel.config import Config, TenantSettings

# A tenant without a max_concurrent of its own: more than any number of slots.
UNBOUNDED = 1 << 62


def in_memory_accounting(config: Config) -> InMemoryAccounting:
    """The accounting of one process: fair where tenants differ, else FIFO."""
    return FairAccounting(config) if config.fair_queues else InMemoryAccounting(config)


class _Account:
    """One tenant's slots held (its models' slots, over every model) and its bound."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.held = 0
        self.limit = limit


class _Share:
    """One tenant's waiters in one model's line, and its virtual time there."""

    __slots__ = ("account", "name", "priority", "step", "vtime", "waiters")

    def __init__(self, tenant: TenantSettings, account: _Account, vtime: float) -> None:
        self.name = tenant.name
        self.account = account
        self.priority = tenant.priority
        self.step = 1.0 / tenant.weight
        self.vtime = vtime
        self.waiters: deque[FairTicket] = deque()


class FairTicket(Ticket):
    """A ticket with its tenant's account, and its tenant's share of the line while it waits."""

    __slots__ = ("account", "share", "tenant")

    def __init__(self, line: _Line) -> None:
        super().__init__(line)
        self.share: _Share | None = None


class _FairLine(_Line):
    """A model's line, with the tenants waiting in it and each priority's clock."""

    __slots__ = ("clocks", "shares")

    def __init__(self, name: str, per_replica: int, limit: int) -> None:
        super().__init__(name, per_replica, limit)
        # Only tenants with waiters, in the order they began to wait (ties go to the first).
        self.shares: dict[str, _Share] = {}
        self.clocks: dict[int, float] = {}


class FairAccounting(InMemoryAccounting):
    """The accounting of one process with tenants' priorities, shares and bounds."""

    ticket_type = FairTicket
    line_type = _FairLine

    def __init__(self, config: Config) -> None:
        self._accounts: dict[str, _Account] = {}
        super().__init__(config)
        self._tenants(config)

    def _tenants(self, config: Config) -> None:
        """The tenants' bounds and the aging rule (a reload's: for the next grants; a request
        already waiting keeps its tenant's priority and weight)."""
        self.max_wait = config.gateway.max_priority_wait
        self._default = config.default_tenant
        for tenant in config.tenants:
            account = self._accounts.setdefault(tenant.name, _Account(UNBOUNDED))
            account.limit = tenant.max_concurrent or UNBOUNDED

    def reconfigure(self, config: Config) -> None:
        self._tenants(config)
        super().reconfigure(config)
        self._hand_out_everywhere()

    async def join(self, model: str, tenant: TenantSettings | None = None) -> Ticket | None:
        ticket = await super().join(model)
        if ticket is not None:
            assert isinstance(ticket, FairTicket)
            ticket.tenant = tenant = tenant or self._default
            ticket.account = self._accounts[tenant.name]
        return ticket

    def _try_acquire(self, ticket: Ticket) -> bool:
        assert isinstance(ticket, FairTicket)
        if not ticket.held:
            # A free slot is one no waiter may take (their tenants are at their bound): the
            # ticket takes it if its own tenant may.
            slots = ticket.line.slots
            account = ticket.account
            if slots.taken >= slots.capacity or account.held >= account.limit:
                return False
            slots.taken += 1
            account.held += 1
            ticket.held = 1
        return super()._try_acquire(ticket)

    async def leave(self, ticket: Ticket) -> None:
        bounded = ticket.held and self._gives_back(ticket)
        await super().leave(ticket)
        if bounded:
            self._hand_out_everywhere()

    def _give_up(self, ticket: Ticket) -> None:
        bounded = ticket.held and self._gives_back(ticket)
        super()._give_up(ticket)
        if bounded:
            self._hand_out_everywhere()

    @staticmethod
    def _gives_back(ticket: Ticket) -> bool:
        """The ticket's model slot is about to go back: one fewer for its tenant. True when the
        tenant was at its bound (its waiters on other models may go now)."""
        assert isinstance(ticket, FairTicket)
        account = ticket.account
        account.held -= 1
        return account.held + 1 == account.limit

    def _hand_out_everywhere(self) -> None:
        for line in self._lines.values():
            self._hand_out(line)

    def _wait(self, ticket: Ticket) -> None:
        assert isinstance(ticket, FairTicket)
        super()._wait(ticket)
        line = ticket.line
        assert isinstance(line, _FairLine)
        tenant = ticket.tenant
        share = line.shares.get(tenant.name)
        if share is None:
            share = line.shares[tenant.name] = _Share(
                tenant, ticket.account, line.clocks.get(tenant.priority, 0.0))
        share.waiters.append(ticket)
        ticket.share = share
        line.places = None

    def _unwait(self, ticket: Ticket) -> None:
        super()._unwait(ticket)
        assert isinstance(ticket, FairTicket) and ticket.share is not None
        ticket.share.waiters.remove(ticket)
        self._forget_if_empty(ticket)

    @staticmethod
    def _forget_if_empty(ticket: FairTicket) -> None:
        share = ticket.share
        assert share is not None
        if not share.waiters:
            line = ticket.line
            assert isinstance(line, _FairLine)
            del line.shares[share.name]

    def _hand_out(self, line: _Line) -> None:
        assert isinstance(line, _FairLine)
        slots = line.slots
        while slots.waiters and slots.taken < slots.capacity:
            ticket = self._next(line)
            if ticket is None:
                return
            slots.waiters.remove(ticket)
            share = ticket.share
            assert share is not None and share.waiters[0] is ticket
            share.waiters.popleft()
            line.clocks[share.priority] = share.vtime
            share.vtime += share.step
            self._forget_if_empty(ticket)
            slots.taken += 1
            ticket.account.held += 1
            self._took_model_slot(ticket)

    def _next(self, line: _FairLine) -> FairTicket | None:
        """The waiter the rules grant the next slot to; None: every waiter's tenant is at its
        bound."""
        best: _Share | None = None
        lowest = UNBOUNDED
        for share in line.shares.values():
            account = share.account
            if account.held >= account.limit:
                continue
            lowest = min(lowest, share.priority)
            if best is None or share.priority > best.priority or (
                    share.priority == best.priority and share.vtime < best.vtime):
                best = share
        if best is None:
            return None
        if lowest < best.priority:
            horizon = anyio.current_time() - self.max_wait
            for ticket in line.slots.waiters:
                if ticket.since > horizon:
                    break
                assert isinstance(ticket, FairTicket) and ticket.share is not None
                share = ticket.share
                if share.priority < best.priority and share.account.held < share.account.limit:
                    return ticket
        return best.waiters[0]

    def _order(self, line: _Line) -> Iterable[Ticket]:
        assert isinstance(line, _FairLine)
        waiting = line.slots.waiters
        first = [t for t in line.queue if t.held]
        last = [t for t in line.queue if not t.held and t.share is None]  # type: ignore[attr-defined]
        if not line.shares:
            return [*first, *waiting, *last]
        top = max(share.priority for share in line.shares.values())
        horizon = anyio.current_time() - self.max_wait
        aged: dict[Ticket, None] = {}
        for ticket in waiting:
            if ticket.since > horizon:
                break
            assert isinstance(ticket, FairTicket) and ticket.share is not None
            if ticket.share.priority < top:
                aged[ticket] = None
        # Each tenant's waiters one by one, in the order of the virtual times they would have.
        heap = [(-share.priority, share.vtime, i, 0, share)
                for i, share in enumerate(line.shares.values())]
        heapq.heapify(heap)
        order: list[Ticket] = [*first, *aged]
        while heap:
            rank, vtime, i, k, share = heapq.heappop(heap)
            ticket = share.waiters[k]
            if ticket not in aged:
                order.append(ticket)
            if k + 1 < len(share.waiters):
                heapq.heappush(heap, (rank, vtime + share.step, i, k + 1, share))
        order += last
        return order
