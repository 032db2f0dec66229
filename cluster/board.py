"""``PoolBoard``: the pool as its owner publishes it, and the starts the other processes ask of
it, in Redis.

The owner publishes every model's servers (per replica: its state, URL, run number and the
owner's id) after each change and every heartbeat, by the owner script's ``publish``, which
writes only while the lease is its token's: a stale owner's picture never overwrites the new
owner's, and the picture expires with the lease unless published again (a dead owner's servers
are not routed to for longer than the lease). Every process reads the picture every ``POLL``
seconds (one ``HGETALL``); a process that needs a model that is not ready pushes its name to
the demand list (bounded: ``MAX_DEMAND``), which the owner pops (one blocking pop) and brings
the model up for.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import coredis

from .owner import CALL_TIMEOUT, OwnerLease

# Seconds between two reads of the picture; the most names the demand list keeps.
POLL = 0.2
MAX_DEMAND = 1000

Servers = dict[str, list[dict[str, Any]]]


class PoolBoard:
    def __init__(self, owner: OwnerLease) -> None:
        self.owner = owner
        self.servers_key = f"{owner.prefix}:servers"
        self.demand_key = f"{owner.prefix}:demand"
        self.client: coredis.Redis[str] | None = None

    async def publish(self, servers: Servers) -> bool:
        """Publish the pool (the owner, with its token): False if this process does not own
        the pool (then nothing is written)."""
        return await self.owner.publish([part for model, replicas in servers.items()
                                         for part in (model, json.dumps(replicas))])

    async def read(self) -> Servers:
        assert self.client is not None
        with anyio.fail_after(CALL_TIMEOUT):
            flat = await self.client.hgetall(self.servers_key)
        return {model: json.loads(replicas) for model, replicas in flat.items()}

    async def ask(self, model: str) -> None:
        """Ask the owner to bring ``model`` up."""
        assert self.client is not None
        with anyio.fail_after(CALL_TIMEOUT):
            await self.client.rpush(self.demand_key, [model])
            await self.client.ltrim(self.demand_key, -MAX_DEMAND, -1)

    async def asked(self, within: float) -> str | None:
        """The next model asked for, or None after ``within`` seconds (the owner)."""
        assert self.client is not None
        popped = await self.client.blpop([self.demand_key], timeout=within)
        return popped[1] if popped else None
