"""The streaming passthrough: lease a ready backend, forward the request, relay the answer.

A request for a LoRA adapter is forwarded once its server holds the adapter: the lease prefers
a replica that does, and ``pool.adapters.using`` loads it there first if it must and keeps it
loaded until the answer is relayed.

Raw bytes are relayed chunk by chunk as they arrive (no decoding, no buffering); hop-by-hop
headers, and those a ``Connection`` header names, are dropped both ways. ``Expect`` is the
gateway's to answer (hypercorn sends the 100), not the backend's: a backend that never sends 100
would leave the request waiting for it. The client's ``X-Forwarded-*`` and ``Forwarded`` never
reach a backend as written (vLLM's uvicorn believes them from 127.0.0.1): the backend gets the
client's address and scheme as the gateway knows them (after its own trusted proxies). The
upstream response is closed in a ``finally`` owned here, so a client that goes away cancels the
generation at the backend at once (a ``background=`` cleanup would not run on a disconnect).

Failure semantics, each seen by the client as it says:
- the backend cannot be connected to: ``UpstreamConnectError`` (the retry layer may try again,
  since the request never reached the backend);
- the gateway's connection pool is exhausted: 503 at once, no retry;
- no first byte within ``upstream.timeout``: 504;
- the connection fails after the request was sent: 502, not retried (the backend may have
  acted on it);
- the backend dies after the answer started: an SSE stream gets an error event and then ends;
  a plain body is cut off by closing the connection, so it cannot pass for a whole answer;
- the client stops reading: once one send has waited ``gateway.send_timeout``, the request ends
  as a disconnect does (the upstream response is closed, the backend aborts the generation).
"""

from __future__ import annotations

import structlog

from backends.pool import Ask, Backend, BackendPool
from kernel.context import STATE, RequestState
from kernel.errors import GatewayError
from kernel.types import SSE, Message, Receive, Scope, Send, header

from .disconnect import ClientWatch, SendWatch, SendWatches, cancellable
from .upstream import Answer, Broken, ConnectFailed, NoFirstByte, PoolExhausted, Upstream

log = structlog.get_logger("gateway.proxy")

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade",
})
# The request id is ours to set both ways; the length is the client library's to compute.
REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"x-request-id", b"expect", b"forwarded"}
FORWARDED_PREFIX = b"x-forwarded-"
RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server", b"x-request-id"}


def _named_by(connection: bytes) -> frozenset[bytes]:
    """The header names a ``Connection`` header lists: hop-by-hop for this connection only."""
    return frozenset(token.strip().lower() for token in connection.split(b","))


class UpstreamConnectError(GatewayError):
    """The request never reached the backend; safe to try again."""

    def __init__(self, model: str) -> None:
        super().__init__(502, f"The backend of model '{model}' could not be reached.",
                         type="upstream_error", code="upstream_unavailable")


class UpstreamCutOff(Exception):
    """The backend stopped in the middle of a plain (non-SSE) answer."""


