"""The backend pool: each model's lifecycle, placement on the GPUs, and leases.

States: ``stopped -> starting -> ready -> draining -> stopping -> stopped``, and ``failed``
(with a backoff) when a start or a stop fails. Each run of a model is one task in the pool's
task group, from the start to the stop, so whatever ends it (idle, eviction, death, a failed
health check, shutdown) goes through the same ``finally`` that stops the launcher. Whatever a
launcher, an engine or NVML raises in that task is the model's failure, never the pool's: the
model goes ``failed`` with the reason, its bookkeeping completes, the other models serve on.

- Health: a ready server is checked every ``health_interval``; after ``health_failures`` failed
  checks in a row it is stopped (and started again by the next request). A static server has
  nothing to restart: it is checked from the pool's start on, and while it is down it is
  ``failed`` and its requests get 503 at once, until a check passes again.

- ``lease(name)`` starts a stopped model (concurrent callers share one start), waits for it to
  be healthy and counts the lease until the block exits; nothing stops a model with leases, nor
  one that requests wait for (a model that just became ready is theirs before it is idle).
- Starts on one GPU are serialised: vLLM sizes its cache from the free memory it sees, and the
  memory a start took is measured as the devices' used memory before and after it. Starts on
  other devices (or none) go on meanwhile, so one slow or hung start holds up only its GPUs.
- Placement: before a start, if ``max_models_concurrent`` models are loaded or a device lacks
  the model's VRAM, the least recently used idle models are stopped (those on a short device
  first); if none is idle, the start waits for one (bounded by ``placement_timeout``), then
  every waiting request gets 503. A start that waits for room lets other starts go first.
- Turns (no thrash): requests the gateway holds for a model outside the pool (queued for a slot
  or holding one: ``count_demand``) keep it from being idle, so a model serves its run of
  requests before it is swapped out, not one request per swap. Once a start or a wake has
  waited half its ``placement_timeout``, the busy models in its way yield their turn: they take
  no new lease, those in flight finish, and they are then evicted even though requests wait
  for them (those wait for the model's next turn).
- The reaper stops a ready model with no leases after its ``idle_timeout``. It checks and
  changes the state in one synchronous step, so it cannot race a lease.
- Sleep (vLLM's sleep mode, ``backends.sleep``): a model with ``sleep_level`` is put to sleep
  instead of stopped, when it is idle for its ``idle_timeout`` or evicted: ``ready -> asleep``,
  its server still running. An asleep model holds no slot of ``max_models_concurrent``; at most
  ``max_models_asleep`` sleep (the one asleep longest is stopped for another), and each is
  stopped after its ``asleep_timeout``. A request for it wakes it: ``asleep -> waking ->
  ready``, placed as a start is (room made first); nothing is leased until the server says it
  is awake. A server without the sleep API is stopped instead (one warning); a wake that fails
  stops the server and its requests start it cold.
- Replicas: a model with ``max_replicas`` has that many ``Backend``s, each one server with all
  of the above (``replicas[name]``; ``backends[name]`` is the first). ``route`` sends a request
  to the least loaded ready one, or to its session's (rendezvous hashing) within
  ``affinity_slack`` of the average load. The reaper brings one more up, one at a time per
  model, while fewer than ``min_replicas`` are ready or once a request waited ``scale_up_after``
  for a slot with every ready one saturated (``watch_queue``); such a start takes only idle
  room. A replica is idle when the model's other replicas serve its demand; ``min_replicas``
  are never reaped or evicted.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace

import anyio
import httpx2
import structlog
from anyio.abc import TaskGroup

from kernel.config import Config, ModelSettings, placement
from kernel.errors import GatewayError, not_found, unavailable

from . import planners
from . import sleep as sleep_mode
from .gpu import ConfiguredMemory, GpuMemory
from .launcher import Launcher, LaunchError, Supervisor
from .ledger import GpuLedger
from .planners import COMING, LOADED, Device, Evict, Fits, View
from .states import Event, ModelState, move
from .static import StaticLauncher

log = structlog.get_logger("gateway.pool")

HEALTH_INTERVAL = 0.05
HEALTH_TIMEOUT = 2.0
MEMORY_POLL = 0.25
REAP_INTERVAL_MAX = 1.0
REFUSED = "it refuses connections"


# A model with replicas is in the first of these states that one of them is in.
MODEL_STATE_ORDER = (ModelState.READY, ModelState.WAKING, ModelState.STARTING,
                     ModelState.DRAINING, ModelState.STOPPING, ModelState.ASLEEP,
                     ModelState.FAILED, ModelState.STOPPED)
# The error codes of a model that is ``failed``: its start, its server or its stop went wrong.
START_FAILED = "model_start_failed"
UNAVAILABLE = "backend_unavailable"
FAILED = (START_FAILED, UNAVAILABLE)


@dataclass(eq=False)
class _Start:
    """One start attempt; the requests that wait for it get its outcome."""

    done: anyio.Event = field(default_factory=anyio.Event)
    error: GatewayError | None = None


@dataclass(eq=False)
class Backend:
    """The running state of one configured model."""

    settings: ModelSettings
    launcher: Launcher
    state: ModelState = ModelState.STOPPED
    leases: int = 0
    waiting: int = 0
    last_used: float = 0.0
    placed: bool = False
    failure: str | None = None
    failure_code: str = START_FAILED
    retry_at: float = 0.0
    measured_vram_mb: int | None = None
    starts: int = 0
    evictions: int = 0
    start: _Start | None = None
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
    # Requests for the model the gateway holds outside the pool (``BackendPool.count_demand``).
    demand: Callable[[], int] = lambda: 0
    # Set while the model gives its turn to a start or a wake waiting for room: no new lease.
    yields_to: Backend | None = None
    # Which server of the model this is (``max_replicas``), its requests' slots, and every
    # server of the model, itself among them; the first holds the model's ``waiting``.
    replica: int = 0
    slots: int = 1
    replicas: list[Backend] = field(default_factory=list, repr=False)
    scale_ups: int = 0
    scale_downs: int = 0
    # The first replica's: how many of the model's replicas were ready when last told.
    serving: int = 0
    # Why and when the state last changed (``states.move``), and whom it tells.
    reason: str = ""
    since: float = 0.0
    notify: Callable[[], None] = lambda: None
    # Its place in the pool's servers: its name in the planners' decisions.
    key: int = 0

    def __post_init__(self) -> None:
        self.replicas.append(self)

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
            self.yields_to is not None or self._unserved() <= 0)

    def _unserved(self) -> int:
        unserved = self.replicas[0].waiting + self.demand()
        if len(self.replicas) > 1:
            unserved -= sum(r.leases for r in self.replicas if r is not self)
        return unserved

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
        return self.settings.sleep_level is not None and self.sleep_capable

    def need_mb(self) -> int:
        """GPU memory a start or a wake needs: a wake needs less what the server still holds."""
        if self.state is ModelState.WAKING and self.asleep_vram_mb is not None:
            return max(0, self.vram_mb - self.asleep_vram_mb)
        return self.vram_mb


LauncherFactory = Callable[[ModelSettings], Launcher]


class BackendPool:
    def __init__(self, config: Config, *, launchers: LauncherFactory,
                 gpu: GpuMemory | None = None,
                 on_ready: Callable[[str, float], None] | None = None,
                 on_wake: Callable[[str, float], None] | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        self.config = config
        self.on_ready = on_ready
        self.on_wake = on_wake
        # Told after every change of a model's state (the admin API's event stream).
        self.on_change = on_change
        self.ledger = GpuLedger(gpu or ConfiguredMemory(config.gateway.gpu_memory_mb),
                                config.engines, config.gateway.gpu_memory_mb)
        # Every server of every model, each model's first under its name.
        self.replicas = {m.name: self._servers_of(m, launchers) for m in config.models}
        self.backends = {name: servers[0] for name, servers in self.replicas.items()}
        self.servers = [b for servers in self.replicas.values() for b in servers]
        for key, backend in enumerate(self.servers):
            backend.key = key
        self.replicated = [servers[0] for servers in self.replicas.values() if len(servers) > 1]
        # The models the reaper may bring a server up for: load, or min_replicas to keep.
        self.scaled = [servers[0] for servers in self.replicas.values()
                       if len(servers) > 1 or servers[0].settings.min_replicas]
        # Told how many replicas of a model are ready, as it changes (its slots follow).
        self.on_serving: Callable[[str, int], None] | None = None
        self._queued: Callable[[str], float | None] = lambda name: None
        self.max_models = config.gateway.max_models_concurrent
        self.placement_timeout = config.gateway.placement_timeout
        self.max_asleep = config.gateway.max_models_asleep
        self.reap_interval = min(REAP_INTERVAL_MAX,
                                 *(m.idle_timeout / 10 for m in config.models),
                                 *(m.asleep_timeout / 10 for m in config.models
                                   if m.sleep_level is not None),
                                 *(m.scale_up_after / 4 for m in config.models
                                   if m.max_replicas > 1))
        self._changed: anyio.Event | None = None
        self._start_lock: anyio.Lock | None = None
        self._device_locks: dict[tuple[str | None, int], anyio.Lock] = {}
        self._tg: TaskGroup | None = None
        self._health: httpx2.AsyncClient | None = None
        self.supervisor = Supervisor()

    def _servers_of(self, model: ModelSettings, launchers: LauncherFactory) -> list[Backend]:
        """The model's servers, each with its placement (the alternatives in turn)."""
        servers: list[Backend] = []
        for i in range(model.max_replicas):
            engine, gpus = placement(model, i)
            settings = model if i == 0 else replace(model, engine=engine, gpus=gpus, replica=i)
            # The new server joins ``servers`` itself.
            Backend(settings, launchers(settings), replica=i,
                    slots=self.config.max_concurrent_of(model), replicas=servers,
                    notify=self._notify)
        return servers

    @asynccontextmanager
    async def running(self) -> AsyncIterator[BackendPool]:
        """Run the pool: the reaper and every model's lifecycle live inside this block."""
        self._changed = anyio.Event()
        self._start_lock = anyio.Lock()
        self._device_locks = {d: anyio.Lock() for b in self.servers for d in b.devices}
        async with httpx2.AsyncClient(timeout=HEALTH_TIMEOUT, trust_env=False) as health:
            self._health = health
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self.supervisor.run, "the idle reaper", self._reap)
                for backend in self.servers:
                    # A static server is watched from the start, so that a request for one
                    # that is down is refused at once.
                    if backend.launcher.has_running() or backend.static:
                        self._launch(backend)
                self._bring_up(anyio.current_time())
                try:
                    yield self
                finally:
                    for backend in self.servers:
                        self.request_stop(backend, "gateway stopping")
                    tg.cancel_scope.cancel()
            self._tg = None

    @property
    def gpu(self) -> GpuMemory:
        """This host's GPU memory (NVML, else the configured figures)."""
        return self.ledger.local

    @gpu.setter
    def gpu(self, local: GpuMemory) -> None:
        self.ledger.local = local

    def state_of(self, name: str) -> ModelState:
        """The model's state: its one server's, or of its replicas the one nearest to serving
        (ready if one is)."""
        replicas = self.replicas[name]
        if len(replicas) == 1:
            return replicas[0].state
        states = {r.state for r in replicas}
        return next(s for s in MODEL_STATE_ORDER if s in states)

    def count_demand(self, demand: Callable[[str], int]) -> None:
        """Count ``demand(name)``, the requests the gateway holds for a model outside the pool,
        as requests that wait for it: a model is not idle while it has them."""
        for name, servers in self.replicas.items():
            for backend in servers:
                backend.demand = functools.partial(demand, name)

    def watch_queue(self, oldest_wait: Callable[[str], float | None]) -> None:
        """``oldest_wait(name)``: seconds the longest-waiting request of the model has waited
        for a slot (None: none waits); a saturated model gains a replica after
        ``scale_up_after`` of it."""
        self._queued = oldest_wait

    def problem(self) -> str | None:
        """Why the pool no longer does its work (``/health`` says so), or None."""
        if self._tg is None:
            return "the backend pool is not running"
        return self.supervisor.problem

    def _notify(self) -> None:
        assert self._changed is not None
        self._changed, changed = anyio.Event(), self._changed
        changed.set()
        self.ledger.forget()
        for first in self.replicated:
            serving = sum(r.state is ModelState.READY for r in first.replicas)
            if serving != first.serving and self.on_serving is not None:
                first.serving = serving
                self.on_serving(first.name, serving)
        if self.on_change is not None:
            self.on_change()

    @asynccontextmanager
    async def lease(self, name: str, *, session: str | None = None, avoid: int | None = None,
                    pin: tuple[int, int] | None = None) -> AsyncIterator[Backend]:
        """A ready backend of the model, kept from stopping until the block exits: of its
        replicas, the session's (bounded by ``affinity_slack``), else the least loaded, and
        not replica ``avoid`` (whose connect failed) while another is ready. With ``pin``
        (replica, run): that run of that replica only, woken if it sleeps, never started."""
        first = self.backends[name]
        first.waiting += 1
        try:
            if pin is None:
                backend = await self._until_ready(first, session, avoid)
            else:
                backend = await self._until_pinned(first.replicas[pin[0]], pin[1])
        finally:
            first.waiting -= 1
        backend.leases += 1
        backend.last_used = anyio.current_time()
        try:
            yield backend
        finally:
            backend.leases -= 1
            backend.last_used = anyio.current_time()
            if backend.leases == 0:
                self._notify()

    async def _until_ready(self, first: Backend, session: str | None,
                           avoid: int | None) -> Backend:
        while True:
            if len(first.replicas) == 1:
                if first.state is ModelState.READY and first.yields_to is None:
                    return first
                backend = first
            else:
                chosen = route(first.replicas, session, avoid)
                if chosen is not None:
                    return chosen
                backend = min(first.replicas, key=_bring_up_order)
            # Started if it may be; a failed one is refused within its backoff, and a static
            # server that is down (its watch still runs) until a check passes.
            if backend.view().may_start(anyio.current_time()):
                self._launch(backend)
            elif backend.state is ModelState.FAILED:
                raise self._refusal(backend)
            elif backend.state is ModelState.ASLEEP:
                self._begin_wake(backend)
            start = backend.start
            if backend.state in COMING and start is not None:
                # A wake that failed ends without an error: the loop then starts the model cold.
                await start.done.wait()
                if start.error is not None:
                    raise start.error.fresh()
            else:
                assert self._changed is not None
                await self._changed.wait()

    async def _until_pinned(self, backend: Backend, run: int) -> Backend:
        """The server that made a stored response, as long as it runs: another run of it has
        none of that one's responses, so it is not started for one."""
        while backend.starts == run:
            if backend.state is ModelState.READY and backend.yields_to is None:
                return backend
            if backend.state is ModelState.ASLEEP:  # asleep, it keeps what it holds in memory
                self._begin_wake(backend)
            start = backend.start
            if backend.state is ModelState.WAKING and start is not None:
                await start.done.wait()
                if start.error is not None:
                    raise start.error.fresh()
            elif backend.state is ModelState.READY:  # it yields its turn to another start
                assert self._changed is not None
                await self._changed.wait()
            else:
                break
        raise not_found(f"The server of model '{backend.name}' that made this response has "
                        "stopped since, and the response with it.", code="response_not_found",
                        param="response_id")

    def _refusal(self, backend: Backend) -> GatewayError:
        what = "failed to start" if backend.failure_code == START_FAILED else "is unavailable"
        wait = backend.retry_at - anyio.current_time()
        return unavailable(f"The model '{backend.name}' {what}: {backend.failure}",
                           code=backend.failure_code,
                           retry_after=wait if wait > 0 else backend.settings.health_interval)

    def _launch(self, backend: Backend) -> None:
        assert self._tg is not None, "the pool is not running"
        backend.placed = False
        backend.stop_reason = None
        backend.sleep_capable = True
        backend.start = _Start()
        # Made here, not in the task, so that a stop requested before the task runs is kept.
        backend.scope = anyio.CancelScope()
        self._tg.start_soon(self._lifecycle, backend, backend.start, backend.scope)
        move(backend, Event.LAUNCH)

    async def _lifecycle(self, backend: Backend, start: _Start, scope: anyio.CancelScope) -> None:
        # This task outlives the request that launched it: its lines are the model's, not that
        # request's (the launching request logs its own id with "model starting").
        launched_by = structlog.contextvars.get_contextvars().get("request_id")
        structlog.contextvars.clear_contextvars()
        if len(backend.replicas) > 1:
            structlog.contextvars.bind_contextvars(replica=backend.replica)
        outcome: GatewayError | None = None
        try:
            with scope:
                async with anyio.create_task_group() as helpers:
                    outcome = await self._run(backend, start, helpers, launched_by)
                    # The helpers (an output reader) end with the server, which is stopped below.
                    helpers.cancel_scope.cancel()
        except Exception as exc:  # a launcher's helper, or the watch, raised: the model's failure
            log.exception("model failed", model=backend.name)
            outcome = self._failure(backend, UNAVAILABLE, exc)
        finally:
            # No lease from here on: the launcher forgets the address as it stops.
            move(backend, Event.RUN_ENDS, backend.stop_reason or "")
            with anyio.CancelScope(shield=True):
                try:
                    await backend.launcher.stop()
                except Exception as exc:
                    log.exception("model stop failed", model=backend.name)
                    failed = self._failure(backend, UNAVAILABLE, exc, "its stop failed: ")
                    outcome = outcome if outcome is not None and outcome.code in FAILED else failed
                finally:
                    self._after_stop(backend, start, outcome)

    def _failure(self, backend: Backend, code: str, exc: Exception,
                 what: str = "") -> GatewayError:
        """Record why the model failed; the error its requests get. A LaunchError's message is
        written for the client; anything else is named only by its type (the log has it)."""
        told = str(exc) if isinstance(exc, LaunchError) else (
            f"an unexpected {type(exc).__name__} (see the gateway's log)")
        backend.failure = what + (str(exc) or type(exc).__name__)
        backend.failure_code = code
        verb = "failed to start" if code == START_FAILED else "is unavailable"
        return unavailable(f"The model '{backend.name}' {verb}: {what}{told}", code=code,
                           retry_after=backend.settings.failure_backoff)

    async def _run(self, backend: Backend, start: _Start, helpers: TaskGroup,
                   launched_by: str | None) -> GatewayError | None:
        """Start the model and serve until it dies or fails its health checks; return why the
        start failed, if it did."""
        try:
            problem = await self._start(backend, helpers, launched_by)
        except GatewayError as exc:
            return exc
        except Exception as exc:
            if not isinstance(exc, LaunchError):
                log.exception("model start raised", model=backend.name)
            error = self._failure(backend, START_FAILED, exc)
            log.error("model failed to start", model=backend.name, reason=backend.failure,
                      output=await self._output_tail(backend))
            return error
        if problem is not None:
            self._down(backend, problem)
        else:
            self._become_ready(backend, start)
        backend.failure = await self._until_down(backend)
        return None

    async def _output_tail(self, backend: Backend) -> str:
        """The server's last lines for the log; never fails, never hangs the stop."""
        with anyio.move_on_after(HEALTH_TIMEOUT):
            try:
                return await backend.launcher.output_tail()
            except Exception as exc:
                return f"(no output: {exc!r})"
        return "(no output: the launcher did not give it in time)"

    async def _until_down(self, backend: Backend) -> str:
        """Wait until the server dies or fails its health checks; why it is out of service."""
        reason = ""
        async with anyio.create_task_group() as watch:
            async def out_of_service(event: str, why: str) -> None:
                nonlocal reason
                if not reason:  # the first one to see it says why
                    reason = why
                    log.error(event, model=backend.name, reason=why,
                              output=await self._output_tail(backend))
                    watch.cancel_scope.cancel()

            async def died() -> None:
                await out_of_service("model died", f"died: {await backend.launcher.wait_exit()}")

            async def unhealthy() -> None:
                problem = await self._watch_health(backend)
                await out_of_service("model unhealthy", f"unhealthy: {problem}")

            watch.start_soon(died)
            watch.start_soon(unhealthy)
        return reason

    async def _watch_health(self, backend: Backend) -> str:
        """Check the server every ``health_interval``; return the last problem once
        ``health_failures`` checks in a row failed. A static server is not ended: it is marked
        down, and up again when a check passes."""
        settings = backend.settings
        failed = 0
        while True:
            await anyio.sleep(settings.health_interval)
            problem = await self._check(backend)
            if problem is None:
                failed = 0
                if backend.state is ModelState.FAILED:
                    self._up_again(backend)
                continue
            failed += 1
            if failed < settings.health_failures:
                continue
            if not backend.static:
                return problem
            if backend.state is ModelState.READY:
                self._down(backend, problem)

    async def _check(self, backend: Backend) -> str | None:
        """One health check of the running server: None if it passed, else what was wrong
        (no address: that is for the log and the admin, the client gets the model's name)."""
        assert self._health is not None and backend.address is not None
        try:
            response = await self._health.get(backend.address + backend.settings.health_path)
        except httpx2.TimeoutException:
            return f"no answer to its health check within {HEALTH_TIMEOUT:g} s"
        except httpx2.ConnectError:
            return REFUSED
        except httpx2.TransportError as exc:
            return f"its health check failed ({type(exc).__name__})"
        if response.status_code != 200:
            return f"its health check answered {response.status_code}"
        return None

    def _down(self, backend: Backend, problem: str) -> None:
        """A static server found down: its requests are refused at once until it is up."""
        backend.failure = f"down: {problem}"
        backend.failure_code = UNAVAILABLE
        backend.retry_at = 0.0
        start = backend.start
        if start is not None and not start.done.is_set():
            start.error = self._refusal(backend)
            start.done.set()
        log.warning("model down", model=backend.name, reason=problem)
        move(backend, Event.DOWN, problem)

    def _up_again(self, backend: Backend) -> None:
        log.info("model up again", model=backend.name)
        assert backend.start is not None
        self._become_ready(backend, backend.start, Event.UP)

    def _become_ready(self, backend: Backend, start: _Start,
                      event: Event = Event.HEALTHY) -> None:
        backend.failure = None
        backend.last_used = anyio.current_time()
        backend.starts += 1
        start.done.set()
        log.info("model ready", model=backend.name, address=backend.address,
                 vram_mb=backend.vram_mb)
        move(backend, event)

    def _after_stop(self, backend: Backend, start: _Start, outcome: GatewayError | None) -> None:
        backend.scope = None
        backend.placed = False
        failed = outcome is not None and outcome.code in FAILED
        if failed:
            backend.retry_at = anyio.current_time() + backend.settings.failure_backoff
        if not start.done.is_set():
            start.error = outcome or unavailable(
                f"The model '{backend.name}' was stopped while starting.",
                code="model_stopped", retry_after=1)
            start.done.set()
        if backend.stop_reason:
            log.info("model stopped", model=backend.name, reason=backend.stop_reason)
        move(backend, Event.RUN_FAILED if failed else Event.STOPPED,
             backend.failure or "" if failed else backend.stop_reason or "")

    async def _start(self, backend: Backend, helpers: TaskGroup,
                     launched_by: str | None) -> str | None:
        """Make room, start the server, wait for its health; a static server that nothing
        listens at is not waited for: why it is down."""
        async with self._room(backend):
            return await self._start_placed(backend, helpers, launched_by)

    @asynccontextmanager
    async def _room(self, backend: Backend) -> AsyncIterator[None]:
        """Make room for the model (a start or a wake) and hold its devices meanwhile; 503
        once no room came within ``placement_timeout``. The start lock is held only to plan
        and claim (a victim is taken out of service at once, so no other start picks it): the
        victim's sleep or stop happens without it, then the plan is made again."""
        deadline: float | None = None
        try:
            while True:
                async with AsyncExitStack() as devices:
                    for device in sorted(backend.devices, key=str):
                        await devices.enter_async_context(self._device_locks[device])
                    while (victim := await self._plan_room(backend)) is not None:
                        await self._settled(victim)
                    if backend.placed:
                        self._turn_ends(backend)
                        yield
                        return
                    assert self._changed is not None
                    changed = self._changed
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

    async def _plan_room(self, backend: Backend) -> Backend | None:
        """Under the start lock: place the model (``backend.placed``) if it fits, else claim
        the next server to make room (taken out of service now) and return it; None: placed,
        or nothing to take room from."""
        assert self._start_lock is not None
        async with self._start_lock:
            try:
                ledger = await self.ledger.read(backend.devices)
                decision = planners.place(backend.view(), self._views(), ledger,
                                          self.max_models)
            except planners.TooBig as big:
                raise unavailable(
                    f"The model '{backend.name}' needs {big.need_mb} MiB on GPU "
                    f"{big.device[1]}, which has {big.total_mb} MiB.", code="no_capacity",
                    should_retry=False) from None
            if isinstance(decision, Fits):
                backend.placed = True
                return None
            if not isinstance(decision, Evict):
                return None
            victim = self.servers[decision.victim]
            victim.evictions += 1
            if decision.sleep:
                log.info("putting idle model to sleep", model=victim.name,
                         for_model=backend.name, reason=decision.why)
                self._begin_sleep(victim)
            else:
                log.info("evicting idle model", model=victim.name, for_model=backend.name,
                         reason=decision.why)
                self.request_stop(victim, "evicted")
            return victim

    def _views(self) -> list[View]:
        return [b.view() for b in self.servers]

    async def _take_turn(self, backend: Backend) -> None:
        """The busy models in the way of a start or a wake yield their turn to it
        (``planners.yielders``); the others serve on."""
        ledger = await self.ledger.read(backend.devices)
        for key in planners.yielders(backend.view(), self._views(), ledger, self.max_models):
            other = self.servers[key]
            other.yields_to = backend
            log.info("model yields its turn", model=other.name, to_model=backend.name,
                     leases=other.leases)
            self._notify()

    def _turn_ends(self, backend: Backend) -> None:
        """The start or wake is placed or gave up: the models that yielded to it serve on."""
        for other in self.servers:
            if other.yields_to is backend:
                other.yields_to = None
                self._notify()

    async def _start_placed(self, backend: Backend, helpers: TaskGroup,
                            launched_by: str | None) -> str | None:
        before = await self._used(backend)
        log.info("model starting", model=backend.name, launcher=backend.settings.launcher,
                 launched_by=launched_by)
        timeout = backend.settings.startup_timeout
        began = anyio.current_time()
        try:
            with anyio.fail_after(timeout):
                await backend.launcher.start(helpers)
                down = await self._wait_healthy(backend)
                if down is None and backend.settings.sleep_level is not None:
                    await self._wake_if_asleep(backend)
        except TimeoutError:
            raise LaunchError(f"not healthy within {timeout:g} s") from None
        await self._measure(backend, before)
        if self.on_ready is not None and down is None:
            self.on_ready(backend.name, anyio.current_time() - began)
        return down

    async def _wake_if_asleep(self, backend: Backend) -> None:
        """A server found asleep once healthy (an adopted container that an earlier gateway put
        to sleep: /health says nothing about sleep) is woken before anything is forwarded."""
        assert self._health is not None and backend.address is not None
        level = backend.settings.sleep_level
        assert level is not None
        try:
            if not await sleep_mode.is_sleeping(self._health, backend.address):
                return
        except sleep_mode.NoSleepMode:
            return  # it cannot sleep: said when it would be put to sleep
        log.info("model found asleep: waking it", model=backend.name, level=level)
        await sleep_mode.wake(self._health, backend.address, level)

    async def _wait_healthy(self, backend: Backend) -> str | None:
        """Until the server passes a check; a static one that refuses connections (nothing
        listens there) is not waited for: that is returned."""
        while backend.launcher.is_alive():
            problem = await self._check(backend)
            if problem is None or (backend.static and problem == REFUSED):
                return problem
            await anyio.sleep(HEALTH_INTERVAL)
        raise LaunchError(f"{await backend.launcher.wait_exit()} during start-up")

    async def _used(self, backend: Backend) -> dict[Device, int | None]:
        """The used memory of the server's devices, read now."""
        figures = await self.ledger.read(backend.devices, fresh=True)
        return {device: memory.used_mb for device, memory in figures.items()}

    async def _grown(self, backend: Backend, before: dict[Device, int | None]) -> list[int]:
        """How much the used memory of each of the server's devices grew since ``before``
        (where both were read)."""
        after = await self._used(backend)
        return [now - was for device, now in after.items()
                if now is not None and (was := before.get(device)) is not None]

    async def _measure(self, backend: Backend, before: dict[Device, int | None]) -> None:
        deltas = await self._grown(backend, before)
        if deltas and max(deltas) > 0:
            backend.measured_vram_mb = max(deltas)
            log.info("model VRAM measured", model=backend.name, vram_mb=max(deltas),
                     configured_mb=backend.settings.vram_mb)

    def request_stop(self, backend: Backend, reason: str) -> None:
        """Begin stopping a starting or loaded model (synchronously: no lease can slip in)."""
        if backend.scope is None or backend.state in (ModelState.STOPPED, ModelState.FAILED):
            return
        backend.stop_reason = reason
        backend.scope.cancel()
        move(backend, Event.STOP, reason)

    async def _stop_and_wait(self, backend: Backend, reason: str) -> None:
        self.request_stop(backend, reason)
        await self._settled(backend)

    async def _settled(self, backend: Backend) -> None:
        """Until a sleep or a stop that was begun is over."""
        if backend.state is ModelState.ASLEEP and backend.sleeping is not None:
            await self._sleep(backend)
        while backend.state is ModelState.STOPPING:
            assert self._changed is not None
            await self._changed.wait()

    def _begin_sleep(self, backend: Backend) -> None:
        """Take an idle model out of service for its sleep (synchronously: no lease can slip
        in); ``_sleep`` then makes the call."""
        backend.sleeping = anyio.Event()
        backend.asleep_since = anyio.current_time()  # the newest asleep, for the sleep budget
        move(backend, Event.SLEEP)

    async def _sleep(self, backend: Backend) -> None:
        """Put the server to sleep; stop it instead if it has no sleep API or the sleep fails.
        The sleep budget is kept: beyond it the model asleep longest is stopped."""
        assert self._health is not None and backend.sleeping is not None
        settings = backend.settings
        assert settings.sleep_level is not None
        run = backend.scope  # the run put to sleep: a failure stops that one, never a later one
        others = sorted((b for b in self.servers
                         if b is not backend and b.state is ModelState.ASLEEP),
                        key=lambda b: b.asleep_since)
        for other in others[:max(0, len(others) - self.max_asleep + 1)]:
            self.request_stop(other, "the sleep budget (max_models_asleep) needs its place")
        problem = None
        try:
            address = backend.address
            if address is None:  # it died meanwhile: its lifecycle ends it
                problem = "it stopped"
            else:
                before = await self._used(backend)
                with anyio.fail_after(settings.startup_timeout):
                    await sleep_mode.is_sleeping(self._health, address)
                    await sleep_mode.sleep(self._health, address, settings.sleep_level)
                await self._measure_asleep(backend, before)
        except sleep_mode.NoSleepMode as exc:
            backend.sleep_capable = False
            problem = str(exc)
            if not backend.warned_no_sleep:
                backend.warned_no_sleep = True
                log.warning("model has no sleep mode: stopped instead", model=backend.name,
                            reason=problem, needs=sleep_mode.FLAGS)
        except Exception as exc:  # the server's or NVML's failure, never the pool's
            problem = f"its sleep failed: {str(exc) or type(exc).__name__}"
            log.error("model sleep failed: stopped instead", model=backend.name, reason=problem)
        finally:
            sleeping, backend.sleeping = backend.sleeping, None
            sleeping.set()
        if backend.scope is not run:  # it ended meanwhile (and may run anew): nothing to do
            return
        if problem is not None:
            await self._stop_and_wait(backend, f"could not sleep: {problem}")
            return
        backend.sleeps += 1
        log.info("model asleep", model=backend.name, level=settings.sleep_level,
                 asleep_vram_mb=backend.asleep_vram_mb)
        self._notify()

    async def _measure_asleep(self, backend: Backend, before: dict[Device, int | None]) -> None:
        """What the server still holds asleep: its VRAM less what the sleep freed (NVML)."""
        deltas = await self._grown(backend, before)
        if deltas:
            backend.asleep_vram_mb = max(0, backend.vram_mb + min(deltas))

    def _begin_wake(self, backend: Backend) -> None:
        assert self._tg is not None, "the pool is not running"
        backend.placed = False
        backend.start = start = _Start()
        self._tg.start_soon(self._wake, backend, start)
        move(backend, Event.WAKE)

    async def _wake(self, backend: Backend, start: _Start) -> None:
        """Make room, wake the server and wait until it says it is awake. A wake that fails
        stops the server; its requests then start it cold."""
        assert self._health is not None
        settings = backend.settings
        assert settings.sleep_level is not None
        error: GatewayError | None = unavailable(
            f"The model '{backend.name}' was stopped while waking.", code="model_stopped",
            retry_after=1)
        try:
            if backend.sleeping is not None:
                await backend.sleeping.wait()
                if backend.state is not ModelState.WAKING:  # the sleep failed: it stops
                    error = None  # and the requests start it cold
                    return
            async with self._room(backend):
                address = backend.address
                if backend.state is not ModelState.WAKING or address is None:
                    return
                log.info("model waking", model=backend.name, level=settings.sleep_level)
                began = anyio.current_time()
                with anyio.fail_after(settings.startup_timeout):
                    await sleep_mode.wake(self._health, address, settings.sleep_level)
            if backend.state is ModelState.WAKING:
                error = None
                backend.wakes += 1
                backend.asleep_vram_mb = None
                woke = anyio.current_time() - began
                log.info("model awake", model=backend.name, seconds=round(woke, 3))
                if self.on_wake is not None:
                    self.on_wake(backend.name, woke)
                backend.last_used = anyio.current_time()
                move(backend, Event.AWAKE)
        except GatewayError as exc:  # no room within placement_timeout: it sleeps on
            error = exc
            if backend.state is ModelState.WAKING:
                move(backend, Event.NO_ROOM, exc.message)
        except Exception as exc:  # the server's failure, never the pool's
            if backend.state is ModelState.WAKING:
                error = None
                log.error("model wake failed: starting it cold", model=backend.name,
                          reason=str(exc) or type(exc).__name__)
                await self._stop_and_wait(backend, "its wake failed")
        finally:
            start.error = error
            start.done.set()
            self._notify()

    async def sleep(self, name: str) -> None:
        """Put an idle model (each replica that runs) to sleep now (as eviction would); at once
        if it sleeps."""
        running = [r for r in self.replicas[name]
                   if r.state not in (ModelState.STOPPED, ModelState.FAILED)]
        for backend in running or [self.backends[name]]:
            await self._sleep_now(backend)

    async def _sleep_now(self, backend: Backend) -> None:
        name = backend.name
        if backend.settings.sleep_level is None:
            raise GatewayError(409, f"The model '{name}' cannot sleep: it has no sleep_level.",
                               type="invalid_request_error", code="model_cannot_sleep",
                               should_retry=False)
        if backend.state is ModelState.ASLEEP:
            if backend.sleeping is not None:
                await backend.sleeping.wait()
            return
        if not backend.is_idle():
            raise GatewayError(409, f"The model '{name}' is {backend.state.value}"
                               + (" and in use" if backend.state is ModelState.READY else "")
                               + ": only a ready model with no request sleeps.",
                               type="invalid_request_error", code="model_not_idle",
                               should_retry=False)
        self._begin_sleep(backend)
        await self._sleep(backend)

    async def load(self, name: str) -> None:
        """Start a model now (as a request would), and wait until it is ready."""
        async with self.lease(name):
            pass

    async def unload(self, name: str) -> None:
        """Drain a model, every replica at once (no new leases, in-flight ones finish), then
        stop it."""
        replicas = self.replicas[name]
        # Another unload drains it: wait for that one.
        while any(r.state is ModelState.DRAINING for r in replicas):
            assert self._changed is not None
            await self._changed.wait()
        draining = [r for r in replicas if r.state is ModelState.READY]
        if draining:
            for backend in draining:
                move(backend, Event.DRAIN, "unloading")
            try:
                while any(r.leases for r in draining):
                    assert self._changed is not None
                    await self._changed.wait()
            except BaseException:
                # Whoever asked is gone: the model serves again rather than stay half-drained,
                # with its new requests waiting for a stop that nobody will make.
                for backend in draining:
                    if backend.state is ModelState.DRAINING:
                        move(backend, Event.UNDRAIN, "the unload was given up")
                raise
        for backend in replicas:
            await self._stop_and_wait(backend, "unloaded")

    async def _reap(self) -> None:
        while True:
            await anyio.sleep(self.reap_interval)
            decisions = self._bring_up(anyio.current_time())
            for reap in decisions.reap:
                backend = self.servers[reap.key]
                if reap.scale_down:
                    backend.replicas[0].scale_downs += 1
                    log.info("scaling down", model=backend.name, replica=backend.replica,
                             sleeps=reap.sleep)
                if reap.sleep:
                    self._begin_sleep(backend)
                    assert self._tg is not None
                    self._tg.start_soon(self._sleep, backend)
                else:
                    self.request_stop(backend, "idle")
            for expire in decisions.expire:
                self.request_stop(self.servers[expire.key], "asleep for its asleep_timeout")

    def _bring_up(self, now: float) -> planners.Tick:
        """The clock's decisions (``planners.tick``); the replicas to bring up are brought up
        here, the rest is the reaper's."""
        views = self._views()
        decisions = planners.tick(
            views, [[views[r.key] for r in first.replicas] for first in self.scaled],
            {first.name: self._queued(first.name) for first in self.scaled}, now)
        for up in decisions.up:
            spare = self.servers[up.key]
            spare.replicas[0].scale_ups += 1
            log.info("scaling up", model=spare.name, replica=spare.replica, reason=up.why,
                     ready=up.ready)
            if up.wake:
                self._begin_wake(spare)
            else:
                self._launch(spare)
        return decisions


