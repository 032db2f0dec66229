"""A container engine's API where aiodocker has no public method: its ping.

Everything else the gateway asks Docker or Podman goes through aiodocker's public API
(backends/container.py). aiodocker (0.27) has no ``GET /_ping``, and its ``version()`` takes a
second on Podman 4, too slow for a readiness probe; this module owns the one raw call. It goes
through the client's public ``session`` and ``docker_host``, so it shares the client's socket,
connection pool and TLS, and it is unversioned: a versioned path would first ask ``/version``
for the API version.
"""

from __future__ import annotations

import aiodocker
import aiohttp


async def ping(docker: aiodocker.Docker) -> bool:
    """Whether the engine answers ``GET /_ping`` with a success status. Unbounded in time (the
    client's own timeout aside): the caller bounds it."""
    try:
        async with docker.session.get(f"{docker.docker_host}/_ping") as response:
            return response.ok
    except (aiohttp.ClientError, OSError):
        return False
