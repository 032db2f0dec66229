"""LoRA adapters on a model's servers: which each server holds, and loading one where a request
needs it.

Owns the invariant that a request for an adapter is forwarded only to a server that holds it,
and that no adapter is unloaded while a request for it is in flight there. ``using(backend,
name)`` is held around the forwarding: if the server holds the adapter, the request counts as
in flight for it at once; else it waits for the adapter's load on that server, which one task
makes for every request that waits for it (one load at a time per server, through vLLM's
``/v1/load_lora_adapter``) and whose outcome they all get: a failed load is the error of the
requests that waited for it, and the next request tries again. A server that holds
``max_loras`` adapters first unloads the least recently used one with no request in flight,
waiting up to ``gateway.placement_timeout`` for one to finish if all are in use. A load, with
its waits, is bounded by the model's ``startup_timeout`` and ``upstream.timeout``, whichever is
shorter.

What a server holds belongs to its run: a server that stops (or restarts) holds nothing, and a
level 2 sleep drops the adapters' weights with the model's (vLLM keeps the adapter's name: a
load after it is an in-place load). A level 1 sleep keeps them: vLLM moves every weight to host
memory and back.

``prefer_holding`` is routing's part: of a model's ready replicas, one that holds the adapter
takes the request, within the same load bound as a session's replica.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import httpx2
import structlog
from anyio.abc import TaskGroup

from kernel.config import Config
from kernel.context import RequestState
from kernel.errors import GatewayError, unavailable

from .planners import LOADED
from .server import Backend, Changes
from .states import ModelState

log = structlog.get_logger("gateway.adapters")

LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"
# The states in which a server's run holds what it loaded (not starting: that is the next run,
# which has not counted itself in ``starts`` yet).
HOLDING = (*LOADED, ModelState.ASLEEP, ModelState.WAKING)


@dataclass(eq=False)
class Held:
    """An adapter loaded on a server: the requests for it in flight there, its last use."""

    name: str
    in_flight: int = 0
    last_used: float = 0.0


@dataclass(eq=False)
class Load:
    """One load of an adapter on a server; the requests that wait for it get its outcome
    (``error``; on success each holds one of the in-flight counts it was given)."""

    done: anyio.Event = field(default_factory=anyio.Event)
    error: GatewayError | None = None
    waiters: int = 0


@dataclass(eq=False)
class _Server:
    """What one server's run holds, and its loads in flight."""

    run: tuple[int, int]
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    held: dict[str, Held] = field(default_factory=dict)
    loads: dict[str, Load] = field(default_factory=dict)


def _run(backend: Backend) -> tuple[int, int]:
    """The server's run, and the level 2 sleeps in it (each drops its adapters)."""
    return backend.starts, backend.sleeps if backend.settings.sleep_level == 2 else 0


class AdapterLoadFailed(Exception):
    """vLLM refused a load or an unload; the message is its reason."""


