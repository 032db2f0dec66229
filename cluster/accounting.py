"""``RedisAccounting``: the ``kernel.accounting.Accounting`` of every gateway process that shares
a Redis and a key prefix (``[cluster]``), exact across them.

Every change is one call of one server-side Lua script (``accounting.lua``, run by EVALSHA), so
no count is read and written back from Python (a request whose slots are free and whom no one
waits before takes them at its ``join``: one call in all): joining a model's queue within
``max_queue_size``, taking slots in FIFO order (the model's ``max_concurrent`` per ready replica,
then the shared ``max_concurrent_total``), giving them back and handing them on to the next in
line, whichever process that one waits in. Times are the Redis server's (``TIME``), so the
processes' clocks do not matter. In Redis, per model: the queue (``q``, a sorted set in the
order of joining) and within it those waiting for a slot of the model's (``w``), those holding
one (``slot``) and those in flight (``fl``); the shared slots (``tt``) and their line (``tq``);
a hash per ticket (its model, owner process and state) and the set of each owner's tickets.

Each process is an owner with a lease of ``cluster.lease_s`` that its heartbeat renews every
``cluster.heartbeat_s``; every script call first drops the tickets of owners whose lease ran
out (a process killed with kill -9), so their slots and places go to the next in line (the
process whose call reclaimed them tells ``slots reclaimed``, with how many). The heartbeat
also sends the process's live tickets and those it left while Redis was unreachable: if Redis
lost the process (it restarted empty, or the lease ran out), the live ones are registered again
(a ``join`` that finds the process unregistered beats first), and the left ones
are dropped, so the counts are exact again within a heartbeat of Redis coming back.

A slot handed to a waiter is pushed to its owner's inbox (a Redis list); one blocking pop per
process wakes the waiter, and each waiter asks again every second as the safety net. The
figures the layers read without awaiting (``depth``, ``in_flight``, ``demand``,
``oldest_wait``, and the places of this process's queued tickets) come back with every call:
they are as of this process's last call (at most a heartbeat old). While Redis cannot be reached
a call raises ``GatewayError`` 503 ``state_unavailable`` (a limit is never skipped), and
``error`` says why for ``/health``; a ticket's ``leave`` then happens at the next heartbeat.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import coredis
import structlog
from anyio.abc import TaskGroup
from coredis.exceptions import RedisError

from kernel.accounting import Ticket, removed
from kernel.config import Config, TenantSettings
from kernel.errors import GatewayError, unavailable

from .members import OnEvent
from .script import LuaScript

log = structlog.get_logger("gateway.cluster")

SCRIPT = Path(__file__).with_name("accounting.lua").read_text()
# How often a waiter asks again (and the inbox pop times out), and how long one call may take.
RECHECK = 1.0
CALL_TIMEOUT = 2.0
# Figures per model in a script's reply: queued, in flight, ms the first in line has waited.
FIGURES = 3


class RedisTicket(Ticket):
    """A ticket with its key in Redis (unique across processes: the owner's name and a number)
    and its model; ``place`` is its place in the queue as of the last call."""

    __slots__ = ("id", "model", "place")

    def __init__(self, ticket_id: str, model: str) -> None:
        super().__init__(None)  # type: ignore[arg-type]  # no line here: Redis holds it
        self.id = ticket_id
        self.model = model
        self.place = 0


class RedisAccounting:
    """The accounting kept in Redis; ``running()`` connects and runs the heartbeat and the
    inbox, and gives back what the process holds when it ends. First come first served, for
    every tenant: ``cluster.fair_accounting.FairRedisAccounting`` is the one with the tenants'
    order."""

    script = SCRIPT

    def __init__(self, config: Config) -> None:
        cluster = config.cluster
        assert cluster.redis_url is not None and cluster.key_prefix is not None
        self.url = cluster.redis_url
        self.timeout = config.gateway.queue_timeout
        self.heartbeat = cluster.heartbeat
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._numbers = itertools.count(1)
        self.cluster = cluster
        self._needs = 2 if config.gateway.max_concurrent_total else 1
        self._per_replica: dict[str, int] = {}
        self._limits: dict[str, int] = {}
        self._index: dict[str, int] = {}
        self._header: list[Any] = []
        self._figures: list[int] = []
        self._configure(config, {})
        self._seen = 0.0
        self._version = 0
        # This process's live tickets, and those of them queued (whose places each call asks).
        self._tickets: dict[str, RedisTicket] = {}
        self._queued: dict[str, RedisTicket] = {}
        # Tickets left here whose leave may not have reached Redis: the next beat drops them.
        self._unsent: set[str] = set()
        self._client: coredis.Redis[str] | None = None
        self._script: LuaScript | None = None
        self._tg: TaskGroup | None = None
        # Calls awaiting their answer (what a test waits out before it reads the figures).
        self.pending = 0
        # Why the shared state cannot be used now (``/health``); None while it can.
        self.error: str | None = "not connected to Redis yet"
        # Told when a call of this process reclaims a dead process's slots and places.
        self.on_event: OnEvent | None = None

    def _configure(self, config: Config, kept: dict[str, int]) -> None:
        """The limits every call sends: the models of ``config``, and the ``kept`` ones (removed,
        with requests of this process still in them) with their slots per replica."""
        cluster = self.cluster  # fixed: a reload cannot change [cluster]
        self.timeout = config.gateway.queue_timeout
        total = config.gateway.max_concurrent_total
        self._per_replica = {**kept, **{m.name: config.max_concurrent_of(m)
                                        for m in config.models}}
        self._limits = {m.name: config.max_queue_size_of(m) for m in config.models}
        self._index = {name: i * FIGURES for i, name in enumerate(self._per_replica)}
        self._header = [cluster.key_prefix, total or 0, round(cluster.lease_s * 1000),
                        len(self._per_replica)]
        for name, per_replica in self._per_replica.items():
            self._header += [name, per_replica]
        # A call's reply holds figures per model as the header was: none until the next call.
        self._figures = [0, 0, -1] * len(self._per_replica)

    def reconfigure(self, config: Config) -> None:
        """A reload's limits, sent with every call from now on; a beat hands out at once what
        more slots there are."""
        held = {t.model for t in self._tickets.values()}
        kept = {m: n for m, n in self._per_replica.items() if m in held}
        self._configure(config, kept)
        if self._tg is not None:
            self._tg.start_soon(self._beat)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RedisAccounting]:
        client: coredis.Redis[str] = coredis.Redis.from_url(self.url, decode_responses=True)
        async with client, anyio.create_task_group() as tg:
            self._client, self._tg = client, tg
            self._script = LuaScript(client, self.script)
            await self._beat()
            tg.start_soon(self._beat_forever)
            tg.start_soon(self._wake_waiters)
            try:
                yield self
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(CALL_TIMEOUT):
                    with contextlib.suppress(GatewayError):
                        await self._call("part", self.owner)
                tg.cancel_scope.cancel()
                self._client = self._tg = None

    async def _call(self, op: str, *args: Any) -> int:
        """One EVALSHA of the script; the figures and places in its reply are kept."""
        if self._script is None:
            raise self._unavailable()
        queued = list(self._queued.values())
        header = self._header
        self.pending += 1
        try:
            with anyio.fail_after(CALL_TIMEOUT):
                reply = await self._script(*header, op, len(args), *args,
                                           *(t.id for t in queued))
        except (RedisError, OSError, TimeoutError) as exc:
            self.error = f"Redis unreachable ({type(exc).__name__}: {exc})"
            raise self._unavailable() from exc
        finally:
            self.pending -= 1
        self.error = None
        end = 2 + FIGURES * header[3]
        places = end + len(queued)
        # Calls on several connections answer in any order: keep the figures of the last to run
        # (with the models of the header in force: a reload may have changed it meanwhile).
        if reply[1] > self._version and header is self._header:
            self._version = reply[1]
            self._figures = reply[2:end]
            self._seen = anyio.current_time()
            for ticket, place in zip(queued, reply[end:places], strict=True):
                ticket.place = place
        if len(reply) > places:
            self._reclaimed(reply[places:])
        return reply[0]

    def _reclaimed(self, tail: list[Any]) -> None:
        """This call reclaimed what dead processes held: each one is told as ``slots
        reclaimed`` (to the log and ``on_event``), by this process only."""
        for i in range(0, len(tail), 3):
            fields = {"member": tail[i], "slots": tail[i + 1], "places": tail[i + 2],
                      "by": self.owner}
            log.warning("slots reclaimed", **fields)
            if self.on_event is not None:
                self.on_event("slots reclaimed", fields)

    async def _quiet(self, op: str, ticket_id: str) -> int | None:
        """A call for a ticket whose failure the heartbeat mends (it drops the ticket): None
        when Redis could not be reached."""
        try:
            return await self._call(op, ticket_id)  # bounded: CALL_TIMEOUT
        except GatewayError:
            self._unsent.add(ticket_id)
            return None

    def _unavailable(self) -> GatewayError:
        return unavailable(f"The gateway's shared state is unavailable: {self.error}.",
                           code="state_unavailable", retry_after=max(1.0, self.heartbeat))

    async def join(self, model: str, tenant: TenantSettings | None = None) -> Ticket | None:
        # One line for every tenant (without tenants' rules: ``Config.fair_queues``).
        if model not in self._limits:  # removed by a reload after this request's admission
            raise removed(model)
        ticket = RedisTicket(f"{self.owner}:{next(self._numbers)}", model)
        return await self._join(ticket)

    async def _join(self, ticket: RedisTicket, *more: Any) -> Ticket | None:
        """The join call of ``join`` (``more``: what an implementation adds to its arguments)."""
        model = ticket.model
        for _ in range(2):
            try:
                joined = await self._call("join", self.owner, ticket.id, model,
                                          self._limits[model], *more)
            except BaseException:
                self._unsent.add(ticket.id)  # it may have joined: the next beat drops it
                raise
            if joined >= 0:
                break
            await self._beat()  # Redis lost this process (it restarted): register again first
        if joined <= 0:
            return None
        self._tickets[ticket.id] = self._queued[ticket.id] = ticket
        if joined == 2:
            self._granted(ticket)
        return ticket

    async def try_acquire(self, ticket: Ticket) -> bool:
        assert isinstance(ticket, RedisTicket)
        if ticket.held != self._needs:  # not granted at its join already
            state = await self._call("try", ticket.id, ticket.model)
            if state < 0:
                self._forget(ticket)
                self.error = "this process's lease ran out and its tickets were reclaimed"
                raise self._unavailable()
            if state:
                self._granted(ticket)
        return ticket.held == self._needs

    async def acquire(self, ticket: Ticket) -> bool:
        assert isinstance(ticket, RedisTicket)
        if await self.try_acquire(ticket):
            return True
        event = ticket.event = anyio.Event()
        ticket.since = anyio.current_time()
        try:
            # Not fail_after: a slot that came just as the time ran out is used, not refused.
            with anyio.move_on_after(self.timeout):
                while ticket.held != self._needs:
                    with anyio.move_on_after(RECHECK):
                        await event.wait()
                    if ticket.held != self._needs:  # the safety net: ask
                        await self.try_acquire(ticket)
        finally:
            ticket.event = None
            if ticket.held != self._needs:
                with anyio.CancelScope(shield=True):
                    state = await self._quiet("give_up", ticket.id)
                if state == 1:
                    self._granted(ticket)
                else:
                    self._forget(ticket)
        return ticket.held == self._needs

    async def leave(self, ticket: Ticket) -> None:
        assert isinstance(ticket, RedisTicket)
        if ticket.id in self._tickets:
            self._forget(ticket)
            with anyio.CancelScope(shield=True):
                await self._quiet("leave", ticket.id)

    def _granted(self, ticket: RedisTicket) -> None:
        ticket.held = self._needs
        ticket.queued = False
        self._queued.pop(ticket.id, None)
        if ticket.event is not None:
            ticket.event.set()

    def _forget(self, ticket: RedisTicket) -> None:
        """Holding nothing any more, here: the heartbeat drops whatever Redis still holds."""
        ticket.held = 0
        ticket.queued = False
        self._queued.pop(ticket.id, None)
        self._tickets.pop(ticket.id, None)

    async def _wake_waiters(self) -> None:
        """The one blocking pop of this process's inbox: each ticket id in it got its slots."""
        # Its own reference: ``running`` clears the attribute as it cancels this task, which
        # may be about to call again (a pop that had just returned), not yet cancelled.
        client = self._client
        assert client is not None
        inbox = f"{self._header[0]}:in:{self.owner}"
        while True:
            try:
                popped = await client.blpop([inbox], timeout=RECHECK)
            except (RedisError, OSError):
                await anyio.sleep(RECHECK)
                continue
            ticket = self._tickets.get(popped[1]) if popped else None
            if ticket is not None and ticket.held != self._needs:
                self._granted(ticket)

    async def _beat(self) -> None:
        tickets = list(self._tickets.values())
        live: list[Any] = [self.owner, len(tickets)]
        for ticket in tickets:
            live += self._live(ticket)
        unsent = list(self._unsent)
        try:
            await self._call("beat", *live, *unsent)
        except GatewayError:
            return
        self._unsent.difference_update(unsent)
        # Registered again but left meanwhile: the next beat drops them.
        self._unsent.update(t.id for t in tickets if t.id not in self._tickets)

    def _live(self, ticket: RedisTicket) -> list[Any]:
        """What the heartbeat says of a live ticket (to register it again if Redis lost it)."""
        return [ticket.id, ticket.model, int(ticket.held == self._needs)]

    async def in_flight_by_tenant(self, default: str) -> dict[str, int]:
        """Each tenant's requests queued or holding slots, in every process (``default``: the
        name of the one tenant of a line for all), as of now."""
        await self._beat()
        if self.error:
            raise self._unavailable()
        return {default: sum(self.demand(model) for model in self._index)}

    async def _beat_forever(self) -> None:
        while True:
            # While Redis is away, ask every second, so that the counts are exact soon after.
            await anyio.sleep(min(self.heartbeat, RECHECK) if self.error else self.heartbeat)
            await self._beat()

    def _figure(self, model: str, which: int) -> int:
        at = self._index.get(model)
        if at is None or at + which >= len(self._figures):  # removed by a reload
            return -1 if which == 2 else 0
        return self._figures[at + which]

    def depth(self, model: str) -> int:
        return self._figure(model, 0)

    def position(self, ticket: Ticket) -> int | None:
        assert isinstance(ticket, RedisTicket)
        return (ticket.place or None) if ticket.queued else None

    def in_flight(self, model: str) -> int:
        return self._figure(model, 1)

    def demand(self, model: str) -> int:
        return self._figure(model, 0) + self._figure(model, 1)

    def oldest_wait(self, model: str) -> float | None:
        waited = self._figure(model, 2)
        return None if waited < 0 else waited / 1000 + anyio.current_time() - self._seen

    def serving(self, model: str, replicas: int) -> None:
        if self._tg is not None and model in self._per_replica:
            self._tg.start_soon(self._serving, model, self._per_replica[model] * max(1, replicas))

    async def _serving(self, model: str, slots: int) -> None:
        with anyio.move_on_after(CALL_TIMEOUT), contextlib.suppress(GatewayError):
            await self._call("serving", model, slots)
