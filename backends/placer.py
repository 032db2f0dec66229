"""Placement applied: room made for a start or a wake, and what a start or a sleep took.

Owns the locks of placement. A start or a wake holds its devices' locks from its measurement's
first read to its last, so that what it took is the devices' used memory before and after it
(starts on other devices go on meanwhile). The start lock serialises only planning and
claiming: under it the ledger is read, ``planners.place`` decides, and the victim is taken out
of service at once (its sleep begun or its stop requested, so that no other start picks it);
the victim's sleep or stop runs without the start lock, then the plan is made again. With no
room, the locks are let go while the start waits for a change, up to ``placement_timeout``;
after half of it the busy servers in its way give it their turn (``planners.yielders``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import structlog

from kernel.errors import unavailable

from . import planners
from .ledger import GpuLedger
from .planners import Device, Evict, Fits, View
from .server import Backend, Changes
from .states import ModelState

log = structlog.get_logger("gateway.pool")

MEMORY_POLL = 0.25
# Take a server out of service to make room: put it to sleep (True) or stop it.
Evictor = Callable[[Backend, bool], None]


class Placer:
    def __init__(self, servers: Sequence[Backend], ledger: GpuLedger, changes: Changes, *,
                 max_models: int, placement_timeout: float, evict: Evictor,
                 notify: Callable[[], None]) -> None:
        self.servers = servers
        self.ledger = ledger
        self.changes = changes
        self.max_models = max_models
        self.placement_timeout = placement_timeout
        self.evict = evict
        self.notify = notify
        self._start_lock: anyio.Lock | None = None
        self._device_locks: dict[Device, anyio.Lock] = {}

    def open(self) -> None:
        """Made in the event loop, as the pool begins to run."""
        self._start_lock = anyio.Lock()
        self._device_locks = {}
        self.add_devices()

    def add_devices(self) -> None:
        """A lock for each device of the servers (those a reload added too), once running."""
        if self._start_lock is None:
            return
        for device in {d for b in self.servers for d in b.devices}:
            self._device_locks.setdefault(device, anyio.Lock())

    @asynccontextmanager
    async def room(self, backend: Backend) -> AsyncIterator[None]:
        """Make room for the server (a start or a wake) and hold its devices meanwhile; 503
        once no room came within ``placement_timeout``."""
        deadline: float | None = None
        try:
            while True:
                async with AsyncExitStack() as devices:
                    for device in sorted(backend.devices, key=str):
                        await devices.enter_async_context(self._device_locks[device])
                    changed = self.changes.next()
                    while (victim := await self._plan(backend)) is not None:
                        await settled(victim, self.changes)
                        changed = self.changes.next()
                    if backend.placed:
                        self._turn_ends(backend)
                        yield
                        return
                # No room yet: wait without the locks, so that models that fit can start
                # meanwhile.
                now = anyio.current_time()
                if deadline is None:
                    deadline = now + self.placement_timeout
                elif now >= deadline - self.placement_timeout / 2 and not any(
                        r.state is ModelState.READY for r in backend.replicas):
                    # A replica added to a model that serves already takes only idle room.
                    await self._take_turn(backend)
                if now >= deadline:
                    raise unavailable(
                        f"No capacity for model '{backend.name}': every loaded model is busy.",
                        code="no_capacity", retry_after=self.placement_timeout)
                with anyio.move_on_after(min(MEMORY_POLL, deadline - now)):
                    await changed.wait()
        finally:
            self._turn_ends(backend)

    async def _plan(self, backend: Backend) -> Backend | None:
        """Under the start lock: place the server (``backend.placed``) if it fits, else claim
        the next server to make room and return it; None: placed, or no room to be had."""
        assert self._start_lock is not None
        async with self._start_lock:
            ledger = await self.ledger.read(backend.devices)
            try:
                decision = planners.place(backend.view(), self._views(), ledger, self.max_models)
            except planners.TooBig as big:
                raise unavailable(
                    f"The model '{backend.name}' needs {big.need_mb} MiB on GPU "
                    f"{big.device[1]}, which has {big.total_mb} MiB.", code="no_capacity",
                    should_retry=False) from None
            if isinstance(decision, Fits):
                backend.placed = True
            if not isinstance(decision, Evict):
                return None
            victim = self.servers[decision.victim]
            victim.evictions += 1
            log.info("putting idle model to sleep" if decision.sleep else "evicting idle model",
                     model=victim.name, for_model=backend.name, reason=decision.why)
            self.evict(victim, decision.sleep)
            return victim

    def _views(self) -> list[View]:
        return [b.view() for b in self.servers]

    async def _take_turn(self, backend: Backend) -> None:
        """The busy servers in the way of a start or a wake yield their turn to it; the others
        serve on."""
        ledger = await self.ledger.read(backend.devices)
        for key in planners.yielders(backend.view(), self._views(), ledger, self.max_models):
            other = self.servers[key]
            other.yields_to = backend
            log.info("model yields its turn", model=other.name, to_model=backend.name,
                     leases=other.leases)
            self.notify()

    def _turn_ends(self, backend: Backend) -> None:
        """The start or wake is placed or gave up: the servers that yielded to it serve on."""
        for other in self.servers:
            if other.yields_to is backend:
                other.yields_to = None
                self.notify()

    async def used(self, backend: Backend) -> dict[Device, int | None]:
        """The used memory of the server's devices, read now."""
        figures = await self.ledger.read(backend.devices, fresh=True)
        return {device: memory.used_mb for device, memory in figures.items()}

    async def grown(self, backend: Backend, before: dict[Device, int | None]) -> list[int]:
        """How much the used memory of each of the server's devices grew since ``before``
        (where both were read)."""
        after = await self.used(backend)
        return [now - was for device, now in after.items()
                if now is not None and (was := before.get(device)) is not None]


async def settled(backend: Backend, changes: Changes) -> None:
    """Until a sleep or a stop begun for the server is over."""
    if backend.state is ModelState.ASLEEP and backend.sleeping is not None:
        await backend.sleeping.wait()
    while backend.state is ModelState.STOPPING:
        await changes.wait()
