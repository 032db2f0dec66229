"""The one HTTP client that talks to backends, sized from the validated configuration.

Connections: ``max_concurrent * max_models_concurrent`` (every loaded model at full
concurrency), and as many kept alive, so a fully loaded gateway never closes a connection it
will need again (the predecessor kept fewer alive than it opened); an idle one is closed after
``upstream.keepalive_expiry``, before the backend closes it. No total timeout: the read
timeout bounds the wait for each byte, so a long generation that keeps streaming is never cut.

Two transports behind one interface, picked by the event loop the gateway runs on: aiohttp on
asyncio (about twice as fast per request as httpx2 on one core, see ``benchmarks/``) and httpx2
on trio. Both raise the same four failures from ``open``, and the library's own errors while the
body is read (``Upstream.broken``, so relaying a chunk costs no translation).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, nullcontext
from typing import Protocol

import aiohttp
import anyio
import httpx2
import sniffio
from yarl import URL

from kernel.config import Config

# Headers aiohttp would add on its own; the backend gets the client's, not ours.
AIOHTTP_OWN_HEADERS = ("Accept", "Accept-Encoding", "User-Agent")
AIOHTTP_WRITE_BUFFER = 2**16  # aiohttp.http_writer.LIMIT: larger writes wait for the socket


class ConnectFailed(Exception):
    """The backend could not be connected to: the request never reached it."""


class PoolExhausted(Exception):
    """No connection to the backends became free within ``upstream.pool_timeout``."""


class NoFirstByte(Exception):
    """The backend sent nothing within ``upstream.timeout``."""


class Broken(Exception):
    """The exchange failed after the request may have reached the backend."""


class Answer(Protocol):
    status: int
    headers: Sequence[tuple[bytes, bytes]]

    def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (transfer coding removed, content coding kept)."""

    def at_eof(self) -> bool:
        """Whether the body has been read to its end (False where the library cannot tell
        before its iterator ends)."""

    async def aclose(self) -> None:
        """Give the connection back, or close it (aborting the answer) if not read to the end;
        completes even when the caller is being cancelled."""


class Transport(Protocol):
    broken: tuple[type[BaseException], ...]

    async def open(self, method: str, url: str, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> Answer: ...

    async def aclose(self) -> None: ...


class _AiohttpAnswer:
    __slots__ = ("_release", "_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse, release: Callable[[], None]) -> None:
        self._response = response
        self._release = release
        self.status = response.status
        self.headers = response.raw_headers

    def chunks(self) -> AsyncIterator[bytes]:
        return self._response.content.iter_any()

    def at_eof(self) -> bool:
        return self._response.content.is_eof()

    async def aclose(self) -> None:
        # Never suspends, so a cancellation cannot cut it short (no shield needed).
        if self._release is not None:
            self._response.release()
            self._release()
            self._release = None


class AiohttpTransport:
    """aiohttp on asyncio. The pool is bounded here, by a semaphore, so that waiting for a free
    connection (503, no retry) is told apart from failing to connect (retried)."""

    broken = (aiohttp.ClientError, TimeoutError)

    def __init__(self, config: Config) -> None:
        up = config.upstream
        self._slots = anyio.Semaphore(config.upstream_pool_size)
        self._pool_timeout = up.pool_timeout
        self._open_timeout = up.write_timeout + up.timeout
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=up.keepalive_expiry),
            timeout=aiohttp.ClientTimeout(sock_connect=up.connect_timeout, sock_read=up.timeout),
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False, trust_env=False,
            skip_auto_headers=AIOHTTP_OWN_HEADERS)

    async def open(self, method: str, url: str, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> Answer:
        try:
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            try:
                with anyio.fail_after(self._pool_timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise PoolExhausted from None
        # aiohttp has no write timeout, and its read timer starts once the body is written. A
        # body that fits aiohttp's write buffer is handed to the socket without waiting; a larger
        # one can stall on a backend that does not read, so its send and the wait for the first
        # byte are bounded together.
        deadline = (anyio.fail_after(self._open_timeout) if len(body) > AIOHTTP_WRITE_BUFFER
                    else nullcontext())
        try:
            with deadline:
                response = await self._session.request(
                    method, URL(url, encoded=True), data=body, allow_redirects=False,
                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers])
        except BaseException as exc:
            self._slots.release()
            failure = _failure(exc)
            if failure is exc:
                raise
            raise failure from exc
        return _AiohttpAnswer(response, self._slots.release)

    async def aclose(self) -> None:
        await self._session.close()


def _failure(exc: BaseException) -> BaseException:
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return ConnectFailed(repr(exc))
    if isinstance(exc, (aiohttp.SocketTimeoutError, TimeoutError)):
        return NoFirstByte(repr(exc))
    if isinstance(exc, aiohttp.ClientError):
        return Broken(repr(exc))
    return exc


class _HttpxAnswer:
    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: httpx2.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = response.headers.raw

    def chunks(self) -> AsyncIterator[bytes]:
        return self._response.aiter_raw()

    def at_eof(self) -> bool:
        return False

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._response.aclose()


class HttpxTransport:
    """httpx2, on trio (aiohttp runs on asyncio only)."""

    broken = (httpx2.TransportError,)

    def __init__(self, config: Config) -> None:
        up = config.upstream
        self._client = httpx2.AsyncClient(
            limits=httpx2.Limits(max_connections=config.upstream_pool_size,
                                 max_keepalive_connections=config.upstream_keepalive_size,
                                 keepalive_expiry=up.keepalive_expiry),
            timeout=httpx2.Timeout(connect=up.connect_timeout, read=up.timeout,
                                   write=up.write_timeout, pool=up.pool_timeout),
            trust_env=False, follow_redirects=False)

    async def open(self, method: str, url: str, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> Answer:
        request = self._client.build_request(method, url, headers=headers, content=body)
        try:
            return _HttpxAnswer(await self._client.send(request, stream=True))
        except (httpx2.ConnectError, httpx2.ConnectTimeout) as exc:
            raise ConnectFailed(repr(exc)) from exc
        except httpx2.PoolTimeout as exc:
            raise PoolExhausted from exc
        except (httpx2.ReadTimeout, httpx2.WriteTimeout) as exc:
            raise NoFirstByte(repr(exc)) from exc
        except httpx2.TransportError as exc:
            raise Broken(repr(exc)) from exc

    async def aclose(self) -> None:
        await self._client.aclose()


class Upstream:
    """The gateway's client to its backends; usable inside ``running()``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._transport: Transport | None = None

    @property
    def broken(self) -> tuple[type[BaseException], ...]:
        assert self._transport is not None
        return self._transport.broken

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Upstream]:
        if sniffio.current_async_library() == "asyncio":
            self._transport = AiohttpTransport(self.config)
        else:
            self._transport = HttpxTransport(self.config)
        try:
            yield self
        finally:
            with anyio.CancelScope(shield=True):
                await self._transport.aclose()
            self._transport = None

    async def open(self, method: str, url: str, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> Answer:
        if self._transport is None:
            raise RuntimeError("the upstream client is used outside Upstream.running()")
        return await self._transport.open(method, url, headers, body)
