"""The backend pool, the controller's facade: models on demand, leases, and the reaper.

Owns the invariant that a request gets a ready server or a reason: ``lease(name)`` starts a
stopped model (concurrent callers share one start), wakes an asleep one, waits for it and
counts the lease until the block exits; nothing stops a server with leases, nor one that
requests wait for (a model that just became ready is theirs before it is idle). A failed model
is refused within its backoff; a static server that is down is refused at once.

The parts, each owning one invariant:
- ``states``: every way a server's state can change (the table) and the one mover.
- ``model`` / ``server``: a model's totals, demand and replica set; one server's observed
  state, and the request path's reads of it (``route``, ``bring_up_order``).
- ``planners``: placement and the clock, pure functions of a snapshot.
- ``placer``: placement applied (the start lock held only to plan and claim) and the
  measurements; ``ledger``: each (engine, device)'s memory, read where it is.
- ``runs``: one owner task per server run (start, health, serve, sleep, wake, stop), driven by
  commands; ``health``: the checks.
- ``adapters``: the LoRA adapters each server holds, loaded where a request needs one
  (``adapters.using``, held by the passthrough around its forwarding).

The facade builds them, runs them (``running``), and applies the clock's decisions: the reaper
ticks every ``reap_interval`` and brings replicas up (``min_replicas``; ``scale_up_after`` with
every ready replica saturated, as the ``accounting`` sees the queue), puts idle servers to sleep or
stops them after ``idle_timeout`` (a model's last replicas first, ``min_replicas`` kept), and
stops those asleep past ``asleep_timeout``. It checks and changes the state in one
synchronous step, so it cannot race a lease. Requests the gateway holds for a model outside
the pool (the ``accounting``'s demand) keep it from being idle, so a model serves its run of
requests before it is swapped out; the accounting is told how many replicas of a model are
ready (its slots follow).

A live reload (``reconfigure``) changes the models in one synchronous step: an added model
gets its servers; a changed model's limits and timers are its servers' from the next lease and
tick; a removed model, or one whose server must change, is retired: it leaves ``models``
(``retiring`` keeps a removed one for the requests already on their way to it), serves what it
has, drains, stops and leaves ``servers``; it is never started again (a restarted model's next
request starts its successor). The servers list is one list, changed in place, that the runs
and the placer share; the keys the planners name servers by are renumbered in the same step.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import anyio
import httpx2
import structlog

from kernel.accounting import Demand, removed
from kernel.config import Config, ModelSettings, ReloadPlan, placement
from kernel.errors import GatewayError, not_found

from . import planners
from .adapters import AdapterLoader, prefer_holding
from .gpu import ConfiguredMemory, GpuMemory
from .health import HEALTH_TIMEOUT
from .launcher import Launcher, Supervisor
from .ledger import GpuLedger
from .model import Model
from .placer import settled
from .routing import Ask, route
from .runs import Runs, refusal
from .server import COMING, Backend, Changes, bring_up_order, should_reap
from .states import Event, ModelState, move

__all__ = ["Ask", "Backend", "BackendPool", "LauncherFactory", "ModelState", "route",
           "should_reap"]

log = structlog.get_logger("gateway.pool")

REAP_INTERVAL_MAX = 1.0

LauncherFactory = Callable[[ModelSettings], Launcher]


def _nothing() -> int:
    return 0


def _replica_settings(settings: ModelSettings, replica: int) -> ModelSettings:
    """A replica's settings: its model's, with its placement (the alternatives in turn)."""
    if replica == 0:
        return settings
    engine, gpus = placement(settings, replica)
    return replace(settings, engine=engine, gpus=gpus, replica=replica)


class BackendPool:
    def __init__(self, config: Config, *, launchers: LauncherFactory,
                 gpu: GpuMemory | None = None,
                 on_ready: Callable[[str, float], None] | None = None,
                 on_wake: Callable[[str, float], None] | None = None,
                 on_change: Callable[[], None] | None = None,
                 accounting: Demand | None = None) -> None:
        self.config = config
        # The requests the layers hold for each model outside the pool (queued for a slot or
        # holding one): a model is not idle while it has them, and a saturated model gains a
        # replica once the oldest waited ``scale_up_after``; told how many replicas are ready.
        # None: nothing outside the pool (the pool alone, in its tests).
        self.accounting = accounting
        # Told after every change of a model's state (the admin API's event stream).
        self.on_change = on_change
        self.ledger = GpuLedger(gpu or ConfiguredMemory(config.gateway.gpu_memory_mb),
                                config.engines, config.gateway.gpu_memory_mb)
        self.launchers = launchers
        self.models = {m.name: self._model(m) for m in config.models}
        # Models a reload took out, under their name while they serve what they still have.
        self.retiring: dict[str, Model] = {}
        # Every server of every model (the retiring ones' too, until they stopped): the same
        # list for the runs and the placer, changed in place.
        self.servers: list[Backend] = []
        self.changes = Changes()
        gateway = config.gateway
        self.runs = Runs(self.servers, self.ledger, self.changes, notify=self._notify,
                         on_ready=on_ready, on_wake=on_wake, max_asleep=gateway.max_models_asleep,
                         max_models=gateway.max_models_concurrent,
                         placement_timeout=gateway.placement_timeout)
        # Each server's LoRA adapters: loaded where a request for one needs it.
        self.adapters = AdapterLoader(config, notify=self._notify)
        self._derive()
        self.request_stop = self.runs.request_stop
        self.supervisor = Supervisor()

    def _derive(self) -> None:
        """What follows from the models and the configuration: made again by a reload."""
        config = self.config
        # Each model's servers, and its first, under its name.
        self.replicas = {name: model.replicas for name, model in self.models.items()}
        self.backends = {name: model.replicas[0] for name, model in self.models.items()}
        self.servers[:] = [b for model in (*self.models.values(), *self.retiring.values())
                           for b in model.replicas]
        for key, backend in enumerate(self.servers):
            backend.key = key
        self.replicated = [m for m in self.models.values() if len(m.replicas) > 1]
        # The models the reaper may bring a server up for: load, or min_replicas to keep.
        self.scaled = [m for m in self.models.values()
                       if len(m.replicas) > 1 or m.settings.min_replicas]
        self.reap_interval = min(REAP_INTERVAL_MAX,
                                 *(m.idle_timeout / 10 for m in config.models),
                                 *(m.asleep_timeout / 10 for m in config.models
                                   if m.sleep_level is not None),
                                 *(m.scale_up_after / 4 for m in config.models
                                   if m.max_replicas > 1))
        gateway = config.gateway
        self.runs.max_asleep = gateway.max_models_asleep
        self.runs.placer.max_models = gateway.max_models_concurrent
        self.runs.placer.placement_timeout = gateway.placement_timeout
        self.runs.placer.add_devices()
        self.adapters.reconfigure(config, self.servers)

    def _model(self, settings: ModelSettings) -> Model:
        """The model and its servers, each with its placement (the alternatives in turn)."""
        model = Model(settings)
        if self.accounting is not None:
            model.demand = functools.partial(self.accounting.demand, settings.name)
        for i in range(settings.max_replicas):
            each = _replica_settings(settings, i)
            # The new server joins the model's replicas itself.
            Backend(each, self.launchers(each), replica=i, model=model,
                    slots=self.config.max_concurrent_of(settings), notify=self._notify)
        return model

    def reconfigure(self, config: Config, plan: ReloadPlan) -> None:
        """A live reload (synchronously: no lease slips in between): models added, removed
        models and those whose server changes retired (no new lease; what they serve finishes;
        then they stop), the limits of the others changed in place, for the next lease and the
        next decision. The servers of unchanged models are not touched."""
        self.config = config
        settings = {m.name: m for m in config.models}
        for name in plan.changed:
            model = self.models[name]
            model.settings = settings[name]
            for backend in model.replicas:
                backend.settings = _replica_settings(settings[name], backend.replica)
                backend.slots = config.max_concurrent_of(settings[name])
        for name in (*plan.removed, *plan.restarted):
            model = self.models.pop(name)
            removed = name in plan.removed
            why = ("removed from the configuration" if removed
                   else "its settings changed: " + ", ".join(plan.restarted[name]))
            self._retire(model, why, removed=removed)
        for name in (*plan.added, *plan.restarted):
            self.models[name] = self._model(settings[name])
        self._derive()
        for model in self.replicated:
            if self.accounting is not None and model.name in plan.restarted:
                self.accounting.serving(model.name, model.serving)
        if plan.added or plan.removed or plan.restarted:
            self._notify()

    def _retire(self, model: Model, why: str, *, removed: bool) -> None:
        """Take the model out of the configuration: its servers serve the requests that were
        already for it (a removed model's queued ones too; a restarted model's new requests go
        to its new servers), then stop. None is started again."""
        model.retired = why
        log.info("model retiring", model=model.name, reason=why)
        if not removed:
            # Its queue is its successor's now: it waits only for its own leases.
            model.demand = _nothing
        else:
            self.retiring[model.name] = model
        if self.runs.tg is None:  # not running: nothing to stop
            self.retiring.pop(model.name, None)
            return
        self.runs.tg.start_soon(self._drain_retired, model)

    async def _drain_retired(self, model: Model) -> None:
        while model.waiting or model.demand():
            # The accounting's demand does not signal its changes: looked at every tick.
            with anyio.move_on_after(self.reap_interval):
                await self.changes.wait()
        for backend in model.replicas:
            if backend.state is ModelState.READY:
                move(backend, Event.DRAIN, model.retired or "")
        while any(r.leases for r in model.replicas):
            await self.changes.wait()
        for backend in model.replicas:
            await self.runs.stop_and_wait(backend, model.retired or "retired")
        if self.retiring.get(model.name) is model:
            del self.retiring[model.name]
        self._derive()
        log.info("model retired", model=model.name)
        self._notify()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[BackendPool]:
        """Run the pool: the reaper and every server's run live inside this block."""
        self.changes.reset()
        self.runs.placer.open()
        async with httpx2.AsyncClient(timeout=HEALTH_TIMEOUT, trust_env=False) as health:
            self.runs.health.client = health
            async with anyio.create_task_group() as tg:
                self.runs.tg = tg
                self.adapters.open(health, tg)
                tg.start_soon(self.supervisor.run, "the idle reaper", self._reap)
                for backend in self.servers:
                    # A static server is watched from the start, so that a request for one
                    # that is down is refused at once.
                    if backend.launcher.has_running() or backend.static:
                        self.runs.launch(backend)
                self._tick(anyio.current_time())
                try:
                    yield self
                finally:
                    for backend in self.servers:
                        self.request_stop(backend, "gateway stopping")
                    tg.cancel_scope.cancel()
            self.runs.tg = None

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
        return self.models[name].state()

    def problem(self) -> str | None:
        """Why the pool no longer does its work (``/health`` says so), or None."""
        if self.runs.tg is None:
            return "the backend pool is not running"
        return self.supervisor.problem

    def _notify(self) -> None:
        """A server changed: wake whoever waits, re-read the GPUs, tell the listeners."""
        self.changes.tell()
        self.ledger.forget()
        for model in self.replicated:
            serving = model.ready()
            if model.replicas[0].mirrored:  # the owner tells the accounting
                continue
            if serving != model.serving and self.accounting is not None:
                model.serving = serving
                self.accounting.serving(model.name, serving)
        if self.on_change is not None:
            self.on_change()

    @asynccontextmanager
    async def lease(self, name: str, ask: Ask | None = None, *,
                    pin: tuple[int, int] | None = None) -> AsyncIterator[Backend]:
        """A ready backend of the model, kept from stopping until the block exits: of its
        replicas, one that holds the LoRA adapter ``ask`` names (bounded by
        ``affinity_slack``), else the one ``routing.route`` picks for ``ask`` (which then says
        why). With ``pin`` (replica, run): that run of that replica only, woken if it sleeps,
        never started."""
        model = self.models.get(name) or self.retiring.get(name)
        if model is None:
            raise removed(name)
        model.waiting += 1
        try:
            if pin is None:
                backend = await self._until_ready(model, ask or Ask())
            else:
                backend = await self._until_pinned(model.replicas[pin[0]], pin[1])
        finally:
            model.waiting -= 1
        backend.leases += 1
        backend.last_used = anyio.current_time()
        try:
            yield backend
        finally:
            backend.leases -= 1
            backend.last_used = anyio.current_time()
            if backend.leases == 0:
                self._notify()

    async def _until_ready(self, model: Model, ask: Ask) -> Backend:
        while True:
            if len(model.replicas) == 1:
                backend = model.replicas[0]
                if backend.state is ModelState.READY and backend.yields_to is None:
                    return backend
            else:
                chosen = route(model.replicas, ask, model.prefixes)
                if chosen is not None and ask.adapter is not None:
                    return prefer_holding(model.replicas, chosen, functools.partial(
                        self.adapters.holds, name=ask.adapter), ask.avoid)
                if chosen is not None:
                    model.routed_by(ask)
                    return chosen
                backend = min(model.replicas, key=bring_up_order)
            if model.retired is not None and backend.state not in COMING:
                # A reload took it out while this request was on its way: not started again.
                raise removed(model.name)
            # Started if it may be; a failed one is refused within its backoff, and a static
            # server that is down (its watch still runs) until a check passes.
            if backend.view().may_start(anyio.current_time()):
                self.runs.launch(backend)
            elif backend.state is ModelState.FAILED:
                raise refusal(backend)
            elif backend.state is ModelState.ASLEEP:
                self.runs.begin_wake(backend)
            start = backend.start
            if backend.state in COMING and start is not None:
                # A wake that failed ends without an error: the loop then starts the model cold.
                await start.done.wait()
                if start.error is not None:
                    raise start.error.fresh()
            else:
                await self.changes.wait()

    async def _until_pinned(self, backend: Backend, run: int) -> Backend:
        """The server that made a stored response, as long as it runs: another run of it has
        none of that one's responses, so it is not started for one."""
        while backend.starts == run:
            if backend.state is ModelState.READY and backend.yields_to is None:
                return backend
            if backend.state is ModelState.ASLEEP:  # asleep, it keeps what it holds in memory
                self.runs.begin_wake(backend)
            start = backend.start
            if backend.state is ModelState.WAKING and start is not None:
                await start.done.wait()
                if start.error is not None:
                    raise start.error.fresh()
            elif backend.state is ModelState.READY:  # it yields its turn to another start
                await self.changes.wait()
            else:
                break
        raise not_found(f"The server of model '{backend.name}' that made this response has "
                        "stopped since, and the response with it.", code="response_not_found",
                        param="response_id")

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
        if backend.state is not ModelState.ASLEEP:
            if not backend.is_idle():
                raise GatewayError(409, f"The model '{name}' is {backend.state.value}"
                                   + (" and in use" if backend.state is ModelState.READY else "")
                                   + ": only a ready model with no request sleeps.",
                                   type="invalid_request_error", code="model_not_idle",
                                   should_retry=False)
            self.runs.begin_sleep(backend)
        await settled(backend, self.changes)

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
            await self.changes.wait()
        draining = [r for r in replicas if r.state is ModelState.READY]
        if draining:
            for backend in draining:
                move(backend, Event.DRAIN, "unloading")
            try:
                while any(r.leases for r in draining):
                    await self.changes.wait()
            except BaseException:
                # Whoever asked is gone: the model serves again rather than stay half-drained,
                # with its new requests waiting for a stop that nobody will make.
                for backend in draining:
                    if backend.state is ModelState.DRAINING:
                        move(backend, Event.UNDRAIN, "the unload was given up")
                raise
        for backend in replicas:
            await self.runs.stop_and_wait(backend, "unloaded")

    async def _reap(self) -> None:
        while True:
            await anyio.sleep(self.reap_interval)
            decisions = self._tick(anyio.current_time())
            for reap in decisions.reap:
                backend = self.servers[reap.key]
                # [cluster]: only the owner reaps; a view ends with the owner's server.
                if backend.mirrored or not self.runs.may_act():
                    continue
                if reap.scale_down:
                    backend.of.scale_downs += 1
                    log.info("scaling down", model=backend.name, replica=backend.replica,
                             sleeps=reap.sleep)
                if reap.sleep:
                    self.runs.begin_sleep(backend)
                else:
                    self.request_stop(backend, "idle")
            for expire in decisions.expire:
                if not self.runs.may_act():
                    break
                self.request_stop(self.servers[expire.key], "asleep for its asleep_timeout")

    def _oldest_wait(self, name: str) -> float | None:
        return self.accounting.oldest_wait(name) if self.accounting is not None else None

    def _tick(self, now: float) -> planners.Tick:
        """The clock's decisions (``planners.tick``); the replicas to bring up are brought up
        here, the rest is the reaper's."""
        views = [b.view() for b in self.servers]
        decisions = planners.tick(
            views, [[views[r.key] for r in model.replicas] for model in self.scaled],
            {model.name: self._oldest_wait(model.name) for model in self.scaled}, now)
        for up in decisions.up:
            if not self.runs.may_act():  # [cluster]: the owner scales
                break
            spare = self.servers[up.key]
            spare.of.scale_ups += 1
            log.info("scaling up", model=spare.name, replica=spare.replica, reason=up.why,
                     ready=up.ready)
            if up.wake:
                self.runs.begin_wake(spare)
            else:
                self.runs.launch(spare)
        return decisions
