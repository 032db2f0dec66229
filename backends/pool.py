"""The backend pool: each model's lifecycle, placement on the GPUs, and leases.

States: ``stopped -> starting -> ready -> draining -> stopping -> stopped``, and ``failed``
(with a backoff) when a start fails. Each run of a model is one task in the pool's task group,
from the start to the stop, so whatever ends it (idle, eviction, death, shutdown) goes through
the same ``finally`` that stops the launcher.

- ``lease(name)`` starts a stopped model (concurrent callers share one start), waits for it to
  be healthy and counts the lease until the block exits; nothing stops a model with leases, nor
  one that requests wait for (a model that just became ready is theirs before it is idle).
- Starts are serialised: vLLM sizes its cache from the free memory it sees, and the memory a
  start took is measured as the devices' used memory before and after it.
- Placement: before a start, if ``max_models_concurrent`` models are loaded or a device lacks
  the model's VRAM, the least recently used idle models are stopped (those on a short device
  first); if none is idle, the start waits for one (bounded by ``placement_timeout``), then
  every waiting request gets 503. A start that waits for room lets other starts go first.
- The reaper stops a ready model with no leases after its ``idle_timeout``. It checks and
  changes the state in one synchronous step, so it cannot race a lease.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import httpx2
import structlog
from anyio.abc import TaskGroup

from proxy.config import Config, ModelSettings
from proxy.errors import GatewayError, unavailable

from .gpu import ConfiguredMemory, GpuMemory
from .launcher import Launcher, LaunchError

log = structlog.get_logger("gateway.pool")

HEALTH_INTERVAL = 0.05
HEALTH_TIMEOUT = 2.0
MEMORY_POLL = 0.25
REAP_INTERVAL_MAX = 1.0


class ModelState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    FAILED = "failed"


LOADED = (ModelState.READY, ModelState.DRAINING, ModelState.STOPPING)


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
    retry_at: float = 0.0
    measured_vram_mb: int | None = None
    starts: int = 0
    evictions: int = 0
    start: _Start | None = None
    scope: anyio.CancelScope | None = None
    stop_reason: str | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def address(self) -> str | None:
        return self.launcher.address

    @property
    def vram_mb(self) -> int:
        return self.measured_vram_mb or self.settings.vram_mb

    def is_idle(self) -> bool:
        """Ready, and neither leased nor waited for by a request that is about to lease it."""
        return self.state is ModelState.READY and self.leases == 0 and self.waiting == 0

    def occupies_slot(self) -> bool:
        return self.state in LOADED or (self.state is ModelState.STARTING and self.placed)


LauncherFactory = Callable[[ModelSettings], Launcher]


class BackendPool:
    def __init__(self, config: Config, *, launchers: LauncherFactory,
                 gpu: GpuMemory | None = None,
                 on_ready: Callable[[str, float], None] | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        self.config = config
        self.on_ready = on_ready
        # Told after every change of a model's state (the admin API's event stream).
        self.on_change = on_change
        self.gpu = gpu or ConfiguredMemory(config.gateway.gpu_memory_mb)
        self.backends = {m.name: Backend(m, launchers(m)) for m in config.models}
        self.max_models = config.gateway.max_models_concurrent
        self.placement_timeout = config.gateway.placement_timeout
        self.reap_interval = min(REAP_INTERVAL_MAX,
                                 *(m.idle_timeout / 10 for m in config.models))
        self._changed: anyio.Event | None = None
        self._start_lock: anyio.Lock | None = None
        self._tg: TaskGroup | None = None
        self._health: httpx2.AsyncClient | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[BackendPool]:
        """Run the pool: the reaper and every model's lifecycle live inside this block."""
        self._changed = anyio.Event()
        self._start_lock = anyio.Lock()
        async with httpx2.AsyncClient(timeout=HEALTH_TIMEOUT, trust_env=False) as health:
            self._health = health
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._reap)
                for backend in self.backends.values():
                    if backend.launcher.has_running():
                        self._launch(backend)
                try:
                    yield self
                finally:
                    for backend in self.backends.values():
                        self.request_stop(backend, "gateway stopping")
                    tg.cancel_scope.cancel()
            self._tg = None

    def _notify(self) -> None:
        assert self._changed is not None
        self._changed, changed = anyio.Event(), self._changed
        changed.set()
        if self.on_change is not None:
            self.on_change()

    @asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Backend]:
        """A ready backend of the model, kept from stopping until the block exits."""
        backend = self.backends[name]
        backend.waiting += 1
        try:
            await self._until_ready(backend)
        finally:
            backend.waiting -= 1
        backend.leases += 1
        backend.last_used = anyio.current_time()
        try:
            yield backend
        finally:
            backend.leases -= 1
            backend.last_used = anyio.current_time()
            if backend.leases == 0:
                self._notify()

    async def _until_ready(self, backend: Backend) -> None:
        while backend.state is not ModelState.READY:
            if backend.state is ModelState.FAILED and anyio.current_time() < backend.retry_at:
                raise unavailable(
                    f"The model '{backend.name}' failed to start: {backend.failure}",
                    code="model_start_failed",
                    retry_after=backend.retry_at - anyio.current_time())
            if backend.state in (ModelState.STOPPED, ModelState.FAILED):
                self._launch(backend)
            start = backend.start
            if backend.state is ModelState.STARTING and start is not None:
                await start.done.wait()
                if start.error is not None:
                    raise start.error.fresh()
            else:
                assert self._changed is not None
                await self._changed.wait()

    def _launch(self, backend: Backend) -> None:
        assert self._tg is not None, "the pool is not running"
        backend.state = ModelState.STARTING
        backend.placed = False
        backend.stop_reason = None
        backend.start = _Start()
        # Made here, not in the task, so that a stop requested before the task runs is kept.
        backend.scope = anyio.CancelScope()
        self._tg.start_soon(self._lifecycle, backend, backend.start, backend.scope)
        self._notify()

    async def _lifecycle(self, backend: Backend, start: _Start, scope: anyio.CancelScope) -> None:
        # This task outlives the request that launched it: its lines are the model's, not that
        # request's (the launching request logs its own id with "model starting").
        launched_by = structlog.contextvars.get_contextvars().get("request_id")
        structlog.contextvars.clear_contextvars()
        outcome: GatewayError | None = None
        try:
            with scope:
                async with anyio.create_task_group() as helpers:
                    outcome = await self._run(backend, start, helpers, launched_by)
                    # The helpers (an output reader) end with the server, which is stopped below.
                    helpers.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await backend.launcher.stop()
                self._after_stop(backend, start, outcome)

    async def _run(self, backend: Backend, start: _Start, helpers: TaskGroup,
                   launched_by: str | None) -> GatewayError | None:
        """Start the model and serve until it dies; return why the start failed, if it did."""
        try:
            await self._start(backend, helpers, launched_by)
        except LaunchError as exc:
            backend.failure = str(exc)
            log.error("model failed to start", model=backend.name, reason=str(exc),
                      output=await backend.launcher.output_tail())
            return unavailable(f"The model '{backend.name}' failed to start: {exc}",
                               code="model_start_failed",
                               retry_after=backend.settings.failure_backoff)
        except GatewayError as exc:
            return exc
        self._become_ready(backend, start)
        reason = await backend.launcher.wait_exit()
        backend.failure = f"died: {reason}"
        log.error("model died", model=backend.name, reason=reason,
                  output=await backend.launcher.output_tail())
        return None

    def _become_ready(self, backend: Backend, start: _Start) -> None:
        backend.state = ModelState.READY
        backend.failure = None
        backend.last_used = anyio.current_time()
        backend.starts += 1
        start.done.set()
        log.info("model ready", model=backend.name, address=backend.address,
                 vram_mb=backend.vram_mb)
        self._notify()

    def _after_stop(self, backend: Backend, start: _Start, outcome: GatewayError | None) -> None:
        backend.scope = None
        backend.placed = False
        if outcome is not None and outcome.code == "model_start_failed":
            backend.state = ModelState.FAILED
            backend.retry_at = anyio.current_time() + backend.settings.failure_backoff
        else:
            backend.state = ModelState.STOPPED
        if not start.done.is_set():
            start.error = outcome or unavailable(
                f"The model '{backend.name}' was stopped while starting.",
                code="model_stopped", retry_after=1)
            start.done.set()
        if backend.stop_reason:
            log.info("model stopped", model=backend.name, reason=backend.stop_reason)
        self._notify()

    async def _start(self, backend: Backend, helpers: TaskGroup,
                     launched_by: str | None) -> None:
        assert self._start_lock is not None
        deadline: float | None = None
        while True:
            async with self._start_lock:
                assert self._changed is not None
                changed = self._changed
                if await self._make_room(backend):
                    await self._start_placed(backend, helpers, launched_by)
                    return
            # No room yet: wait without the lock, so that models that fit can start meanwhile.
            now = anyio.current_time()
            if deadline is None:
                deadline = now + self.placement_timeout
            if now >= deadline:
                raise unavailable(
                    f"No capacity for model '{backend.name}': every loaded model is busy.",
                    code="no_capacity", retry_after=self.placement_timeout)
            with anyio.move_on_after(min(MEMORY_POLL, deadline - now)):
                await changed.wait()

    async def _start_placed(self, backend: Backend, helpers: TaskGroup,
                            launched_by: str | None) -> None:
        before = self._used(backend)
        log.info("model starting", model=backend.name, launcher=backend.settings.launcher,
                 launched_by=launched_by)
        timeout = backend.settings.startup_timeout
        began = anyio.current_time()
        try:
            with anyio.fail_after(timeout):
                address = await backend.launcher.start(helpers)
                await self._wait_healthy(backend, address)
        except TimeoutError:
            raise LaunchError(f"not healthy within {timeout:g} s") from None
        self._measure(backend, before)
        if self.on_ready is not None:
            self.on_ready(backend.name, anyio.current_time() - began)

    async def _wait_healthy(self, backend: Backend, address: str) -> None:
        assert self._health is not None
        url = address + backend.settings.health_path
        while backend.launcher.is_alive():
            try:
                response = await self._health.get(url)
                if response.status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            await anyio.sleep(HEALTH_INTERVAL)
        raise LaunchError(f"{await backend.launcher.wait_exit()} during start-up")

    def _used(self, backend: Backend) -> dict[int, int | None]:
        return {g: self.gpu.used_mb(g) for g in backend.settings.gpus}

    def _measure(self, backend: Backend, before: dict[int, int | None]) -> None:
        if not self.gpu.measures or not before:
            return
        deltas = [after - before[g] for g, after in self._used(backend).items()
                  if after is not None and before[g] is not None]
        if deltas and max(deltas) > 0:
            backend.measured_vram_mb = max(deltas)
            log.info("model VRAM measured", model=backend.name, vram_mb=max(deltas),
                     configured_mb=backend.settings.vram_mb)

    def _short_devices(self, backend: Backend) -> set[int]:
        """The devices of the model that lack the memory it needs."""
        need = backend.vram_mb
        short = set()
        for g in backend.settings.gpus if need else ():
            total = self.gpu.total_mb(g)
            if total is None:
                continue
            if need > total:
                raise unavailable(
                    f"The model '{backend.name}' needs {need} MiB on GPU {g}, which has "
                    f"{total} MiB.", code="no_capacity", should_retry=False)
            used = self.gpu.used_mb(g)
            if used is None:
                used = sum(b.vram_mb for b in self.backends.values()
                           if b is not backend and b.occupies_slot() and g in b.settings.gpus)
            if total - used < need:
                short.add(g)
        return short

    async def _make_room(self, backend: Backend) -> bool:
        """Stop idle models until the model fits; False if it does not and none is idle."""
        while True:
            over_budget = sum(b.occupies_slot() for b in self.backends.values()) >= self.max_models
            short = self._short_devices(backend)
            if not over_budget and not short:
                backend.placed = True
                return True
            # The least recently used first, but one on a short device frees a slot as well.
            idle = sorted((b for b in self.backends.values()
                           if b.is_idle() and (over_budget or short & set(b.settings.gpus))),
                          key=lambda b: (not short & set(b.settings.gpus), b.last_used))
            if not idle:
                return False
            victim = idle[0]
            victim.evictions += 1
            log.info("evicting idle model", model=victim.name, for_model=backend.name,
                     reason="model budget" if over_budget else "GPU memory")
            await self._stop_and_wait(victim, "evicted")

    def request_stop(self, backend: Backend, reason: str) -> None:
        """Begin stopping a starting or loaded model (synchronously: no lease can slip in)."""
        if backend.scope is None or backend.state in (ModelState.STOPPED, ModelState.FAILED):
            return
        backend.state = ModelState.STOPPING
        backend.stop_reason = reason
        backend.scope.cancel()
        self._notify()

    async def _stop_and_wait(self, backend: Backend, reason: str) -> None:
        self.request_stop(backend, reason)
        while backend.state is ModelState.STOPPING:
            assert self._changed is not None
            await self._changed.wait()

    async def load(self, name: str) -> None:
        """Start a model now (as a request would), and wait until it is ready."""
        async with self.lease(name):
            pass

    async def unload(self, name: str) -> None:
        """Drain a model (no new leases, in-flight ones finish), then stop it."""
        backend = self.backends[name]
        if backend.state is ModelState.READY:
            backend.state = ModelState.DRAINING
            self._notify()
            try:
                while backend.leases:
                    assert self._changed is not None
                    await self._changed.wait()
            except BaseException:
                # Whoever asked is gone: the model serves again rather than stay half-drained,
                # with its new requests waiting for a stop that nobody will make.
                if backend.state is ModelState.DRAINING:
                    backend.state = ModelState.READY
                    self._notify()
                raise
        await self._stop_and_wait(backend, "unloaded")

    async def _reap(self) -> None:
        while True:
            await anyio.sleep(self.reap_interval)
            now = anyio.current_time()
            for backend in self.backends.values():
                if should_reap(backend, now):
                    self.request_stop(backend, "idle")


def should_reap(backend: Backend, now: float) -> bool:
    """The reaper's decision: stop a backend idle (no lease, no request waiting for it) for its
    ``idle_timeout``."""
    return backend.is_idle() and now - backend.last_used >= backend.settings.idle_timeout
