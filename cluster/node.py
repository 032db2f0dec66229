"""``ClusterNode``: this process as a member of its ``[cluster]``: its membership (one
configuration for all, ``members``), its bid for the pool (``owner``), the pool's picture and
demand (``board``) and the whole cluster as one picture (``view``, read every heartbeat), on one
Redis client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import coredis
from coredis.exceptions import RedisError

from kernel.config import Config, ConfigError

from .board import PoolBoard
from .members import Membership, OnEvent
from .owner import OwnerLease
from .view import ClusterView


class ClusterNode:
    def __init__(self, config: Config, member_id: str, *, on_event: OnEvent | None = None,
                 on_owner: Callable[[bool], None] | None = None) -> None:
        assert config.cluster.redis_url is not None
        self.url = config.cluster.redis_url
        self.id = member_id
        self.heartbeat = config.cluster.heartbeat
        self.membership = Membership(config, member_id, on_event=on_event)
        self.owner = OwnerLease(config, member_id, on_event=on_event, on_change=on_owner)
        self.board = PoolBoard(self.owner)
        self.view = ClusterView(config)
        self.client: coredis.Redis[str] | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ClusterNode]:
        """Join (``ConfigError`` if this configuration is not the cluster's), contend for the
        pool, read the cluster's picture every heartbeat, and leave at the end of the block."""
        client: coredis.Redis[str] = coredis.Redis.from_url(self.url, decode_responses=True)
        async with (client, self.membership.running(client),
                    self.owner.running(client), anyio.create_task_group() as tg):
            self.client = self.board.client = client
            self.view.attach(client)
            tg.start_soon(self._watch)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()
                self.client = self.board.client = None
                self.view.attach(None)

    async def _watch(self) -> None:
        while True:
            await self.view.refresh()
            await anyio.sleep(self.heartbeat)

    def snapshot(self) -> dict[str, Any]:
        """What the admin API shows: this member and whether it owns the pool (now), and the
        cluster's members and owner as last read (``time``); ``error`` while Redis cannot be
        read."""
        picture = self.view.last
        return {"member": self.id, "owns_pool": self.owner.holds(), "token": self.owner.token,
                "error": self.view.error,
                **(picture.as_json() if picture is not None
                   else {"time": None, "members": [], "owner": None})}

    async def alone(self) -> bool:
        """Whether no other member is there: asked of Redis now (as last seen, if it does not
        answer in time)."""
        with anyio.CancelScope(shield=True), suppress(RedisError, OSError, TimeoutError,
                                                      ConfigError):
            await self.membership.beat()
        return not self.membership.members.keys() - {self.id}
