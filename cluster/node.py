"""``ClusterNode``: this process as a member of its ``[cluster]``: its membership (one
configuration for all, ``members``), its bid for the pool (``owner``) and the pool's picture and
demand (``board``), on one Redis client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

import anyio
import coredis
from coredis.exceptions import RedisError

from kernel.config import Config, ConfigError

from .board import PoolBoard
from .members import Membership, OnEvent
from .owner import OwnerLease


class ClusterNode:
    def __init__(self, config: Config, member_id: str, *, on_event: OnEvent | None = None,
                 on_owner: Callable[[bool], None] | None = None) -> None:
        assert config.cluster.redis_url is not None
        self.url = config.cluster.redis_url
        self.id = member_id
        self.membership = Membership(config, member_id, on_event=on_event)
        self.owner = OwnerLease(config, member_id, on_event=on_event, on_change=on_owner)
        self.board = PoolBoard(self.owner)
        self.client: coredis.Redis[str] | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ClusterNode]:
        """Join (``ConfigError`` if this configuration is not the cluster's), contend for the
        pool, and leave at the end of the block."""
        client: coredis.Redis[str] = coredis.Redis.from_url(self.url, decode_responses=True)
        async with (client, self.membership.running(client),
                    self.owner.running(client)):
            self.client = self.board.client = client
            try:
                yield self
            finally:
                self.client = self.board.client = None

    async def alone(self) -> bool:
        """Whether no other member is there: asked of Redis now (as last seen, if it does not
        answer in time)."""
        with anyio.CancelScope(shield=True), suppress(RedisError, OSError, TimeoutError,
                                                      ConfigError):
            await self.membership.beat()
        return not self.membership.members.keys() - {self.id}

    def snapshot(self) -> dict[str, object]:
        """What the admin API shows: the members and the owner as last seen."""
        return {"member": self.id, "members": self.membership.members,
                "owner": self.owner.holder, "owns_pool": self.owner.holds(),
                "token": self.owner.token}
