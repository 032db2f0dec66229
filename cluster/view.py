"""``ClusterView``: the whole cluster as one picture, for ``/metrics``, ``/admin/models`` and the
dashboard: its members (id, host, pid, start, the age of each one's lease), the pool's owner
(which member, its fencing token, since when, the age of its lease), each model's queued and
in-flight requests of every process (the accounting's counts), and the servers the owner
publishes (``board``).

One read is one call of ``view.lua``, which only reads, bounded by ``CALL_TIMEOUT``: a scrape or
an admin call asks it anew; ``ClusterNode`` also reads it every heartbeat, for the admin event
stream (``last``). A read that fails (Redis away) raises, and ``error`` says why.

A lease's age is the time since its holder last renewed it (a live member's is under a
heartbeat; one near ``lease_s`` is about to be dropped). The counts are as the accounting keeps
them: a dead process's requests count until a call of the accounting reclaims them (within its
lease and a heartbeat).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import coredis
from coredis.exceptions import RedisError

from kernel.config import Config

from .board import Servers
from .members import CALL_TIMEOUT

SCRIPT = Path(__file__).with_name("view.lua").read_text()


@dataclass(frozen=True)
class Picture:
    """The cluster as read at ``time`` (Unix time, the Redis server's clock)."""

    time: float
    # Each live member: id, host, pid, started (Unix time), lease_age_s.
    members: list[dict[str, Any]]
    # The owner: member, token, since (Unix time), lease_age_s; None while no one owns the pool.
    owner: dict[str, Any] | None
    # Per model: (queued, in flight), of every process.
    models: dict[str, tuple[int, int]]
    servers: Servers

    def as_json(self) -> dict[str, Any]:
        return {"time": self.time, "members": self.members, "owner": self.owner}


class ClusterView:
    def __init__(self, config: Config) -> None:
        cluster = config.cluster
        assert cluster.key_prefix is not None
        self.prefix = cluster.key_prefix
        self.lease_ms = round(cluster.lease_s * 1000)
        self.models = [m.name for m in config.models]
        self.last: Picture | None = None
        self.error: str | None = "not read yet"
        self._script: Any = None

    def attach(self, client: coredis.Redis[str] | None) -> None:
        """Read with ``client`` (None: the node stopped; a read fails)."""
        self._script = client.register_script(SCRIPT) if client is not None else None

    async def read(self) -> Picture:
        """The cluster now (kept as ``last``); raises ``RedisError``, ``OSError`` or
        ``TimeoutError`` when Redis cannot answer within ``CALL_TIMEOUT``."""
        try:
            if self._script is None:
                raise RedisError("not connected to Redis")
            with anyio.fail_after(CALL_TIMEOUT):
                reply = await self._script(keys=[], args=[self.prefix, len(self.models),
                                                          *self.models])
        except (RedisError, OSError, TimeoutError) as exc:
            self.error = f"Redis unreachable ({type(exc).__name__}: {exc})"
            raise
        self.error = None
        picture = self.last = self._picture(reply)
        return picture

    async def refresh(self) -> Picture | None:
        """The cluster now, or None if Redis does not answer (``last`` stays, and ``error``
        says why)."""
        try:
            return await self.read()
        except (RedisError, OSError, TimeoutError):
            return None

    def _picture(self, reply: list[Any]) -> Picture:
        now, holder, left, since, members, figures, servers = reply
        owner = None
        if holder:
            member, _, token = holder.rpartition(" ")
            owner = {"member": member, "token": int(token),
                     "since": int(since) / 1000 if since else None,
                     "lease_age_s": _seconds(self.lease_ms - max(0, int(left)))}
        listed = []
        for i in range(0, len(members), 3):
            record = json.loads(members[i + 1])
            age = now - (float(members[i + 2]) - self.lease_ms)
            listed.append({"id": members[i], "host": record.get("host"),
                           "pid": record.get("pid"), "started": record.get("started"),
                           "lease_age_s": _seconds(age)})
        listed.sort(key=lambda m: (m["started"] or 0, m["id"]))
        return Picture(
            time=now / 1000, members=listed, owner=owner,
            models={name: (int(figures[2 * i]), int(figures[2 * i + 1]))
                    for i, name in enumerate(self.models)},
            servers={servers[i]: json.loads(servers[i + 1]) for i in range(0, len(servers), 2)})


def _seconds(ms: float) -> float:
    return round(max(0.0, ms) / 1000, 3)
