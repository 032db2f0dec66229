"""``RedisLedger``: the ``kernel.ratelimits.Ledger`` of every gateway process that shares a Redis
and a key prefix (``[cluster]``), so that a tenant's limits and usage hold across them.

Each call is one EVALSHA of ``ratelimits.lua``: ``admit`` reads a tenant's two windows, and
counts the request unless one is spent, in one step, so that requests arriving at once in
several processes cannot all take the window's last place; ``record`` adds a request's tokens
and usage. The windows are hashes of (second -> use) stamped with the Redis server's clock
(``TIME``), so the processes' clocks and their skew do not matter; each expires a minute after
its last use. Usage is a hash per tenant (model and figure -> sum), which only grows with the
configured models. While Redis cannot be reached ``admit`` raises ``GatewayError`` 503
``state_unavailable`` (a limit is never skipped), and ``record`` raises it too (the tenants
layer logs it: the answer has gone out).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import coredis
from coredis.exceptions import RedisError

from kernel.config import Config, TenantSettings
from kernel.errors import GatewayError, unavailable
from kernel.ratelimits import USAGE_FIELDS, Spent, Verdict, Window, window_figures

from .script import LuaScript

SCRIPT = Path(__file__).with_name("ratelimits.lua").read_text()
# Seconds one call may take.
CALL_TIMEOUT = 2.0


def _window(flat: list[Any], now: float, limit: int | None) -> Window | None:
    if not limit:
        return None
    steps = zip(flat[::2], flat[1::2], strict=True)
    used, reset, retry = window_figures(((int(s), int(n)) for s, n in steps), now, limit)
    return Window(limit, used, reset, retry)


class RedisLedger:
    """The ledger kept in Redis; ``running()`` connects."""

    def __init__(self, config: Config) -> None:
        assert config.cluster.redis_url is not None and config.cluster.key_prefix is not None
        self.url = config.cluster.redis_url
        self.prefix = config.cluster.key_prefix
        self.in_flight: Counter[str] = Counter()
        self._script: LuaScript | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RedisLedger]:
        client: coredis.Redis[str] = coredis.Redis.from_url(self.url, decode_responses=True)
        async with client:
            self._script = LuaScript(client, SCRIPT)
            try:
                yield self
            finally:
                self._script = None

    async def _call(self, op: str, *args: Any) -> Any:
        if self._script is None:
            raise _unavailable("not connected to Redis yet")
        try:
            with anyio.fail_after(CALL_TIMEOUT):
                return await self._script(self.prefix, op, *args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise _unavailable(f"Redis unreachable ({type(exc).__name__}: {exc})") from exc

    async def admit(self, tenant: TenantSettings) -> Verdict:
        admitted, now_ms, requests, tokens = await self._call(
            "admit", tenant.name, tenant.rpm_limit or 0, tenant.tpm_limit or 0)
        now = int(now_ms) / 1000
        return Verdict(_window(requests, now, tenant.rpm_limit),
                       _window(tokens, now, tenant.tpm_limit), admitted=bool(int(admitted)))

    async def record(self, spent: Spent) -> None:
        await self._call("record", spent.tenant, spent.model, int(spent.count_request),
                         spent.prompt_tokens, spent.completion_tokens, int(spent.error),
                         round(spent.queue_wait_s * 1000))

    async def report(self, tenants: Iterable[str]) -> dict[str, dict[str, Any]]:
        names = list(tenants)
        report = {}
        for name, (requests, tokens, flat) in zip(names, await self._call("report", *names),
                                                  strict=True):
            usage: dict[str, dict[str, float]] = {}
            for field, value in zip(flat[::2], flat[1::2], strict=True):
                model, _, figure = field.rpartition("\t")
                figures = usage.setdefault(model, dict.fromkeys(USAGE_FIELDS, 0))
                if figure == "queue_wait_ms":
                    figures["queue_wait_s"] = int(value) / 1000
                else:
                    figures[figure] = int(value)
            report[name] = {"requests": int(requests), "tokens": int(tokens), "usage": usage}
        return report


def _unavailable(why: str) -> GatewayError:
    return unavailable(f"The gateway's shared state is unavailable: {why}.",
                       code="state_unavailable", retry_after=1.0)
