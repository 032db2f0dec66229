"""Assembling the gateway: the layers in the order of the architecture, its lifespan, and its
graceful stop.

Outermost first: request context, then one of three surfaces. The open routes (``/health``,
``/ready``, ``/metrics``) answer anyone; ``/admin`` answers the operator's token
(``proxy.admin``); everything else is the clients' surface, behind their API keys when there are
keys: the model list, and the OpenAI paths of ``FORWARDED``, which go on through draining ->
admission -> queue depth -> per-model semaphores -> retry -> streaming passthrough -> backend
pool. No other path reaches a backend: vLLM's development endpoints (``/sleep``,
``/collective_rpc``, ``/v1/load_lora_adapter``, ...) are 404 here.

Everything that runs in the background (the pool, its reaper, the model servers) lives inside
``Gateway.running()``; the ASGI lifespan enters it, and an application that mounts the gateway
enters it from its own lifespan. ``wind_down()`` is the graceful stop that ``vllm-gateway
serve`` runs on SIGTERM before the server closes: stop admitting, let what is in flight finish
within ``gateway.shutdown_grace``, end the rest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import structlog

from backends.container import ContainerEngines
from backends.gpu import GpuMemory, probe_gpus
from backends.launcher import Launcher
from backends.pool import BackendPool, LauncherFactory
from backends.process import ProcessLauncher
from backends.static import StaticLauncher
from middleware.admission import Admission
from middleware.auth import ClientKeys
from middleware.concurrency import ModelConcurrencyLimit
from middleware.draining import Draining
from middleware.queue_depth import QueueDepthLimit
from middleware.request_context import RequestContext
from middleware.retry import RetryConnectFailures

from . import routes
from .admin import AdminApi
from .config import Config, ModelSettings
from .metrics import GatewayMetrics
from .passthrough import StreamingPassthrough
from .routes import EnginePings, method_not_allowed, no_route
from .types import ASGIApp, Receive, Scope, Send
from .upstream import Upstream

log = structlog.get_logger("gateway")

FORWARDED = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/v1/rerank", "/v1/score", "/tokenize", "/detokenize",
})
# Seconds the requests ended after the grace get to send their last words (an SSE error event
# to a client that reads slowly) before the server closes what is left.
END_TIMEOUT = 2.0


def launchers_for(engines: ContainerEngines) -> LauncherFactory:
    def launcher(model: ModelSettings) -> Launcher:
        if model.launcher == "process":
            return ProcessLauncher(model)
        if model.launcher == "static":
            return StaticLauncher(model)
        return engines.launcher(model)

    return launcher


class Gateway:
    """The ASGI application of one gateway."""

    def __init__(self, config: Config, *, launchers: LauncherFactory | None = None,
                 gpu: GpuMemory | None = None) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.gpu = gpu
        self.engines = ContainerEngines(config)
        self.engine_pings = EnginePings(self.engines)
        self.pool = BackendPool(config, launchers=launchers or launchers_for(self.engines),
                                gpu=gpu, on_ready=self._started)
        self.metrics.watch_pool(self.pool)
        self.upstream = Upstream(config)
        self.running_now = False
        passthrough = StreamingPassthrough(pool=self.pool, upstream=self.upstream,
                                           send_timeout=config.gateway.send_timeout)
        retry = RetryConnectFailures(passthrough, config=config, metrics=self.metrics)
        self.semaphores = ModelConcurrencyLimit(retry, config=config, metrics=self.metrics)
        self.queue = QueueDepthLimit(self.semaphores, config=config, metrics=self.metrics)
        self.admission = Admission(self.queue, config=config)
        self._draining = Draining(self.admission)
        self._clients: ASGIApp = self._client_routes
        if config.client_keys:
            self._clients = ClientKeys(self._client_routes, keys=config.client_keys)
        self.admin = AdminApi(self)
        self._app = RequestContext(self._route, metrics=self.metrics)

    def _started(self, model: str, seconds: float) -> None:
        self.metrics.start_duration(model).observe(seconds)

    @property
    def draining(self) -> bool:
        return self._draining.draining

    @property
    def in_flight(self) -> int:
        """Forwarded requests in the gateway now: queued, waiting for a start, or answering."""
        return self._draining.in_flight

    def drain(self) -> None:
        """Take no more requests (``/ready`` and new requests answer 503); for good."""
        if not self.draining:
            log.info("draining", in_flight=self.in_flight)
        self._draining.drain()

    def end_in_flight(self) -> None:
        """End the requests in flight now (a stream gets an SSE error event)."""
        self._draining.end_in_flight()

    async def wind_down(self) -> None:
        """Drain, let what is in flight finish within ``gateway.shutdown_grace``, end the rest."""
        self.drain()
        with anyio.move_on_after(self.config.gateway.shutdown_grace):
            await self._draining.until_idle()
        self.end_in_flight()
        with anyio.move_on_after(END_TIMEOUT):
            await self._draining.until_idle()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        if self.gpu is None:
            self.gpu = self.pool.gpu = probe_gpus(self.config.gateway.gpu_memory_mb)
        async with self.engines.running(), self.pool.running(), self.upstream.running():
            self.running_now = True
            try:
                yield self
            finally:
                self.running_now = False
                self.engines.begin_shutdown()

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
        handler = routes.OPEN_ROUTES.get(path)
        if handler is not None:
            await self._get(handler, scope, send)
        elif path == "/admin" or path.startswith("/admin/"):
            await self.admin(scope, receive, send)
        else:
            await self._clients(scope, receive, send)

    async def _client_routes(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path in FORWARDED:
            if scope["method"] != "POST":
                raise method_not_allowed(path, "POST")
            await self._draining(scope, receive, send)
            return
        handler = routes.CLIENT_ROUTES.get(path)
        if handler is None:
            raise no_route(path)
        await self._get(handler, scope, send)

    async def _get(self, handler: routes.Handler, scope: Scope, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            raise method_not_allowed(scope["path"], "GET, HEAD")
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