def route(replicas: list[Backend], session: str | None, avoid: int | None) -> Backend | None:
    """The ready replica a request goes to, or None if none is ready. The session's replica
    (rendezvous hashing: the highest hash of session and replica) unless it has no free slot or
    more than ``affinity_slack`` times the average load; else the least loaded (the first of
    equals, so that a light load keeps to few replicas and the others go idle)."""
    least = affine = None
    top = 0
    total = ready = 0
    # Hashes of ints are the same in every process (a str's is salted per process): a session
    # keeps its replica across a restart of the gateway, which adopts its containers.
    key = zlib.crc32(session.encode()) if session is not None else 0
    for r in replicas:
        if r.state is not ModelState.READY or r.yields_to is not None or r.replica == avoid:
            continue
        ready += 1
        total += r.leases
        if least is None or r.leases < least.leases:
            least = r
        if session is not None:
            score = hash((key, r.replica))
            if affine is None or score > top:
                affine, top = r, score
    if least is None:
        # The replica whose connect failed is the only one ready: it is tried again.
        return route(replicas, session, None) if avoid is not None else None
    if affine is not None and affine.leases < affine.slots and affine.leases + 1 <= math.ceil(
            affine.settings.affinity_slack * (total + 1) / ready):
        return affine
    return least


def _bring_up_order(backend: Backend) -> tuple[int, int]:
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
