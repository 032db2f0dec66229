"""Assembling the gateway: the layers in the order of the architecture, and its lifespan.

Outermost first: request context, then either one of the gateway's own routes or, for the
OpenAI paths that are forwarded, admission -> queue depth -> per-model semaphores -> retry ->
streaming passthrough -> backend pool. Everything that runs in the background (the pool, its
reaper, the model servers) lives inside ``Gateway.running()``; the ASGI lifespan enters it, and
an application that mounts the gateway enters it from its own lifespan.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from backends.gpu import GpuMemory, probe_gpus
from backends.pool import BackendPool, LauncherFactory
from backends.process import ProcessLauncher
from backends.static import StaticLauncher
from middleware.admission import Admission
from middleware.concurrency import ModelConcurrencyLimit
from middleware.queue_depth import QueueDepthLimit
from middleware.request_context import RequestContext
from middleware.retry import RetryConnectFailures

from . import routes
from .config import Config, ModelSettings
from .errors import GatewayError
from .metrics import GatewayMetrics
from .passthrough import StreamingPassthrough
from .types import Receive, Scope, Send
from .upstream import make_client

FORWARDED = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/v1/rerank", "/v1/score", "/tokenize", "/detokenize",
})


def default_launchers(model: ModelSettings) -> object:
    if model.launcher == "process":
        return ProcessLauncher(model)
    if model.launcher == "static":
        return StaticLauncher(model)
    raise NotImplementedError(f"launcher {model.launcher!r}")


class Gateway:
    """The ASGI application of one gateway."""

    def __init__(self, config: Config, *, launchers: LauncherFactory | None = None,
                 gpu: GpuMemory | None = None) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.gpu = gpu
        self.pool = BackendPool(config, launchers=launchers or default_launchers, gpu=gpu)
        self.client = make_client(config)
        self.running_now = False
        self.draining = False
        passthrough = StreamingPassthrough(pool=self.pool, client=self.client)
        retry = RetryConnectFailures(passthrough, config=config, metrics=self.metrics)
        self.semaphores = ModelConcurrencyLimit(retry, config=config, metrics=self.metrics)
        self.queue = QueueDepthLimit(self.semaphores, config=config, metrics=self.metrics)
        self._forward = Admission(self.queue, config=config)
        self._app = RequestContext(self._route, metrics=self.metrics)

    def is_ready(self) -> bool:
        return self.running_now and not self.draining

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        if self.gpu is None:
            self.gpu = self.pool.gpu = probe_gpus(self.config.gateway.gpu_memory_mb)
        try:
            async with self.pool.running():
                self.running_now = True
                try:
                    yield self
                finally:
                    self.running_now = False
        finally:
            with anyio.CancelScope(shield=True):
                await self.client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self._app(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
            scope = {**scope, "path": path}
        method = scope["method"]
        if path in FORWARDED:
            if method != "POST":
                raise GatewayError(405, f"{path} accepts POST only.",
                                   type="invalid_request_error", code="method_not_allowed")
            await self._forward(scope, receive, send)
            return
        handler = routes.GET_ROUTES.get(path)
        if handler is None:
            raise GatewayError(404, f"No route {path}.", type="invalid_request_error",
                               code="not_found")
        if method not in ("GET", "HEAD"):
            raise GatewayError(405, f"{path} accepts GET only.", type="invalid_request_error",
                               code="method_not_allowed")
        await handler(self, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()
        started = False
        try:
            async with self.running():
                await send({"type": "lifespan.startup.complete"})
                started = True
                await receive()
        except Exception as exc:
            if started:
                raise
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})


def build_app(config: Config) -> Gateway:
    return Gateway(config)
