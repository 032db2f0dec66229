"""``OwnerLease``: the one process of a ``[cluster]`` that owns the pool (starts, stops, puts to
sleep and wakes model servers), elected by a lease in Redis, with a fencing token.

Every member contends: ``claim`` sets the owner key (``SET ... PX lease``) only where no one
holds it, and gives the new owner a token one more than the last (``INCR``), so a later owner
always holds a larger token. The owner renews every ``cluster.heartbeat_s`` (by a script that
checks it still holds the key, with its token). Its lease here ends ``MARGIN`` of the lease
before Redis's could, counted on the monotonic clock from the moment the last successful renew
was *sent*: an owner that cannot renew in time (Redis away, the process stopped by SIGSTOP or
starved) steps down at its own deadline, before any other could be elected. ``holds()`` reads
the clock itself, so a process resumed after a long stop has stepped down before it acts.

``fence()`` is asked before every pool action: it checks the local deadline, asks Redis, in
one script, that the key is still this token's, and checks the deadline again (the answer may
have waited in a stopped process); a stale owner's action is refused (``NotOwner``). A server
that a process started while it owned the pool is stopped by that process once it steps down
(``backends.shared``): the check cannot hold a server from starting, only keep a stale owner
from starting another.

Events (to the log and ``on_event``): ``owner elected`` (with the token) and ``owner stepped
down`` (with why), on the member concerned; ``on_change`` is told every change of ownership.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import coredis
import structlog
from coredis.exceptions import RedisError

from kernel.config import Config

from .members import CALL_TIMEOUT, OnEvent

log = structlog.get_logger("gateway.cluster")

SCRIPT = Path(__file__).with_name("owner.lua").read_text()
# The share of the lease an owner gives up early (clock rates, the renew's travel).
MARGIN = 0.2


class NotOwner(Exception):
    """A pool action of a process that does not (or no longer) own the pool."""


class OwnerLease:
    def __init__(self, config: Config, member_id: str, *, on_event: OnEvent | None = None,
                 on_change: Callable[[bool], None] | None = None) -> None:
        cluster = config.cluster
        assert cluster.key_prefix is not None
        self.prefix = cluster.key_prefix
        self.id = member_id
        self.lease_s = cluster.lease_s
        self.heartbeat = cluster.heartbeat
        self.on_event = on_event
        self.on_change = on_change
        # This process's token while it owns the pool, else None; the owner as last seen.
        self.token: int | None = None
        self.holder: str | None = None
        # The monotonic time at which this process stops owning unless it renewed.
        self._until = 0.0
        self._script: Any = None
        self._changed = anyio.Event()

    def holds(self) -> bool:
        """Whether this process owns the pool now (steps down here if its time has passed)."""
        if self.token is not None and anyio.current_time() >= self._until:
            self._step_down("its lease ran out before it could renew it")
        return self.token is not None

    async def fence(self) -> int:
        """The token, checked against Redis: raises ``NotOwner`` unless this process owns the
        pool now. Asked before every pool action."""
        if not self.holds():
            raise NotOwner(f"this process ({self.id}) does not own the pool")
        token = self.token
        assert token is not None
        if not await self.valid(token):
            self._step_down("the lease in Redis is no longer its own")
            raise NotOwner(f"this process ({self.id}) no longer owns the pool (token {token})")
        # The answer may have waited (the process stopped while it travelled): the clock again.
        if not self.holds():
            raise NotOwner(f"this process ({self.id}) no longer owns the pool (token {token})")
        return token

    async def publish(self, pairs: list[str]) -> bool:
        """Write the pool's picture (``board``), if the lease is still this token's: checked
        with the write, in one script."""
        token = self.token
        if token is None or not self.holds():
            return False
        return bool(await self._call("publish", token, round(self.lease_s * 1000), *pairs))

    async def valid(self, token: int) -> bool:
        """Whether Redis holds the lease for this member and ``token`` (one atomic check)."""
        return bool(await self._call("fence", token))

    async def _call(self, op: str, *args: Any) -> Any:
        with anyio.fail_after(CALL_TIMEOUT):
            return await self._script(keys=[], args=[self.prefix, op, self.id, *args])

    @asynccontextmanager
    async def running(self, client: coredis.Redis[str]) -> AsyncIterator[OwnerLease]:
        """Contend for the pool (and renew while owning it) while the block runs; an owner
        resigns at its end, so that another takes over at once."""
        self._script = client.register_script(SCRIPT)
        await self._contend()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._contend_forever)
            tg.start_soon(self._watch)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()
                token = self.token
                if token is not None:
                    self._step_down("the process stops")
                    with anyio.CancelScope(shield=True), anyio.move_on_after(CALL_TIMEOUT):
                        with suppress(RedisError, OSError, TimeoutError):
                            await self._call("resign", token)

    async def _contend(self) -> None:
        """One step: renew while owning (step down if refused), else claim if no one holds."""
        ms = round(self.lease_s * 1000)
        sent = anyio.current_time()
        try:
            if self.token is not None:
                if await self._call("renew", self.token, ms):
                    if self.holds():  # not past its deadline while the renew travelled
                        self._until = sent + self.lease_s * (1 - MARGIN)
                else:
                    self._step_down("another process holds the lease")
                return
            token, holder = await self._call("claim", ms)
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("cluster lease call failed", error=repr(exc))
            self.holds()
            return
        self.holder = holder
        if token:
            self.token = int(token)
            self._until = sent + self.lease_s * (1 - MARGIN)
            self._tell("owner elected", "this process owns the pool")

    async def _contend_forever(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat)
            await self._contend()

    async def _watch(self) -> None:
        """Step down at the deadline itself, not only at the next renew."""
        while True:
            if self.token is None:
                await self._changed.wait()
            else:
                await anyio.sleep(max(0.0, self._until - anyio.current_time()))
                self.holds()

    def _step_down(self, why: str) -> None:
        if self.token is None:
            return
        self._tell("owner stepped down", why)
        self.token = None
        if self.holder == self.id:
            self.holder = None

    def _tell(self, what: str, why: str) -> None:
        fields = {"member": self.id, "token": self.token, "why": why}
        (log.warning if what == "owner stepped down" else log.info)(what, **fields)
        if self.on_event is not None:
            self.on_event(what, fields)
        self._changed.set()
        self._changed = anyio.Event()
        if self.on_change is not None:
            self.on_change(self.token is not None and what == "owner elected")
