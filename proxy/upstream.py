"""The one HTTP client that talks to backends, sized from the validated configuration.

Connections: ``max_concurrent * max_models_concurrent`` (every loaded model at full
concurrency), and as many kept alive, so a fully loaded gateway never closes a connection it
will need again (the predecessor kept fewer alive than it opened). No total timeout: the read
timeout bounds the wait for each byte, so a long generation that keeps streaming is never cut.
The client library stays behind this module so its transport can change.
"""

from __future__ import annotations

import httpx2

from .config import Config

KEEPALIVE_EXPIRY = 60.0

ConnectFailure = (httpx2.ConnectError, httpx2.ConnectTimeout)
PoolExhausted = httpx2.PoolTimeout
NoFirstByte = httpx2.ReadTimeout
TransportError = httpx2.TransportError
Response = httpx2.Response
Client = httpx2.AsyncClient


def limits_of(config: Config) -> httpx2.Limits:
    return httpx2.Limits(max_connections=config.upstream_pool_size,
                         max_keepalive_connections=config.upstream_keepalive_size,
                         keepalive_expiry=KEEPALIVE_EXPIRY)


def timeout_of(config: Config) -> httpx2.Timeout:
    up = config.upstream
    return httpx2.Timeout(connect=up.connect_timeout, read=up.timeout, write=up.write_timeout,
                          pool=up.pool_timeout)


def make_client(config: Config) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(limits=limits_of(config), timeout=timeout_of(config),
                              trust_env=False, follow_redirects=False)
