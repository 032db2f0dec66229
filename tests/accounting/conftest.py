"""The implementations of ``kernel.accounting.Accounting`` that the contract tests run against.

Each is a factory: given a config, an async context manager that yields a fresh accounting of
it (a shared-state implementation sets up and clears its store there). Add one to
``IMPLEMENTATIONS`` and every contract test and the property test run against it as well
(``CONTRACT``: the contract tests also run on Redis with the tenants' script).
``settle(accounting)`` returns once every task waits and, for a shared store, its answers and
wake-ups have arrived.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
import pytest

from kernel.accounting import Accounting, InMemoryAccounting
from kernel.config import ClusterSettings, Config, TenantSettings
from kernel.fair_accounting import in_memory_accounting
from tests.middleware import asgi
from tests.support import redis_server

OpenAccounting = Callable[[Config], AbstractAsyncContextManager[Accounting]]


@asynccontextmanager
async def in_memory(config: Config) -> AsyncIterator[Accounting]:
    yield in_memory_accounting(config)


# The redis-server of the session, started on first use (``redis_url``).
_redis: dict[str, str] = {}


@asynccontextmanager
async def in_redis(config: Config) -> AsyncIterator[Accounting]:
    from cluster.fair_accounting import redis_accounting

    # A fresh key prefix each time: nothing left by another test is seen.
    cluster = ClusterSettings(redis_url=_redis["url"], key_prefix=secrets.token_hex(6),
                              enabled=True, heartbeat=3.0)
    accounting = redis_accounting(dataclasses.replace(config, cluster=cluster))
    async with accounting.running():
        yield accounting


@asynccontextmanager
async def in_redis_fair(config: Config) -> AsyncIterator[Accounting]:
    """Redis with the tenants' script (``FairRedisAccounting``): a second tenant is configured,
    and every request is the default tenant's, whose line is the contract's FIFO."""
    other = TenantSettings(name="other")
    async with in_redis(dataclasses.replace(config, tenants=(*config.tenants, other))) as fair:
        yield fair


IMPLEMENTATIONS: dict[str, OpenAccounting] = {"in-memory": in_memory, "redis": in_redis}
# The contract tests (not the slower property test) run on the tenants' script as well.
CONTRACT: dict[str, OpenAccounting] = {**IMPLEMENTATIONS, "redis-fair": in_redis_fair}


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def opened(request: pytest.FixtureRequest) -> OpenAccounting:
    """The implementation a parametrized ``open_accounting`` names."""
    if request.param.startswith("redis"):
        _redis["url"] = request.getfixturevalue("redis_url")
    return CONTRACT[request.param]


# Session-scoped (it holds no state), so that the property test's examples may share it.
@pytest.fixture(scope="session", params=sorted(IMPLEMENTATIONS))
def open_accounting(request: pytest.FixtureRequest) -> OpenAccounting:
    return opened(request)


async def settle(accounting: Accounting) -> None:
    await asgi.settle()
    if isinstance(accounting, InMemoryAccounting):
        return
    # Its calls and wake-ups travel through a socket, which settle() counts as waiting: wait
    # for every answer, then for the wake-ups those sent.
    for _ in range(2):
        while accounting.pending:  # type: ignore[attr-defined]
            await anyio.sleep(0.002)
            await asgi.settle()
        await anyio.sleep(0.01)
        await asgi.settle()
