"""The pool's decisions, as pure functions of a snapshot: placement and the clock.

Owns the invariant that a decision depends on nothing but its inputs: the servers (``View``, a
frozen copy of what the pool knows of each), the GPU ledger's figures, the queue's waits and
the time. Nothing here awaits, locks or changes a server; the pool takes the decisions and
applies them (``BackendPool``), so every rule below is testable by tables, with no event loop.

- Placement (``place``): a start or a wake fits when fewer than ``max_models_concurrent``
  servers hold a slot and each of its devices has the memory it needs; else the next server to
  make room: the least recently used idle one (those on a short device first; an idle one with
  ``sleep_level`` sleeps, others stop), else one asleep on a short device (stopped); else none
  (wait). ``yielders``: once a start waited half its ``placement_timeout``, the busy servers in
  its way give it their turn.
- The clock (``tick``): replicas brought up (``min_replicas``, ``scale_up_after``), idle servers
  put to sleep or stopped after ``idle_timeout`` (never below ``min_replicas``; a model's last
  replicas first), servers asleep past ``asleep_timeout`` stopped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .states import ModelState

Device = tuple[str | None, int]
LOADED = (ModelState.READY, ModelState.DRAINING, ModelState.STOPPING)
# Brought up for requests that wait for it: started, or woken.
COMING = (ModelState.STARTING, ModelState.WAKING)


@dataclass(frozen=True, slots=True)
class View:
    """What a decision needs to know of one server. ``key`` names it in the decisions."""

    key: int
    model: str = "m"
    replica: int = 0
    state: ModelState = ModelState.READY
    leases: int = 0
    slots: int = 1
    # Ready, not leased, and not waited for (``Backend.is_idle``).
    idle: bool = False
    last_used: float = 0.0
    # A start or a wake that made its room already holds its slot.
    placed: bool = False
    devices: frozenset[Device] = frozenset()
    vram_mb: int = 0
    # GPU memory a start or a wake of it needs (a wake: less what it holds asleep).
    need_mb: int = 0
    sleeps: bool = False
    # A sleep call is in flight.
    sleeping: bool = False
    asleep_since: float = 0.0
    yields_to: int | None = None
    # Its run is over (or none began): it may start, once its backoff passed.
    run_over: bool = True
    retry_at: float = 0.0
    min_replicas: int = 0
    idle_timeout: float = 300.0
    asleep_timeout: float = 3600.0
    scale_up_after: float = 30.0

    def occupies_slot(self) -> bool:
        return self.state in LOADED or (self.state in COMING and self.placed)

    def may_start(self, now: float) -> bool:
        """Stopped, or failed with its run over and its backoff past."""
        return self.state is ModelState.STOPPED or (
            self.state is ModelState.FAILED and self.run_over and now >= self.retry_at)


@dataclass(frozen=True, slots=True)
class Memory:
    """One device's figures: its size and its used memory (None: not known or not read)."""

    total_mb: int | None = None
    used_mb: int | None = None


Ledger = Mapping[Device, Memory]


class TooBig(Exception):
    """The server needs more memory than its device has at all: it can never be placed."""

    def __init__(self, device: Device, need_mb: int, total_mb: int) -> None:
        super().__init__(device, need_mb, total_mb)
        self.device, self.need_mb, self.total_mb = device, need_mb, total_mb


@dataclass(frozen=True, slots=True)
class Fits:
    """Room enough: the start or the wake may go on."""


@dataclass(frozen=True, slots=True)
class Evict:
    """Make room: put ``victim`` to sleep (``sleep``) or stop it."""

    victim: int
    sleep: bool
    why: str


@dataclass(frozen=True, slots=True)
class Wait:
    """No room, and nothing to take it from: wait for a change."""


def may_go(server: View, servers: Sequence[View]) -> bool:
    """Idle, and not one of the ``min_replicas`` its model keeps ready."""
    return server.idle and (server.min_replicas == 0 or sum(
        s.model == server.model and s.state is ModelState.READY for s in servers)
        > server.min_replicas)


def short_devices(server: View, servers: Sequence[View], ledger: Ledger) -> frozenset[Device]:
    """The server's devices that lack the memory it needs. Where the used memory is not read,
    it is the configured figures of the servers that hold a slot there."""
    need = server.need_mb
    short = set()
    for device in sorted(server.devices, key=str) if need else ():
        memory = ledger.get(device, Memory())
        if memory.total_mb is None:
            continue
        if need > memory.total_mb:
            raise TooBig(device, need, memory.total_mb)
        used = memory.used_mb
        if used is None:
            used = sum(s.vram_mb for s in servers
                       if s.key != server.key and s.occupies_slot() and device in s.devices)
        if memory.total_mb - used < need:
            short.add(device)
    return frozenset(short)


