"""The pool of a ``[cluster]`` process: the process that owns the pool (``cluster.owner``)
drives the model servers; every other routes to the servers the owner publishes
(``cluster.board``), and asks the owner to bring up a model it needs.

Every process keeps its own ``BackendPool``; what differs is each server's launcher, a
``SharedLauncher`` around the configured one (static models keep theirs: each process watches
a fixed URL itself):
- in the owner it is the configured launcher, its start fenced (``OwnerLease.fence``: a stale
  owner starts nothing);
- in any other process it is a view (``mirrors``): its start asks the owner for the model and
  waits until the owner publishes that replica ready, then returns its URL (the pool then checks
  its health, leases and routes as for any server); the view is stopped when the published
  server is gone (stopped, asleep, another run) or this process becomes the owner. A view never
  sleeps, wakes or stops a real server: stopping it only ends the view.
When the owner steps down, it stops its own servers' runs once another process owns the pool,
or a lease after it stepped down (Redis away: the streams in flight go on meanwhile, and an
owner elected again keeps its servers). A process server ends with its run, and the new owner
starts it again on demand; a container runs on (``ContainerLauncher.release``: a process that
no longer owns the pool stops no container), and the new owner adopts it. At the start of each
term, before it starts anything, an owner looks for the containers that still run, by their
labels (``ContainerEngines.adopt``), and begins a run of each, which adopts it: nothing runs
twice.

``SharedPool.running`` runs, in every process, the read of the picture every ``board.POLL``
seconds; in the owner, the publishing of the pool (on a change, else every heartbeat), the
demand it is asked (one bring-up per model at a time: a lease, as a request's) and, for each
model that the accounting says is in use anywhere in the cluster, the last use of its ready
servers (the idle reaper counts the cluster's requests, not only its own).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import TaskGroup
from coredis.exceptions import RedisError

from cluster.board import POLL
from cluster.owner import NotOwner
from kernel.config import ModelSettings
from kernel.errors import GatewayError

from .container import ContainerLauncher
from .launcher import Launcher, LaunchError
from .states import ModelState

if TYPE_CHECKING:
    from cluster.board import Servers
    from cluster.node import ClusterNode

    from .pool import BackendPool, LauncherFactory

log = structlog.get_logger("gateway.pool")



class SharedPool:
    def __init__(self, node: ClusterNode, heartbeat: float, *,
                 adopt: Callable[[], Awaitable[None]] | None = None) -> None:
        self.node = node
        self.owner = node.owner
        self.board = node.board
        self.heartbeat = heartbeat
        self.pool: BackendPool | None = None
        # The picture as last read: model -> its servers (replica, state, url, run).
        self.published: Servers = {}
        self._read = anyio.Event()
        # When this process last asked the owner for each model; the bring-ups in flight.
        self._asked: dict[str, float] = {}
        self._bringing: set[str] = set()
        self._sent: str | None = None
        # When this process last owned the pool (its own servers outlive that by a lease at most).
        self._owned_at = 0.0
        # The look for the containers the last owner left (``ContainerEngines.adopt``), and the
        # token of the term it was made in.
        self._adopt = adopt
        self._adopting = anyio.Lock()
        self._adopted: int | None = None

    def wrap(self, launchers: LauncherFactory) -> LauncherFactory:
        def launcher(model: ModelSettings) -> Launcher:
            local = launchers(model)
            if isinstance(local, ContainerLauncher):
                local.fence = self.fence
            return local if model.launcher == "static" else SharedLauncher(local, model, self)
        return launcher

    def owns(self) -> bool:
        return self.owner.holds()

    async def fence(self) -> None:
        """Before a pool action on a real server (sleep, wake): ``NotOwner`` unless this
        process owns the pool, by its token in Redis."""
        await self.owner.fence()

    async def adopted(self) -> None:
        """Once in each term of ownership, before anything starts in it: the containers the
        last owner left running are found by their labels, to be adopted, not started again
        (a ``LaunchError`` if an engine fails: asked again next time; ``NotOwner`` if this
        process no longer owns the pool: the look removes the containers that ended)."""
        async with self._adopting:
            token = self.owner.token
            if self._adopt is None or token is None or token == self._adopted:
                return
            await self.fence()
            await self._adopt()
            self._adopted = token

    def entry(self, model: str, replica: int) -> dict[str, Any] | None:
        """The published server of that replica, if it is ready and not this process's own
        (a picture it published itself, read before it stepped down, is stale)."""
        for server in self.published.get(model, ()):
            if (server["replica"] == replica and server["state"] == "ready" and server["url"]
                    and server["owner"] != self.owner.id):
                return server
        return None

    async def until(self, done: Callable[[], bool]) -> None:
        """Until ``done()``, asked after each read of the picture."""
        while not done():
            await self._read.wait()

    async def ask(self, model: str) -> None:
        """Ask the owner for the model, at most once a heartbeat."""
        now = anyio.current_time()
        if now - self._asked.get(model, -self.heartbeat) >= self.heartbeat:
            self._asked[model] = now
            try:
                await self.board.ask(model)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("could not ask the pool's owner for a model", model=model,
                            error=repr(exc))

    @asynccontextmanager
    async def running(self, pool: BackendPool) -> AsyncIterator[SharedPool]:
        self.pool = pool
        pool.runs.fence = self.fence
        pool.runs.may_act = self.owns
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._read_forever)
            tg.start_soon(self._publish_forever)
            tg.start_soon(self._serve_demand, tg)
            if self._adopt is not None:
                tg.start_soon(self._adopt_forever)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()

    async def _read_forever(self) -> None:
        while True:
            try:
                self.published = await self.board.read()
            except (RedisError, OSError, TimeoutError):
                pass  # the accounting says Redis is away; the picture stays as last read
            self._end_stale()
            self._read.set()
            self._read = anyio.Event()
            await anyio.sleep(POLL)

    def _end_stale(self) -> None:
        """Stop the runs this process may no longer have: its own servers once it does not own
        the pool, and the views of servers the owner no longer publishes ready."""
        assert self.pool is not None
        owns = self.owns()
        now = anyio.current_time()
        if owns:
            self._owned_at = now
        holder = self.owner.holder
        # Another owner is known, or Redis has been away for a lease since it owned the pool.
        superseded = (holder not in (None, self.owner.id)
                      or now - self._owned_at >= self.owner.lease_s)
        for backend in self.pool.servers:
            launcher = backend.launcher
            if not isinstance(launcher, SharedLauncher) or backend.scope is None:
                continue
            if not launcher.mirrors and not owns and superseded:
                self.pool.request_stop(backend, "this process no longer owns the pool")
            elif launcher.mirrors and launcher.address is not None and not launcher.published():
                self.pool.request_stop(backend, "this process owns the pool now" if owns
                                       else "the pool's owner no longer serves it")

    def picture(self) -> Servers:
        assert self.pool is not None
        return {name: [{"replica": b.replica, "run": b.starts, "url": b.address,
                        "owner": self.owner.id,
                        "state": ModelState.STOPPED.value if mirrored(b) else b.state.value}
                       for b in model.replicas]
                for name, model in self.pool.models.items()}

    def _mirror(self) -> None:
        """Begin a view of each server the owner has ready that this process does not view."""
        assert self.pool is not None
        now = anyio.current_time()
        for name, servers in self.published.items():
            replicas = self.pool.replicas.get(name, [])
            for server in servers:
                if server["state"] != "ready" or server["replica"] >= len(replicas):
                    continue
                backend = replicas[server["replica"]]
                if backend.view().may_start(now):
                    self.pool.runs.launch(backend)

    async def _publish_forever(self) -> None:
        assert self.pool is not None
        last = 0.0
        while True:
            await anyio.sleep(POLL)
            if not self.owns():
                self._sent = None
                self._mirror()
                continue
            now = anyio.current_time()
            for model in self.pool.models.values():
                if model.demand() > 0:  # in use somewhere in the cluster: not idle
                    for backend in model.replicas:
                        if backend.state is ModelState.READY and not mirrored(backend):
                            backend.last_used = now
            picture = self.picture()
            text = json.dumps(picture, sort_keys=True)
            if text == self._sent and now - last < self.heartbeat:
                continue
            try:
                if await self.board.publish(picture):
                    self._sent, last = text, now
            except (RedisError, OSError, TimeoutError):
                self._sent = None

    async def _adopt_forever(self) -> None:
        """In the owner: a run for each server the look found still running (its view, if it
        had one, has stopped), so that it serves again without waiting for a request."""
        assert self.pool is not None
        while True:
            await anyio.sleep(POLL)
            if not self.owns():
                continue
            try:
                await self.adopted()
            except NotOwner:
                continue
            except LaunchError as exc:
                log.warning("could not look for the containers the pool's last owner left",
                            error=str(exc))
                continue
            now = anyio.current_time()
            for backend in self.pool.servers:
                if backend.launcher.has_running() and backend.view().may_start(now):
                    self.pool.runs.launch(backend)

    async def _serve_demand(self, tg: TaskGroup) -> None:
        assert self.pool is not None
        while True:
            if not self.owns():
                await anyio.sleep(POLL)
                continue
            try:
                name = await self.board.asked(within=1.0)
            except (RedisError, OSError, TimeoutError):
                await anyio.sleep(POLL)
                continue
            if name in self.pool.models and name not in self._bringing and self.owns():
                self._bringing.add(name)
                tg.start_soon(self._bring_up, name)

    async def _bring_up(self, name: str) -> None:
        """Start (or wake) the model as a request would; its requests come from elsewhere."""
        assert self.pool is not None
        try:
            async with self.pool.lease(name):
                pass
        except GatewayError as exc:
            log.warning("could not bring up a model another process asked for", model=name,
                        error=exc.message)
        finally:
            self._bringing.discard(name)


def mirrored(backend: Any) -> bool:
    """Whether the server's run is a view of the owner's server (not a server of its own)."""
    return bool(getattr(backend.launcher, "mirrors", False))


class SharedLauncher:
    """The configured launcher while this process owns the pool; a view of the owner's
    published server otherwise (``mirrors``)."""

    def __init__(self, local: Launcher, settings: ModelSettings, shared: SharedPool) -> None:
        self.local = local
        self.settings = settings
        self.shared = shared
        self.address: str | None = None
        self.mirrors = False
        self._run: int | None = None

    async def start(self, task_group: TaskGroup) -> str:
        name, replica = self.settings.name, self.settings.replica
        while True:
            if self.shared.owns():
                try:
                    await self.shared.fence()
                    self.mirrors = False
                    await self.shared.adopted()
                    # A container's start asks the fence again before it makes one.
                    self.address = await self.local.start(task_group)
                    return self.address
                except NotOwner:
                    pass
            self.mirrors = True
            entry = self.shared.entry(name, replica)
            if entry is not None:
                self.address, self._run = entry["url"], entry["run"]
                return entry["url"]
            await self.shared.ask(name)
            with anyio.move_on_after(self.shared.heartbeat):
                await self.shared.until(lambda: self.shared.owns()
                                        or self.shared.entry(name, replica) is not None)

    def published(self) -> bool:
        """Whether the server this view routes to is still published ready (and this process
        does not own the pool)."""
        entry = self.shared.entry(self.settings.name, self.settings.replica)
        return (entry is not None and entry["url"] == self.address
                and entry["run"] == self._run and not self.shared.owns())

    async def wait_exit(self) -> str:
        if self.mirrors:
            # Stopped first (SharedPool._end_stale, before this wakes) once it serves; during
            # its start the health check asks this.
            await self.shared.until(lambda: not self.published())
            return "the pool's owner no longer serves it"
        return await self.local.wait_exit()

    def is_alive(self) -> bool:
        return self.published() if self.mirrors else self.local.is_alive()

    async def stop(self) -> None:
        """A server of its own is stopped (owner or not: a stale owner's process servers end
        with it), but a container only by the owner: one that stepped down leaves it running,
        for the next owner to adopt; a view just forgets the address."""
        if not self.mirrors:
            if isinstance(self.local, ContainerLauncher) and not self.shared.owns():
                self.local.release("this process no longer owns the pool: the next owner "
                                   "adopts it")
            else:
                await self.local.stop()
        self.address = None

    async def output_tail(self) -> str:
        return "" if self.mirrors else await self.local.output_tail()

    def has_running(self) -> bool:
        return self.shared.owns() and self.local.has_running()