def _reason(response: httpx2.Response) -> str:
    """vLLM's message in its error envelope, else the body as text."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip() or f"status {response.status_code}"


class AdapterLoader:
    def __init__(self, config: Config, *, notify: Callable[[], None]) -> None:
        self.notify = notify
        self.client: httpx2.AsyncClient | None = None
        self.tg: TaskGroup | None = None
        self.freed = Changes()
        self._servers: dict[Backend, _Server] = {}
        # Per adapter name: loads made, unloads made, loads that failed.
        self.loads: dict[str, int] = {}
        self.unloads: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.reconfigure(config, [])

    def reconfigure(self, config: Config, servers: list[Backend]) -> None:
        """The adapters of ``config`` (a live reload's: an adapter added or moved restarts its
        model's servers), and the records of ``servers`` only (those of servers gone with a
        reload are dropped)."""
        self.paths = {a.name: a.path for m in config.models for a in m.adapters}
        self.upstream_timeout = config.upstream.timeout
        self.slot_timeout = config.gateway.placement_timeout
        for counts in (self.loads, self.unloads, self.failures):
            for name in self.paths:
                counts.setdefault(name, 0)
        kept = set(servers)
        for backend in [b for b in self._servers if b not in kept]:
            del self._servers[backend]

    def open(self, client: httpx2.AsyncClient, tg: TaskGroup) -> None:
        """Begin (the pool runs): the client for vLLM's calls, the task group for the loads."""
        self.client = client
        self.tg = tg
        self.freed.reset()
        self._servers.clear()

    def _server(self, backend: Backend) -> _Server:
        """The server's record for its run now (a new run holds nothing)."""
        server = self._servers.get(backend)
        if server is None or server.run != _run(backend):
            server = self._servers[backend] = _Server(_run(backend))
        return server

    def loaded(self, backend: Backend) -> list[str]:
        """The adapters the server holds now, least recently used first."""
        server = self._servers.get(backend)
        if server is None or server.run != _run(backend) or backend.state not in HOLDING:
            return []
        return [h.name for h in sorted(server.held.values(), key=lambda h: h.last_used)]

    def holds(self, backend: Backend, name: str) -> bool:
        return name in self.loaded(backend)

    @asynccontextmanager
    async def using(self, backend: Backend, name: str,
                    state: RequestState) -> AsyncIterator[None]:
        """The adapter loaded on the server, and kept there until the block exits."""
        held = await self._acquire(backend, name, state)
        try:
            yield
        finally:
            held.in_flight -= 1
            held.last_used = anyio.current_time()
            if held.in_flight == 0:
                self.freed.tell()

    async def _acquire(self, backend: Backend, name: str, state: RequestState) -> Held:
        server = self._server(backend)
        held = server.held.get(name)
        if held is not None:
            held.in_flight += 1
            held.last_used = anyio.current_time()
            return held
        load = server.loads.get(name)
        if load is None:
            assert self.tg is not None, "the pool is not running"
            load = server.loads[name] = Load()
            self.tg.start_soon(self._load, backend, server, name, load)
        load.waiters += 1
        state.adapter_loading = True
        loaded = False
        try:
            await load.done.wait()
            loaded = True
        finally:
            state.adapter_loading = False
            if not loaded:
                if not load.done.is_set():
                    load.waiters -= 1
                elif load.error is None:  # given an in-flight count as it left: given back
                    held = server.held[name]
                    held.in_flight -= 1
                    if held.in_flight == 0:
                        self.freed.tell()
        if load.error is not None:
            raise load.error.fresh()
        return server.held[name]

    def _timeout(self, backend: Backend) -> float:
        return min(backend.settings.startup_timeout, self.upstream_timeout)

    async def _load(self, backend: Backend, server: _Server, name: str, load: Load) -> None:
        """Load the adapter on the server (room made first), for the requests that wait."""
        model = backend.name
        timeout = self._timeout(backend)
        # This task serves every request that waits for the load: its lines are the server's,
        # not the first request's (whose id is logged with "adapter loading").
        launched_by = structlog.contextvars.get_contextvars().get("request_id")
        structlog.contextvars.clear_contextvars()
        try:
            with anyio.fail_after(timeout):
                async with server.lock:
                    await self._make_room(backend, server, name)
                    address = backend.address
                    if server.run != _run(backend) or address is None:
                        raise unavailable(f"The server of model '{model}' stopped while the "
                                          f"adapter '{name}' was loading.",
                                          code="model_stopped", retry_after=1)
                    log.info("adapter loading", model=model, adapter=name,
                             replica=backend.replica, launched_by=launched_by)
                    began = anyio.current_time()
                    # In place: a server that the gateway did not see load it (an adopted one,
                    # one after a level 2 sleep) knows its name already, and refuses a load.
                    await self._call(address, LOAD_PATH, {
                        "lora_name": name, "lora_path": self.paths[name], "load_inplace": True})
                    self.loads[name] += 1
                    log.info("adapter loaded", model=model, adapter=name,
                             replica=backend.replica,
                             seconds=round(anyio.current_time() - began, 3))
                    server.held[name] = Held(name, load.waiters, anyio.current_time())
        except TimeoutError:
            load.error = GatewayError(
                504, f"The adapter '{name}' of model '{model}' did not load within "
                f"{timeout:g} s.", type="timeout_error", code="adapter_load_timeout")
        except GatewayError as exc:
            load.error = exc
        except Exception as exc:  # vLLM's refusal, or its failure to answer: this load's only
            reason = str(exc) or type(exc).__name__
            load.error = GatewayError(
                502, f"The adapter '{name}' of model '{model}' failed to load: {reason}",
                type="upstream_error", code="adapter_load_failed")
        finally:
            del server.loads[name]
            if load.error is not None:
                self.failures[name] += 1
                log.warning("adapter load failed", model=model, adapter=name,
                            replica=backend.replica, error=load.error.message)
            load.done.set()
            self.notify()

    async def _make_room(self, backend: Backend, server: _Server, name: str) -> None:
        """Unload the least recently used idle adapters until the server has room for one more;
        if every one is in use, wait (``placement_timeout``) for one to finish."""
        limit = backend.settings.max_loras
        deadline = anyio.current_time() + self.slot_timeout
        while len(server.held) >= limit:
            idle = [h for h in server.held.values() if h.in_flight == 0]
            if not idle:
                freed = self.freed.next()
                with anyio.move_on_after(deadline - anyio.current_time()):
                    await freed.wait()
                    continue
                raise unavailable(
                    f"The adapter '{name}' of model '{backend.name}' cannot be loaded: the "
                    f"server holds max_loras ({limit}) adapters, each with requests in flight.",
                    code="adapter_slots_busy", retry_after=1)
            victim = min(idle, key=lambda h: h.last_used)
            # Forgotten first: a request for it from here on waits for a load of its own.
            del server.held[victim.name]
            address = backend.address
            if address is None:
                return
            try:
                await self._call(address, UNLOAD_PATH, {"lora_name": victim.name})
            except AdapterLoadFailed as exc:  # not held there any more either way
                log.warning("adapter unload refused", model=backend.name, adapter=victim.name,
                            reason=str(exc))
            self.unloads[victim.name] += 1
            log.info("adapter unloaded", model=backend.name, adapter=victim.name,
                     replica=backend.replica, reason="max_loras")
            self.notify()

    async def _call(self, address: str, path: str, body: dict[str, object]) -> None:
        assert self.client is not None
        response = await self.client.post(address + path, json=body, timeout=None)
        if response.status_code != 200:
            raise AdapterLoadFailed(_reason(response))


def prefer_holding(replicas: list[Backend], chosen: Backend, holds: Callable[[Backend], bool],
                   avoid: int | None = None) -> Backend:
    """The replica a request for an adapter goes to: ``chosen`` (routing's choice) if it holds
    the adapter, else the least loaded ready replica that holds it (not ``avoid``, whose
    connect failed), if it has a free slot and no more than ``affinity_slack`` times the
    average load; else ``chosen``."""
    if holds(chosen):
        return chosen
    ready = [r for r in replicas if r.state is ModelState.READY and r.yields_to is None
             and r.replica != avoid]
    holding = [r for r in ready if holds(r)]
    if not holding:
        return chosen
    best = min(holding, key=lambda r: r.leases)
    total = sum(r.leases for r in ready)
    bound = math.ceil(best.settings.affinity_slack * (total + 1) / len(ready))
    if best.leases < best.slots and best.leases + 1 <= bound:
        return best
    return chosen
