"""``LuaScript``: a Lua script called by EVALSHA straight on one connection of a coredis client,
for the calls on a request's path (the accounting's join and leave, the ledger's record).

coredis' command layer (``Redis.evalsha`` or a registered ``Script``: a command object, its
retry policy and telemetry span, a connection taken from the pool and given back) costs more
gateway CPU than the round trip itself; so the script's calls go to
``BaseConnection.create_request`` of one connection that this script leases from the client's
pool and keeps. Concurrent calls are multiplexed on it (coredis writes what is queued in one
send and answers the requests in order); a connection that broke is left to the pool and a new
one is leased at the next call. A Redis that lost the script (it restarted) is sent it again.
"""

from __future__ import annotations

import hashlib
from typing import Any

import coredis
from coredis.connection import BaseConnection
from coredis.exceptions import NoScriptError


class LuaScript:
    def __init__(self, client: coredis.Redis[str], source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self._pool = client.connection_pool
        self._connection: BaseConnection | None = None

    async def __call__(self, *args: Any) -> Any:
        """The script's reply to ``args`` (its ARGV; no keys); coredis' errors as they come."""
        connection = self._connection
        if connection is None or not connection.usable:
            connection = await self._lease()
        try:
            return await connection.create_request(b"EVALSHA", self.sha, 0, *args)
        except NoScriptError:
            await connection.create_request(b"SCRIPT LOAD", self.source)
            return await connection.create_request(b"EVALSHA", self.sha, 0, *args)

    async def _lease(self) -> BaseConnection:
        connection = await self._pool.get_connection()
        kept = self._connection
        if kept is not None and kept.usable:  # another call leased one meanwhile
            self._pool.release(connection)
            return kept
        self._connection = connection
        return connection
