"""``Membership``: the processes that share a ``[cluster]`` key prefix, each a member under a
lease, and the one configuration they all run.

A process joins before it serves: it registers (its id, host, pid, start time and the digest of
its shared configuration, ``kernel.config.shared``) under a lease of ``cluster.lease_s`` that
its heartbeat renews every ``cluster.heartbeat_s``. The first member of an empty prefix sets
the cluster's configuration (each shared key and its value, in JSON: secrets are masked); a
process whose configuration differs from the members' there is refused with one line naming the
first differing key (in sorted order) and both values, and does not start. Every step is one
call of ``members.lua``, which first drops the members whose lease ran out (a process killed,
or stopped, for longer than its lease).

Each beat reads the members: one that came since the last is told as ``member joined``, one
gone as ``member lost`` (to the log and ``on_event``), by every member. A beat that finds this
process no longer a member (Redis restarted, or the process was stopped past its lease) joins
again. While Redis cannot be reached the beat tries again every second.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import coredis
import structlog
from coredis.exceptions import RedisError

from kernel.config import Config, ConfigError, shared

log = structlog.get_logger("gateway.cluster")

SCRIPT = Path(__file__).with_name("members.lua").read_text()
# Seconds one call may take, and between tries while Redis cannot be reached.
CALL_TIMEOUT = 2.0
RETRY = 1.0

OnEvent = Callable[[str, dict[str, Any]], None]


async def refusal(config: Config) -> str | None:
    """Why this configuration may not join its cluster (another runs there), or None: asked
    before the server binds, so that the process stops with one line. Redis unreachable: None
    (the process starts, and joins once Redis answers)."""
    assert config.cluster.redis_url is not None
    membership = Membership(config, "check")
    # (Caught inside the client's block: coredis's task group would wrap them in a group.)
    async with coredis.Redis.from_url(config.cluster.redis_url, decode_responses=True) as client:
        membership.attach(client)
        try:
            await membership.join("check")
        except ConfigError as exc:
            return str(exc)
        except (RedisError, OSError, TimeoutError):
            pass
    return None


def digest(flat: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


class Membership:
    def __init__(self, config: Config, member_id: str, *,
                 on_event: OnEvent | None = None) -> None:
        cluster = config.cluster
        assert cluster.key_prefix is not None
        self.prefix = cluster.key_prefix
        self.id = member_id
        self.lease_ms = round(cluster.lease_s * 1000)
        self.heartbeat = cluster.heartbeat
        self.on_event = on_event
        self.config = shared(config)
        self.digest = digest(self.config)
        self.record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "started": round(time.time(), 3), "config": self.digest})
        # The members as of the last beat: id -> record (host, pid, started, config digest).
        self.members: dict[str, dict[str, Any]] = {}
        self._script: Any = None

    @asynccontextmanager
    async def running(self, client: coredis.Redis[str]) -> AsyncIterator[Membership]:
        """Join (``ConfigError`` if this configuration is not the cluster's), beat while the
        block runs, leave at its end."""
        self.attach(client)
        try:
            await self.join()
            await self.beat()
        except (RedisError, OSError, TimeoutError) as exc:
            # Started while Redis is away: the heartbeat joins once it answers.
            log.warning("cannot join the cluster yet: Redis unreachable", error=repr(exc))
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._beat_forever)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True), anyio.move_on_after(CALL_TIMEOUT):
                    with suppress(RedisError, OSError):
                        await self._call("leave", self.id)

    def attach(self, client: coredis.Redis[str]) -> None:
        """Use ``client`` (``running`` does; a test may join and beat by hand)."""
        self._script = client.register_script(SCRIPT)

    async def _call(self, op: str, *args: Any) -> list[Any]:
        with anyio.fail_after(CALL_TIMEOUT):
            return list(await self._script(keys=[], args=[self.prefix, op, *args]))

    async def join(self, op: str = "join") -> None:
        """Join, or with ``op="check"`` only check; ``ConfigError`` if this configuration is
        not the one of the members there."""
        pairs = [part for item in self.config.items() for part in item]
        reply = await self._call(op, self.id, self.record, self.lease_ms, self.digest, *pairs)
        if reply[0] == 0:
            key, theirs = reply[1], reply[2]
            raise ConfigError(
                f"{key} = {self.config.get(key, '(absent)')} here, but "
                f"{'(absent)' if theirs is None else theirs} in the cluster {self.prefix!r} "
                "that this process joins: every process of a cluster runs one configuration "
                "(its models and limits)")
        if op == "join":
            log.info("joined the cluster",
                     prefix=self.prefix, member=self.id, config=self.digest)

    async def beat(self) -> None:
        reply = await self._call("beat", self.id, self.lease_ms)
        if reply[0] == -1:
            log.warning("no longer a member of the cluster (Redis lost it, or this process was "
                        "stopped past its lease): joining again", member=self.id)
            await self.join()
            reply = await self._call("beat", self.id, self.lease_ms)
        now = {reply[i]: json.loads(reply[i + 1]) for i in range(1, len(reply), 2)}
        for member in now.keys() - self.members.keys():
            if member != self.id:
                self._event("member joined", member, now[member])
        for member in self.members.keys() - now.keys():
            if member != self.id:
                self._event("member lost", member, self.members[member])
        self.members = now

    def _event(self, what: str, member: str, record: dict[str, Any]) -> None:
        fields = {"member": member, "host": record.get("host"), "pid": record.get("pid")}
        log.info(what, **fields)
        if self.on_event is not None:
            self.on_event(what, fields)

    async def _beat_forever(self) -> None:
        failing = False
        while True:
            await anyio.sleep(min(self.heartbeat, RETRY) if failing else self.heartbeat)
            try:
                await self.beat()
            except (RedisError, OSError, TimeoutError) as exc:
                if not failing:
                    log.warning("cluster heartbeat failed", error=repr(exc))
                failing = True
            except ConfigError as exc:  # Redis came back with another configuration in it
                log.error("cannot join the cluster again", error=str(exc))
                failing = True
            else:
                failing = False
