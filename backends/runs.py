"""Each run of a server is one owner task: start, health, serving, sleep, wake and stop.

Owns the invariant that one task owns a run, from its start to its stop. ``launch`` spawns it
in the pool's task group with a cancel scope and a command stream; the sleeps and wakes the
controller decides are commands on that stream, carried out by the run's own task one after
the other (a wake waits for a sleep in flight by its place in the queue), beside the watch of
its health and its death: no sibling task races on a server. A stop cancels the run's scope,
which cancels its task group as a unit, and whatever ends a run (idle, eviction, death, a
failed health check, shutdown) goes through the same ``finally`` that stops the launcher.
Whatever a launcher, an engine or NVML raises in the task is the model's failure, never the
pool's: the model goes ``failed`` with the reason, the other models serve on.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from contextlib import nullcontext

import anyio
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from kernel.errors import GatewayError, unavailable

from . import sleep as sleep_mode
from .health import Health, output_tail
from .launcher import LaunchError
from .ledger import GpuLedger
from .placer import Placer, settled
from .server import (
    FAILED,
    SLEEP,
    START_FAILED,
    UNAVAILABLE,
    WAKE,
    Backend,
    Changes,
    Command,
    Start,
)
from .states import Event, ModelState, move

log = structlog.get_logger("gateway.pool")

Timed = Callable[[str, float], None]


class Runs:
    def __init__(self, servers: Sequence[Backend], ledger: GpuLedger, changes: Changes, *,
                 notify: Callable[[], None], on_ready: Timed | None, on_wake: Timed | None,
                 max_asleep: int, max_models: int, placement_timeout: float) -> None:
        self.servers = servers
        self.changes = changes
        self.notify = notify
        self.on_ready = on_ready
        self.on_wake = on_wake
        self.max_asleep = max_asleep
        self.health = Health()
        self.placer = Placer(servers, ledger, changes, max_models=max_models,
                             placement_timeout=placement_timeout, evict=self._evict,
                             notify=notify)
        self.tg: TaskGroup | None = None
        # Asked before a sleep or a wake of a server ([cluster]: raises unless this process
        # owns the pool, by its token in Redis); None: one process, always allowed.
        self.fence: Callable[[], Awaitable[None]] | None = None
        # Whether this process places, reaps and scales its servers now ([cluster]: while it
        # owns the pool; the others' runs are views of the owner's servers, placed there).
        self.may_act: Callable[[], bool] = lambda: True

    def launch(self, backend: Backend) -> None:
        """Begin a run: its task makes room, starts the server and serves until it ends."""
        assert self.tg is not None, "the pool is not running"
        backend.placed = False
        backend.stop_reason = None
        backend.sleep_capable = True
        backend.start = Start()
        # Made here, not in the task, so that a stop or a command sent before it runs is kept.
        backend.scope = anyio.CancelScope()
        backend.commands, commands = anyio.create_memory_object_stream[Command](math.inf)
        self.tg.start_soon(self._lifecycle, backend, backend.start, backend.scope, commands)
        move(backend, Event.LAUNCH)

    def request_stop(self, backend: Backend, reason: str) -> None:
        """Begin stopping a starting or loaded model (synchronously: no lease can slip in)."""
        if backend.scope is None or backend.state in (ModelState.STOPPED, ModelState.FAILED):
            return
        backend.stop_reason = reason
        backend.scope.cancel()
        move(backend, Event.STOP, reason)

    async def stop_and_wait(self, backend: Backend, reason: str) -> None:
        self.request_stop(backend, reason)
        await settled(backend, self.changes)

    def begin_sleep(self, backend: Backend) -> None:
        """Take an idle model out of service for its sleep (synchronously: no lease can slip
        in); its run then makes the call."""
        backend.sleeping = anyio.Event()
        backend.asleep_since = anyio.current_time()  # the newest asleep, for the sleep budget
        move(backend, Event.SLEEP)
        backend.of.forget(backend)  # either level drops the KV cache
        _send(backend, (SLEEP, None))

    def begin_wake(self, backend: Backend) -> None:
        """Wake an asleep model: its run makes room and the call; requests wait for ``start``."""
        backend.placed = False
        backend.start = start = Start()
        move(backend, Event.WAKE)
        _send(backend, (WAKE, start))

    def _evict(self, victim: Backend, sleep: bool) -> None:
        if sleep:
            self.begin_sleep(victim)
        else:
            self.request_stop(victim, "evicted")

    async def _lifecycle(self, backend: Backend, start: Start, scope: anyio.CancelScope,
                         commands: MemoryObjectReceiveStream[Command]) -> None:
        # This task outlives the request that launched it: its lines are the model's, not that
        # request's (the launching request logs its own id with "model starting").
        launched_by = structlog.contextvars.get_contextvars().get("request_id")
        structlog.contextvars.clear_contextvars()
        if len(backend.replicas) > 1:
            structlog.contextvars.bind_contextvars(replica=backend.replica)
        outcome: GatewayError | None = None
        try:
            with scope, commands:
                async with anyio.create_task_group() as helpers:
                    outcome = await self._run(backend, start, helpers, launched_by, commands)
                    # The helpers (an output reader) end with the server, which is stopped below.
                    helpers.cancel_scope.cancel()
        except Exception as exc:  # a launcher's helper, or the watch, raised: the model's failure
            log.exception("model failed", model=backend.name)
            outcome = self._failure(backend, UNAVAILABLE, exc)
        finally:
            # No lease and no command from here on: the launcher forgets the address as it stops.
            if backend.commands is not None:
                backend.commands.close()
                backend.commands = None
            move(backend, Event.RUN_ENDS, backend.stop_reason or "")
            backend.of.forget(backend)
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

    async def _run(self, backend: Backend, start: Start, helpers: TaskGroup,
                   launched_by: str | None,
                   commands: MemoryObjectReceiveStream[Command]) -> GatewayError | None:
        """Start the model and serve until it dies or fails its health checks; return why the
        start failed, if it did."""
        try:
            async with self.placer.room(backend) if self.may_act() else nullcontext():
                problem = await self._start(backend, helpers, launched_by)
        except GatewayError as exc:
            return exc
        except Exception as exc:
            if not isinstance(exc, LaunchError):
                log.exception("model start raised", model=backend.name)
            error = self._failure(backend, START_FAILED, exc)
            log.error("model failed to start", model=backend.name, reason=backend.failure,
                      output=await output_tail(backend))
            return error
        if problem is not None:
            self._down(backend, problem)
        else:
            self._become_ready(backend, start)
        backend.failure = await self._serve(backend, commands)
        return None

    async def _serve(self, backend: Backend, commands: MemoryObjectReceiveStream[Command]) -> str:
        """Carry out the run's commands until the server dies or fails its health checks; why
        it is out of service."""
        reason = ""
        async with anyio.create_task_group() as watch:
            async def out_of_service(event: str, why: str) -> None:
                nonlocal reason
                if not reason:  # the first one to see it says why
                    reason = why
                    log.error(event, model=backend.name, reason=why,
                              output=await output_tail(backend))
                    watch.cancel_scope.cancel()

            async def died() -> None:
                await out_of_service("model died", f"died: {await backend.launcher.wait_exit()}")

            async def unhealthy() -> None:
                problem = await self.health.watch(
                    backend, lambda problem: self._down(backend, problem),
                    lambda: self._up_again(backend))
                await out_of_service("model unhealthy", f"unhealthy: {problem}")

            async def obey() -> None:
                async for command, start in commands:
                    if command == SLEEP:
                        await self._sleep(backend)
                    else:
                        assert start is not None
                        await self._wake(backend, start)

            watch.start_soon(died)
            watch.start_soon(unhealthy)
            watch.start_soon(obey)
        return reason

    def _down(self, backend: Backend, problem: str) -> None:
        """A static server found down: its requests are refused at once until it is up."""
        backend.failure = f"down: {problem}"
        backend.failure_code = UNAVAILABLE
        backend.retry_at = 0.0
        start = backend.start
        if start is not None and not start.done.is_set():
            start.error = refusal(backend)
            start.done.set()
        log.warning("model down", model=backend.name, reason=problem)
        move(backend, Event.DOWN, problem)

    def _up_again(self, backend: Backend) -> None:
        log.info("model up again", model=backend.name)
        assert backend.start is not None
        self._become_ready(backend, backend.start, Event.UP)

    def _become_ready(self, backend: Backend, start: Start,
                      event: Event = Event.HEALTHY) -> None:
        backend.failure = None
        backend.last_used = anyio.current_time()
        backend.starts += 1
        start.done.set()
        log.info("model ready", model=backend.name, address=backend.address,
                 vram_mb=backend.vram_mb)
        move(backend, event)

    def _after_stop(self, backend: Backend, start: Start, outcome: GatewayError | None) -> None:
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
        wake = backend.start
        if wake is not None and not wake.done.is_set():
            wake.done.set()  # a wake the run had no time for: its requests start it cold
        if backend.sleeping is not None:  # a sleep the run had no time for is over
            backend.sleeping, sleeping = None, backend.sleeping
            sleeping.set()
        if backend.stop_reason:
            log.info("model stopped", model=backend.name, reason=backend.stop_reason)
        move(backend, Event.RUN_FAILED if failed else Event.STOPPED,
             backend.failure or "" if failed else backend.stop_reason or "")

    async def _start(self, backend: Backend, helpers: TaskGroup,
                     launched_by: str | None) -> str | None:
        """Start the server (room made) and wait for its health; a static server that nothing
        listens at is not waited for: why it is down."""
        before = await self.placer.used(backend)
        log.info("model starting", model=backend.name, launcher=backend.settings.launcher,
                 launched_by=launched_by)
        timeout = backend.settings.startup_timeout
        began = anyio.current_time()
        try:
            with anyio.fail_after(timeout):
                await backend.launcher.start(helpers)
                down = await self.health.until_healthy(backend)
                if down is None and backend.settings.sleep_level is not None:
                    await self._wake_if_asleep(backend)
        except TimeoutError:
            raise LaunchError(f"not healthy within {timeout:g} s") from None
        deltas = await self.placer.grown(backend, before)
        if deltas and max(deltas) > 0:
            backend.measured_vram_mb = max(deltas)
            log.info("model VRAM measured", model=backend.name, vram_mb=max(deltas),
                     configured_mb=backend.settings.vram_mb)
        if self.on_ready is not None and down is None:
            self.on_ready(backend.name, anyio.current_time() - began)
        return down

    async def _wake_if_asleep(self, backend: Backend) -> None:
        """A server found asleep once healthy (an adopted container that an earlier gateway put
        to sleep: /health says nothing about sleep) is woken before anything is forwarded."""
        client = self.health.client
        assert client is not None and backend.address is not None
        level = backend.settings.sleep_level
        assert level is not None
        if backend.mirrored:  # another process's server: its owner wakes it
            return
        try:
            if not await sleep_mode.is_sleeping(client, backend.address):
                return
        except sleep_mode.NoSleepMode:
            return  # it cannot sleep: said when it would be put to sleep
        log.info("model found asleep: waking it", model=backend.name, level=level)
        await sleep_mode.wake(client, backend.address, level)

    async def _sleep(self, backend: Backend) -> None:
        """Put the server to sleep; stop it instead if it has no sleep API or the sleep fails.
        The sleep budget is kept: beyond it the model asleep longest is stopped."""
        client = self.health.client
        assert client is not None and backend.sleeping is not None
        settings = backend.settings
        assert settings.sleep_level is not None
        others = sorted((b for b in self.servers
                         if b is not backend and b.state is ModelState.ASLEEP),
                        key=lambda b: b.asleep_since)
        for other in others[:max(0, len(others) - self.max_asleep + 1)]:
            self.request_stop(other, "the sleep budget (max_models_asleep) needs its place")
        problem = None
        try:
            address = backend.address
            if address is None:  # it died meanwhile: its run ends
                problem = "it stopped"
            else:
                if self.fence is not None:
                    await self.fence()
                before = await self.placer.used(backend)
                with anyio.fail_after(settings.startup_timeout):
                    await sleep_mode.is_sleeping(client, address)
                    await sleep_mode.sleep(client, address, settings.sleep_level)
                deltas = await self.placer.grown(backend, before)
                if deltas:  # what it still holds asleep: its VRAM less what the sleep freed
                    backend.asleep_vram_mb = max(0, backend.vram_mb + min(deltas))
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
        if problem is not None:
            wake = backend.start
            if backend.state is ModelState.WAKING and wake is not None:
                wake.done.set()  # a wake that waited for this sleep: its requests start it cold
            self.request_stop(backend, f"could not sleep: {problem}")
            return
        backend.sleeps += 1
        log.info("model asleep", model=backend.name, level=settings.sleep_level,
                 asleep_vram_mb=backend.asleep_vram_mb)
        self.notify()

    async def _wake(self, backend: Backend, start: Start) -> None:
        """Make room, wake the server and wait until it says it is awake. A wake that fails
        stops the server; its requests then start it cold."""
        client = self.health.client
        assert client is not None
        settings = backend.settings
        assert settings.sleep_level is not None
        error: GatewayError | None = unavailable(
            f"The model '{backend.name}' was stopped while waking.", code="model_stopped",
            retry_after=1)
        try:
            async with self.placer.room(backend):
                address = backend.address
                if backend.state is not ModelState.WAKING or address is None:
                    return
                log.info("model waking", model=backend.name, level=settings.sleep_level)
                if self.fence is not None:
                    await self.fence()
                began = anyio.current_time()
                with anyio.fail_after(settings.startup_timeout):
                    await sleep_mode.wake(client, address, settings.sleep_level)
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
                self.request_stop(backend, "its wake failed")
        finally:
            start.error = error
            start.done.set()
            self.notify()


def _send(backend: Backend, command: Command) -> None:
    """Tell the run; a run that ends meanwhile answers what it was told as it ends."""
    if backend.commands is not None:
        backend.commands.send_nowait(command)


def refusal(backend: Backend) -> GatewayError:
    """The 503 a request for a failed model gets, with its backoff."""
    what = "failed to start" if backend.failure_code == START_FAILED else "is unavailable"
    wait = backend.retry_at - anyio.current_time()
    return unavailable(f"The model '{backend.name}' {what}: {backend.failure}",
                       code=backend.failure_code,
                       retry_after=wait if wait > 0 else backend.settings.health_interval)
