"""The accounting of requests against slots: who waits for a slot of a model, who holds one.

Everything the layers and the pool ask about queues, slots and leases goes through
``Accounting``, the seam a shared-state implementation (many gateway processes) plugs into;
``InMemoryAccounting`` is the one of a single process, ``cluster.accounting.RedisAccounting``
the one of many. The changes (``join``, ``try_acquire``, ``acquire``, ``leave``) are awaited,
as a shared store answers over the network; the figures (``depth``, ``position``,
``in_flight``, ``demand``, ``oldest_wait``) are read without awaiting, as of the
implementation's last exchange with its store. The queue layer (``QueueDepthLimit``)
joins a request's model and leaves it in a ``finally``; the slots layer
(``ModelConcurrencyLimit``) acquires in between; the loading feedback asks a request's place;
the pool reads ``demand`` and ``oldest_wait`` and resizes a model with replicas (``serving``).

The invariant owned here: a request is queued from ``join`` until it holds its slots (its
model's, then the shared one of ``max_concurrent_total``) or gives up, and in flight while it
holds both; ``leave`` gives back exactly what it took, once, whatever was cancelled when.
Slots go out in the order requests came (FIFO; where tenants differ in priority, weight or
bound, ``kernel.fair_accounting.FairAccounting`` orders a model's line by their rules, and
``in_memory_accounting`` picks it): a model's to its line, and the shared ones to
those holding their model's in the order they got it (handed over at once, not when each
waiter's task runs next, which trio does in a random order); a wait is bounded by
``queue_timeout``, and one that ends without its slots (the time ran out, it was cancelled)
holds nothing. A model's slots are ``max_concurrent`` per ready replica (at least one
replica's, so that a request can start the first): those in flight when they shrink finish,
and the line moves once there is room below the new size.

A live reload (``reconfigure``) changes the limits in place: a line's ``max_concurrent`` and
``max_queue_size``, the shared slots' count and ``queue_timeout`` are in force for the next
request and the next hand-out (those holding slots keep them; more slots go to the line at
once). A new model gets its line; a removed model's line serves those already in it and is
dropped once empty.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

import anyio

from kernel.errors import GatewayError, not_found

if TYPE_CHECKING:
    from kernel.config import Config, TenantSettings


def removed(model: str) -> GatewayError:
    """The 404 of a request for a model that a reload removed after the request was admitted."""
    return not_found(f"The model '{model}' was removed from the configuration.",
                     code="model_not_found", param="model")


class Ticket:
    """One request's account, from ``join`` to ``leave``: queued or not, the slots it holds
    (its model's, then the shared one). The layers only pass it back to the accounting; an
    implementation that keeps more per request (a key in a shared store) subclasses it."""

    __slots__ = ("event", "held", "line", "queued", "since")

    def __init__(self, line: _Line) -> None:
        self.line = line
        self.queued = True
        self.held = 0
        # While it waits: when it began, and the event set once it holds its slots.
        self.since = 0.0
        self.event: anyio.Event | None = None


class Demand(Protocol):
    """What the pool asks of the requests the layers hold for a model: the accounting, handed
    to the pool when the gateway builds them (``BackendPool(accounting=...)``)."""

    def demand(self, model: str) -> int:
        """Requests of the model queued for a slot or holding one (the pool's word for a model
        that is not idle)."""

    def oldest_wait(self, model: str) -> float | None:
        """Seconds the model's longest-waiting request has waited for a slot of the model's
        (None: none waits)."""

    def serving(self, model: str, replicas: int) -> None:
        """The pool's word: ``replicas`` of the model are ready; its slots follow."""

    def reconfigure(self, config: Config) -> None:
        """A live reload's limits, in force from now on (see the module's docstring)."""


class Accounting(Demand, Protocol):
    """What the layers and the pool ask about queues and slots.

    A ticket's life: ``join``, then ``try_acquire`` and, if that says no, ``acquire``; then
    ``leave`` (always, once the request is done: in a ``finally``). A ticket is queued until it
    holds its slot (``try_acquire`` or ``acquire`` said yes) or its wait ended; it is in flight
    while it holds the slot.
    """

    async def join(self, model: str, tenant: TenantSettings | None = None) -> Ticket | None:
        """Queue a request of ``tenant`` (None: the default one) for a slot of ``model``; None
        (and nothing counted) when the model's queue is full (``max_queue_size``). An
        implementation may hand it its slots at once when they are free and no one waits (a
        shared store: join and take in one call, so that those joining at once do not fill the
        queue while slots are free)."""

    async def try_acquire(self, ticket: Ticket) -> bool:
        """Take the ticket's slot now if one is free and no one is ahead of it, without
        waiting for one (the hot path: no checkpoint in memory, one round trip to a shared
        store)."""

    async def acquire(self, ticket: Ticket) -> bool:
        """Wait in line for the ticket's slot, at most ``queue_timeout``: True once it holds it,
        False when the time ran out. The ticket leaves the queue either way; a wait that ends
        without the slot (timed out, cancelled) holds nothing."""

    async def leave(self, ticket: Ticket) -> None:
        """The request is done: out of the queue, its slots given back. Idempotent, and done
        even when the caller is being cancelled (it is called in a ``finally``)."""

    def depth(self, model: str) -> int:
        """Requests of the model queued for a slot."""

    def position(self, ticket: Ticket) -> int | None:
        """The ticket's place in its model's queue (1: next in line); None if not queued."""

    def in_flight(self, model: str) -> int:
        """Requests of the model holding a slot."""


class _Stage:
    """Slots of one kind (a model's, or the shared ones) and the tickets waiting for one, in
    order."""

    __slots__ = ("capacity", "taken", "waiters")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.taken = 0
        self.waiters: deque[Ticket] = deque()


class _Line:
    """One model: its slots, its queue in the order requests came, and those in flight."""

    __slots__ = ("in_flight", "limit", "name", "per_replica", "places", "queue", "replicas",
                 "retired", "slots")

    def __init__(self, name: str, per_replica: int, limit: int) -> None:
        self.name = name
        self.per_replica = per_replica
        self.limit = limit
        # Ready replicas, as the pool last said (``serving``).
        self.replicas = 0
        # Its model was removed by a reload: dropped once no request is in it.
        self.retired = False
        self.slots = _Stage(per_replica)
        # Insertion-ordered: the queue's order. A dict, so that leaving from the middle is O(1).
        self.queue: dict[Ticket, None] = {}
        self.in_flight = 0
        # Each queued ticket's place, counted on the first ask after the queue changed.
        self.places: dict[Ticket, int] | None = None


class InMemoryAccounting:
    """The accounting of one gateway process. No call but ``acquire``'s wait awaits anything
    (``join``, ``try_acquire`` and ``leave`` are coroutines only for the protocol's sake: they
    never reach a checkpoint), so a request that finds its slot free is never suspended here.
    The slots are handed to waiters by whoever frees or adds them (``_hand_out``), so the order
    is this object's, not the event loop's."""

    ticket_type = Ticket
    line_type = _Line

    def __init__(self, config: Config) -> None:
        self.timeout = config.gateway.queue_timeout
        self._lines = {m.name: self.line_type(m.name, config.max_concurrent_of(m),
                                              config.max_queue_size_of(m))
                       for m in config.models}
        total = config.gateway.max_concurrent_total
        self._total = _Stage(total) if total else None
        # How many slots a ticket in flight holds: its model's, and the shared one if any.
        self._needs = 2 if total else 1

    async def join(self, model: str, tenant: TenantSettings | None = None) -> Ticket | None:
        line = self._lines.get(model)
        if line is None:  # removed by a reload after this request's admission
            raise removed(model)
        if len(line.queue) >= line.limit:
            return None
        ticket = self.ticket_type(line)
        line.queue[ticket] = None
        line.places = None
        return ticket

    async def try_acquire(self, ticket: Ticket) -> bool:
        return self._try_acquire(ticket)

    def _try_acquire(self, ticket: Ticket) -> bool:
        line = ticket.line
        if not ticket.held:
            slots = line.slots
            if slots.waiters or slots.taken >= slots.capacity:
                return False
            slots.taken += 1
            ticket.held = 1
        total = self._total
        if total is not None and ticket.held == 1:
            if total.waiters or total.taken >= total.capacity:
                return False
            total.taken += 1
            ticket.held = 2
        self._unqueue(ticket)
        line.in_flight += 1
        return True

    async def acquire(self, ticket: Ticket) -> bool:
        if self._try_acquire(ticket):
            return True
        event = ticket.event = anyio.Event()
        ticket.since = anyio.current_time()
        if ticket.held:
            assert self._total is not None
            self._total.waiters.append(ticket)
        else:
            self._wait(ticket)
        try:
            # Not fail_after: a slot that came just as the time ran out is used, not refused.
            with anyio.move_on_after(self.timeout):
                await event.wait()
        finally:
            ticket.event = None
            if ticket.held < self._needs:
                self._give_up(ticket)
        return ticket.held == self._needs

    async def leave(self, ticket: Ticket) -> None:
        self._unqueue(ticket)
        held = ticket.held
        if held:
            ticket.held = 0
            line = ticket.line
            if held == self._needs:
                line.in_flight -= 1
            if held == 2:
                assert self._total is not None
                self._total.taken -= 1
                self._hand_out_shared()
            line.slots.taken -= 1
            self._hand_out(line)
        self._drop_if_retired(ticket.line)

    def _give_up(self, ticket: Ticket) -> None:
        """A wait that ended without its slots: out of its line and the queue, holding none."""
        line = ticket.line
        if ticket.held:
            assert self._total is not None
            self._total.waiters.remove(ticket)
            ticket.held = 0
            line.slots.taken -= 1
            self._hand_out(line)
        else:
            self._unwait(ticket)
        self._unqueue(ticket)

    def _wait(self, ticket: Ticket) -> None:
        """In its model's line for a slot (``acquire``, when none was free)."""
        ticket.line.slots.waiters.append(ticket)

    def _unwait(self, ticket: Ticket) -> None:
        """Out of its model's line without a slot (its wait ended)."""
        ticket.line.slots.waiters.remove(ticket)

    def _hand_out(self, line: _Line) -> None:
        """The model's free slots to its first waiters."""
        slots = line.slots
        while slots.waiters and slots.taken < slots.capacity:
            slots.taken += 1
            self._took_model_slot(slots.waiters.popleft())

    def _took_model_slot(self, ticket: Ticket) -> None:
        """A waiter was handed its model's slot: it takes a shared slot at once, or waits for
        one behind those already waiting."""
        ticket.held = 1
        total = self._total
        if total is None:
            self._granted(ticket)
        elif not total.waiters and total.taken < total.capacity:
            total.taken += 1
            ticket.held = 2
            self._granted(ticket)
        else:
            total.waiters.append(ticket)

    def _hand_out_shared(self) -> None:
        total = self._total
        assert total is not None
        while total.waiters and total.taken < total.capacity:
            ticket = total.waiters.popleft()
            total.taken += 1
            ticket.held = 2
            self._granted(ticket)

    def _granted(self, ticket: Ticket) -> None:
        self._unqueue(ticket)
        ticket.line.in_flight += 1
        assert ticket.event is not None
        ticket.event.set()

    @staticmethod
    def _unqueue(ticket: Ticket) -> None:
        if ticket.queued:
            ticket.queued = False
            line = ticket.line
            del line.queue[ticket]
            line.places = None

    def depth(self, model: str) -> int:
        line = self._lines.get(model)
        return len(line.queue) if line is not None else 0

    def position(self, ticket: Ticket) -> int | None:
        if not ticket.queued:
            return None
        line = ticket.line
        places = line.places
        if places is None:
            places = line.places = {t: n for n, t in enumerate(self._order(line), 1)}
        return places[ticket]

    def _order(self, line: _Line) -> Iterable[Ticket]:
        """The model's queued tickets in the order they should get their slots."""
        return line.queue

    def in_flight(self, model: str) -> int:
        line = self._lines.get(model)
        return line.in_flight if line is not None else 0

    def demand(self, model: str) -> int:
        line = self._lines.get(model)
        return len(line.queue) + line.in_flight if line is not None else 0

    def oldest_wait(self, model: str) -> float | None:
        line = self._lines.get(model)
        waiters = line.slots.waiters if line is not None else None
        return anyio.current_time() - waiters[0].since if waiters else None

    def serving(self, model: str, replicas: int) -> None:
        line = self._lines.get(model)
        if line is None:
            return
        line.replicas = replicas
        self._resize(line)

    def _resize(self, line: _Line) -> None:
        line.slots.capacity = line.per_replica * max(1, line.replicas)
        self._hand_out(line)

    def reconfigure(self, config: Config) -> None:
        self.timeout = config.gateway.queue_timeout
        total = config.gateway.max_concurrent_total
        if self._total is not None and total:
            self._total.capacity = total
            self._hand_out_shared()
        models = {m.name: m for m in config.models}
        for name, line in list(self._lines.items()):
            line.retired = name not in models
            self._drop_if_retired(line)
        for name, model in models.items():
            line = self._lines.get(name)
            if line is None:
                line = self._lines[name] = self.line_type(name, 0, 0)
            line.per_replica = config.max_concurrent_of(model)
            line.limit = config.max_queue_size_of(model)
            self._resize(line)

    def _drop_if_retired(self, line: _Line) -> None:
        if line.retired and not line.queue and not line.slots.taken:
            self._lines.pop(line.name, None)
