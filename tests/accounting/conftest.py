"""The implementations of ``kernel.accounting.Accounting`` that the contract tests run against.

Each is a factory: given a config, an async context manager that yields a fresh accounting of
it (a shared-state implementation sets up and clears its store there). Add one to
``IMPLEMENTATIONS`` and every contract test and the property test run against it as well.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest

from kernel.accounting import Accounting, InMemoryAccounting
from kernel.config import Config

OpenAccounting = Callable[[Config], AbstractAsyncContextManager[Accounting]]


@asynccontextmanager
async def in_memory(config: Config) -> AsyncIterator[Accounting]:
    yield InMemoryAccounting(config)


IMPLEMENTATIONS: dict[str, OpenAccounting] = {"in-memory": in_memory}


# Session-scoped (it holds no state), so that the property test's examples may share it.
@pytest.fixture(scope="session", params=sorted(IMPLEMENTATIONS))
def open_accounting(request: pytest.FixtureRequest) -> OpenAccounting:
    return IMPLEMENTATIONS[request.param]