def place(server: View, servers: Sequence[View], ledger: Ledger,
          max_models: int) -> Fits | Evict | Wait:
    """Whether the server fits now, else which server makes room next."""
    over_budget = sum(s.occupies_slot() for s in servers) >= max_models
    short = short_devices(server, servers, ledger)
    if not over_budget and not short:
        return Fits()
    # The least recently used first, but one on a short device frees a slot as well.
    idle = sorted((s for s in servers if may_go(s, servers) and (over_budget or short & s.devices)),
                  key=lambda s: (not short & s.devices, s.last_used))
    asleep = sorted((s for s in servers if short & s.devices
                     and s.state is ModelState.ASLEEP and not s.sleeping),
                    key=lambda s: s.last_used)
    if not idle and not asleep:
        return Wait()
    victim = (idle or asleep)[0]
    return Evict(victim.key, victim.state is ModelState.READY and victim.sleeps,
                 "model budget" if over_budget else "GPU memory")


def yielders(server: View, servers: Sequence[View], ledger: Ledger,
             max_models: int) -> list[int]:
    """The busy servers that give their turn to a start or a wake that waited: those on its
    short devices, and where it needs a place in ``max_models_concurrent``, one more (the one
    with the fewest leases, then the least recently used) unless one yields to it already."""
    serving = [s for s in servers
               if s.state is ModelState.READY and s.yields_to is None and s.key != server.key]
    short = short_devices(server, servers, ledger)
    in_the_way = [s for s in serving if short & s.devices]
    yielding = in_the_way or any(s.yields_to == server.key for s in servers)
    over_budget = sum(s.occupies_slot() for s in servers) >= max_models
    if over_budget and serving and not yielding:
        in_the_way.append(min(serving, key=lambda s: (s.leases, s.last_used)))
    return [s.key for s in in_the_way]


# -- the clock ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BringUp:
    """Bring up a replica: wake it (``wake``) or start it; ``why``: min_replicas or saturated."""

    key: int
    wake: bool
    why: str
    ready: int


@dataclass(frozen=True, slots=True)
class Reap:
    """An idle server's ``idle_timeout`` passed: sleep it (``sleep``) or stop it."""

    key: int
    sleep: bool
    # One of several replicas: a scale-down.
    scale_down: bool


@dataclass(frozen=True, slots=True)
class Expire:
    """The server slept past its ``asleep_timeout``: stop it."""

    key: int


@dataclass(frozen=True, slots=True)
class Tick:
    up: list[BringUp] = field(default_factory=list)
    reap: list[Reap] = field(default_factory=list)
    expire: list[Expire] = field(default_factory=list)


def bring_up(replicas: Sequence[View], waited: float | None, now: float) -> BringUp | None:
    """One more replica of a model, one at a time: while fewer than ``min_replicas`` are ready,
    or once a request waited ``scale_up_after`` for a slot with every ready replica's slots
    taken. An asleep one is woken before a stopped one starts."""
    if any(r.state in COMING for r in replicas):
        return None
    first = replicas[0]
    ready = [r for r in replicas if r.state is ModelState.READY]
    if len(ready) < first.min_replicas:
        why = "min_replicas"
    elif ready and waited is not None and waited >= first.scale_up_after and all(
            r.leases >= r.slots for r in ready):
        why = "saturated"
    else:
        return None
    spare = next((r for r in replicas if r.state is ModelState.ASLEEP and not r.sleeping),
                 None) or next((r for r in replicas if r.may_start(now)), None)
    if spare is None:
        return None
    return BringUp(spare.key, spare.state is ModelState.ASLEEP, why, len(ready))


def reaps(server: View, servers: Sequence[View], now: float) -> bool:
    """Idle (no lease, no request waiting for it) for its ``idle_timeout``, and not kept."""
    return may_go(server, servers) and now - server.last_used >= server.idle_timeout


def tick(servers: Sequence[View], scaled: Sequence[Sequence[View]],
         waited: Mapping[str, float | None], now: float) -> Tick:
    """The reaper's decisions at ``now``: replicas brought up for the ``scaled`` models (each
    one's replicas), then, a model's last replicas first, idle servers reaped (a server reaped
    no longer counts as ready for the next one's ``min_replicas``), and servers asleep past
    their ``asleep_timeout`` stopped."""
    decisions = Tick()
    for replicas in scaled:
        up = bring_up(replicas, waited.get(replicas[0].model), now)
        if up is not None:
            decisions.up.append(up)
    woken = {up.key for up in decisions.up if up.wake}
    now_servers = list(servers)
    for i in reversed(range(len(now_servers))):
        server = now_servers[i]
        if reaps(server, now_servers, now):
            multi = sum(s.model == server.model for s in now_servers) > 1
            decisions.reap.append(Reap(server.key, server.sleeps, multi))
            now_servers[i] = View(key=server.key, model=server.model, state=ModelState.STOPPING)
        elif (server.state is ModelState.ASLEEP and not server.sleeping
              and server.key not in woken and now - server.asleep_since >= server.asleep_timeout):
            decisions.expire.append(Expire(server.key))
    return decisions
