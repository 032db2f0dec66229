"""Health checks of a running server: one check, the wait for the first pass, the watch.

Owns what counts as healthy: a 200 from the server's ``health_path`` within
``HEALTH_TIMEOUT``. During a start, checks every ``HEALTH_INTERVAL`` until one passes (a static
server that refuses connections is not waited for: nothing listens there). Once ready, a check
every ``health_interval``; ``health_failures`` failures in a row end the run of a process or
container server; a static one is marked down instead, and up again at the next pass.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import httpx2

from .launcher import LaunchError
from .server import Backend
from .states import ModelState

HEALTH_INTERVAL = 0.05
HEALTH_TIMEOUT = 2.0
REFUSED = "it refuses connections"


class Health:
    def __init__(self) -> None:
        self.client: httpx2.AsyncClient | None = None

    async def check(self, backend: Backend) -> str | None:
        """One health check of the running server: None if it passed, else what was wrong
        (no address: that is for the log and the admin, the client gets the model's name)."""
        assert self.client is not None and backend.address is not None
        try:
            response = await self.client.get(backend.address + backend.settings.health_path)
        except httpx2.TimeoutException:
            return f"no answer to its health check within {HEALTH_TIMEOUT:g} s"
        except httpx2.ConnectError:
            return REFUSED
        except httpx2.TransportError as exc:
            return f"its health check failed ({type(exc).__name__})"
        if response.status_code != 200:
            return f"its health check answered {response.status_code}"
        return None

    async def until_healthy(self, backend: Backend) -> str | None:
        """Until the server passes a check; a static one that refuses connections (nothing
        listens there) is not waited for: that is returned."""
        while backend.launcher.is_alive():
            problem = await self.check(backend)
            if problem is None or (backend.static and problem == REFUSED):
                return problem
            await anyio.sleep(HEALTH_INTERVAL)
        raise LaunchError(f"{await backend.launcher.wait_exit()} during start-up")

    async def watch(self, backend: Backend, down: Callable[[str], None],
                    up: Callable[[], None]) -> str:
        """Check the server every ``health_interval``; return the last problem once
        ``health_failures`` checks in a row failed. A static server is not ended: ``down``
        marks it, ``up`` again when a check passes."""
        settings = backend.settings
        failed = 0
        while True:
            await anyio.sleep(settings.health_interval)
            problem = await self.check(backend)
            if problem is None:
                failed = 0
                if backend.state is ModelState.FAILED:
                    up()
                continue
            failed += 1
            if failed < settings.health_failures:
                continue
            if not backend.static:
                return problem
            if backend.state is ModelState.READY:
                down(problem)


async def output_tail(backend: Backend) -> str:
    """The server's last lines for the log; never fails, never hangs the stop."""
    with anyio.move_on_after(HEALTH_TIMEOUT):
        try:
            return await backend.launcher.output_tail()
        except Exception as exc:
            return f"(no output: {exc!r})"
    return "(no output: the launcher did not give it in time)"