class StreamingPassthrough:
    def __init__(self, *, pool: BackendPool, upstream: Upstream, send_timeout: float) -> None:
        self.pool = pool
        self.upstream = upstream
        self.set_send_timeout(send_timeout)

    def set_send_timeout(self, send_timeout: float) -> None:
        """In force for the answers that begin from now on (a reload's)."""
        self.send_timeout = send_timeout
        self.sends = SendWatches(send_timeout)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The client is watched from the first wait on: a cold start and a backend that is slow
        # to answer are waits it may leave, and its leaving cancels them at once; so is a send
        # to a client that does not read.
        watch = ClientWatch(receive)
        sends = self.sends.new()
        await watch.run(lambda: self._forward(scope, cancellable(send), sends), sends)
        if watch.stalled:
            state: RequestState = scope[STATE]
            log.warning("client stopped reading; request ended", model=state.model.name,
                        send_timeout_s=self.send_timeout)
            state.error = "send_timeout"

    async def _forward(self, scope: Scope, send: Send, sends: SendWatch) -> None:
        state: RequestState = scope[STATE]
        model = state.model
        pin = state.pin
        adapter = state.adapter
        if model.max_replicas == 1 and pin is None:
            ask = None
            lease = self.pool.lease(model.name)
        else:
            ask = Ask(state.session, state.prefix, state.failed_replica, adapter)
            lease = self.pool.lease(model.name, ask, pin=pin)
        async with lease as backend:
            state.server = (backend.replica, backend.starts)  # for a stored response
            if model.max_replicas > 1:
                state.replica = backend.replica
                if ask is not None and ask.why:  # not a pinned one: no choice was made
                    state.route = ask.why
            if adapter is None:
                await self._exchange(scope, send, sends, state, backend)
            else:
                # Loaded on this server first if it is not, and kept there meanwhile.
                async with self.pool.adapters.using(backend, adapter, state):
                    await self._exchange(scope, send, sends, state, backend)

    async def _exchange(self, scope: Scope, send: Send, sends: SendWatch, state: RequestState,
                        backend: Backend) -> None:
        """Forward the request to the server and relay its answer."""
        model = backend.name
        try:
            answer = await self._open(scope, state, backend.address, model)
        except UpstreamConnectError:
            # A try again (the retry layer) goes to another replica where one is ready.
            state.failed_replica = backend.replica
            raise
        try:
            await self._relay(answer, send, sends, model)
        finally:
            await answer.aclose()

    async def _open(self, scope: Scope, state: RequestState, address: str,
                    model: str) -> Answer:
        named = header(scope, b"connection")
        drop = REQUEST_DROP | _named_by(named) if named else REQUEST_DROP
        headers = [(k, v) for k, v in scope["headers"]
                   if k not in drop and not k.startswith(FORWARDED_PREFIX)]
        client = scope.get("client")
        if client:
            headers.append((b"x-forwarded-for", client[0].encode("latin-1")))
        headers.append((b"x-forwarded-proto", scope["scheme"].encode("latin-1")))
        if state.request_id is not None:
            headers.append((b"x-request-id", state.request_id.encode()))
        url = address + scope["path"]
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        try:
            return await self.upstream.open(scope["method"], url, headers, state.body_bytes)
        except ConnectFailed as exc:
            log.warning("upstream connect failed", model=model, address=address, error=str(exc))
            raise UpstreamConnectError(model) from exc
        except PoolExhausted:
            log.warning("upstream connection pool exhausted", model=model)
            raise GatewayError(503, "The gateway has no free connection to the backends.",
                               type="service_unavailable_error", code="upstream_pool_exhausted",
                               retry_after=1) from None
        except NoFirstByte:
            log.warning("upstream sent nothing in time", model=model, address=address)
            raise GatewayError(504, f"The backend of model '{model}' did not answer in time.",
                               type="timeout_error", code="upstream_timeout") from None
        except Broken as exc:
            log.warning("upstream failed after the request was sent", model=model,
                        address=address, error=str(exc))
            raise GatewayError(502, f"The backend of model '{model}' failed to answer.",
                               type="upstream_error", code="upstream_failed",
                               should_retry=False) from None

    async def _relay(self, answer: Answer, send: Send, sends: SendWatch, model: str) -> None:
        async def watched(message: Message) -> None:
            sends.begun += 1
            await send(message)
            sends.done += 1

        headers = []
        sse = False
        named = None
        for key, value in answer.headers:
            name = key.lower()
            if name not in RESPONSE_DROP:
                headers.append((key, value))
                if name == b"content-type":
                    sse = value.startswith(SSE)
            elif name == b"connection":
                named = _named_by(value)
        if named:
            headers = [(k, v) for k, v in headers if k.lower() not in named]
        if sse:
            headers.append((b"x-accel-buffering", b"no"))
        try:
            await watched({"type": "http.response.start", "status": answer.status,
                           "headers": headers})
            try:
                async for chunk in answer.chunks():
                    # The last chunk says so itself: one message fewer through every layer and
                    # the server (a plain answer usually comes in one chunk).
                    if answer.at_eof():
                        await watched({"type": "http.response.body", "body": chunk,
                                       "more_body": False})
                        return
                    # The send watch, counted inline: this is the per-chunk path.
                    sends.begun += 1
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    sends.done += 1
            except self.upstream.broken as exc:
                log.warning("upstream failed mid-answer", model=model, error=repr(exc))
                if not sse:
                    raise UpstreamCutOff(model) from exc
                await watched(GatewayError(
                    502, f"The backend of model '{model}' failed during the answer.",
                    type="upstream_error", code="upstream_failed").sse_message())
                return
            await watched({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            # Newer servers raise on a send after the client left; older ones drop it silently
            # and the disconnect is seen by ClientWatch instead. Either way: stop relaying.
            return
