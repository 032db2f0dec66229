"""One server of a model (a replica): what the pool knows of it, and the pure reads of that.

Owns the server's observed state (``Backend``: its state, leases, run, memory, counters) and
the read made of it on the request path when no replica is ready: ``bring_up_order`` (the one
to wait for; ``routing.route`` picks among the ready ones). A ``Backend``'s ``state`` is written
by ``states.move`` only; the rest by the pool's controller (``runs``, ``placer``, ``pool``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from kernel.config import ModelSettings
from kernel.errors import GatewayError

from . import planners
from .launcher import Launcher
from .model import Model
from .planners import COMING, LOADED, View
from .states import ModelState
from .static import StaticLauncher

# The error codes of a model that is ``failed``: its start, its server or its stop went wrong.
START_FAILED = "model_start_failed"
UNAVAILABLE = "backend_unavailable"
FAILED = (START_FAILED, UNAVAILABLE)
# What a run is told: to put its server to sleep (no start), or to wake it (the wake's start).
Command = tuple[str, "Start | None"]
SLEEP = "sleep"
WAKE = "wake"


class Changes:
    """Any server's change: whoever waits for one is woken at the next (made in the loop)."""

    def __init__(self) -> None:
        self.event: anyio.Event | None = None

    def reset(self) -> None:
        self.event = anyio.Event()

    def tell(self) -> None:
        assert self.event is not None
        self.event, told = anyio.Event(), self.event
        told.set()

    def next(self) -> anyio.Event:
        """The event the next change sets (taken before a lock is let go, so that a change
        meanwhile is not missed)."""
        assert self.event is not None
        return self.event

    async def wait(self) -> None:
        await self.next().wait()


@dataclass(eq=False)
class Start:
    """One start or wake; the requests that wait for it get its outcome (an error; None after
    a wake: ready, or stopped and to be started cold)."""

    done: anyio.Event = field(default_factory=anyio.Event)
    error: GatewayError | None = None


@dataclass(eq=False)
class Backend:
    """The observed state of one server of a model (a replica)."""

    settings: ModelSettings
    launcher: Launcher
    state: ModelState = ModelState.STOPPED
    leases: int = 0
    last_used: float = 0.0
    placed: bool = False
    failure: str | None = None
    failure_code: str = START_FAILED
    retry_at: float = 0.0
    measured_vram_mb: int | None = None
    starts: int = 0
    evictions: int = 0
    start: Start | None = None
    scope: anyio.CancelScope | None = None
    stop_reason: str | None = None
    sleeps: int = 0
    wakes: int = 0
    asleep_since: float = 0.0
    # GPU memory the server still held once asleep, as measured (NVML); None: not measured.
    asleep_vram_mb: int | None = None
    # Set while a sleep call is in flight (a wake waits for it); None otherwise.
    sleeping: anyio.Event | None = None
    # False once this run's server turned out to have no sleep API; warned: said so in the log.
    sleep_capable: bool = True
    warned_no_sleep: bool = False
    # Set while the model gives its turn to a start or a wake waiting for room: no new lease.
    yields_to: Backend | None = None
    # Which server of the model this is (``max_replicas``), its requests' slots, and its model
    # (made for it when not given), which lists it among its replicas.
    replica: int = 0
    slots: int = 1
    model: Model | None = field(default=None, repr=False)
    # The run's command stream (``runs``): sleep and wake; None while no run is on.
    commands: MemoryObjectSendStream[Command] | None = None
    # Why and when the state last changed (``states.move``), and whom it tells.
    reason: str = ""
    since: float = 0.0
    notify: Callable[[], None] = lambda: None
    # Its place in the pool's servers: its name in the planners' decisions.
    key: int = 0

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = Model(self.settings)
        self.model.replicas.append(self)

    @property
    def of(self) -> Model:
        assert self.model is not None
        return self.model

    @property
    def replicas(self) -> list[Backend]:
        return self.of.replicas

    @property
    def waiting(self) -> int:
        """The requests waiting in ``lease`` for the model (the model's)."""
        return self.of.waiting

    @waiting.setter
    def waiting(self, waiting: int) -> None:
        self.of.waiting = waiting

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def address(self) -> str | None:
        return self.launcher.address

    @property
    def static(self) -> bool:
        """A server someone else runs: watched, never started or stopped."""
        return isinstance(self.launcher, StaticLauncher)

    @property
    def vram_mb(self) -> int:
        return self.measured_vram_mb or self.settings.vram_mb

    @property
    def devices(self) -> set[tuple[str | None, int]]:
        """The GPUs the server runs on, each named with its engine (its host)."""
        return {(self.settings.engine, g) for g in self.settings.gpus}

    def is_idle(self) -> bool:
        """Ready, and neither leased nor waited for by a request (one that is about to lease
        it, or one the gateway queues for it, that the model's other replicas do not serve),
        unless it gave its turn away."""
        return self.state is ModelState.READY and self.leases == 0 and (
            self.yields_to is not None or self.of.unserved(self) <= 0)

    def occupies_slot(self) -> bool:
        return self.state in LOADED or (self.state in COMING and self.placed)

    def view(self) -> View:
        """What the planners know of the server."""
        s = self.settings
        return View(
            key=self.key, model=s.name, replica=self.replica, state=self.state,
            leases=self.leases, slots=self.slots, idle=self.is_idle(), last_used=self.last_used,
            placed=self.placed, devices=frozenset(self.devices), vram_mb=self.vram_mb,
            need_mb=self.need_mb(), sleeps=self.sleeps_when_idle(),
            sleeping=self.sleeping is not None, asleep_since=self.asleep_since,
            yields_to=None if self.yields_to is None else self.yields_to.key,
            run_over=self.scope is None, retry_at=self.retry_at, min_replicas=s.min_replicas,
            idle_timeout=s.idle_timeout, asleep_timeout=s.asleep_timeout,
            scale_up_after=s.scale_up_after)

    def sleeps_when_idle(self) -> bool:
        return (self.settings.sleep_level is not None and self.sleep_capable
                and not self.mirrored)

    @property
    def mirrored(self) -> bool:
        """Whether the run is a view of a server another process of the cluster owns
        (``backends.shared``): it is routed to, never put to sleep, woken or stopped."""
        return bool(getattr(self.launcher, "mirrors", False))

    def need_mb(self) -> int:
        """GPU memory a start or a wake needs: a wake needs less what the server still holds."""
        if self.state is ModelState.WAKING and self.asleep_vram_mb is not None:
            return max(0, self.vram_mb - self.asleep_vram_mb)
        return self.vram_mb


def bring_up_order(backend: Backend) -> tuple[int, int]:
    """With no replica ready, the one a request waits for: one coming up, then one that is busy
    (draining, stopping, yielding its turn), then one asleep, then one that may start; last one
    failed within its backoff (its refusal is the answer)."""
    state = backend.state
    if state in COMING:
        rank = 0
    elif state in LOADED:
        rank = 1
    elif state is ModelState.ASLEEP:
        rank = 2
    elif backend.view().may_start(anyio.current_time()):
        rank = 3
    else:
        rank = 4
    return rank, backend.replica


def should_reap(backend: Backend, now: float) -> bool:
    """The reaper's decision: stop a backend idle (no lease, no request waiting for it) for its
    ``idle_timeout``, unless the model keeps it (``min_replicas``)."""
    return planners.reaps(backend.view(), [r.view() for r in backend.replicas], now)
