"""Assembling the gateway: the layers in the order of the architecture, its lifespan, and its
graceful stop.

Outermost first: request context, then one of three surfaces. The open routes (``/health``,
``/ready``, ``/metrics``) answer anyone; ``/admin`` answers the operator's token
(``proxy.admin``); everything else is the clients' surface, behind their API keys when there are
keys: the model list and each model's entry, the paths of ``FORWARDED`` (POST) and of the
stored responses (``GET /v1/responses/{id}``, ``POST /v1/responses/{id}/cancel``), which go on
through draining -> admission -> tenants (with client keys or ``[[tenants]]``) -> loading
feedback (streams) -> queue depth -> per-model semaphores -> retry -> streaming passthrough ->
backend pool. The Anthropic paths (``proxy.anthropic.PATHS``) are among them, with their errors
in Anthropic's shape. No other
path reaches a backend: vLLM's development, render and management endpoints (``/sleep``,
``/collective_rpc``, ``/v1/load_lora_adapter``, ...) are 404 here.

With tracing on (``[telemetry]`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``middleware.tracing``),
the request's span wraps it all, the spans of the waits sit inside the semaphores, and the
passthrough's upstream client makes a span per call; off, none of them is in the stack.

Everything that runs in the background (the pool, its reaper, the model servers) lives inside
``Gateway.running()``; the ASGI lifespan enters it, and an application that mounts the gateway
enters it from its own lifespan. ``wind_down()`` is the graceful stop that ``vllm-gateway
serve`` runs on SIGTERM before the server closes: stop admitting, let what is in flight finish
within ``gateway.shutdown_grace``, end the rest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext
from functools import partial
from typing import TYPE_CHECKING

import anyio
import structlog

from backends.container import ContainerEngines
from backends.gpu import GpuMemory, probe_gpus
from backends.launcher import Launcher
from backends.pool import BackendPool, LauncherFactory, ModelState
from backends.pool_metrics import PoolMetrics
from backends.process import STOP_TIMEOUT, ProcessLauncher
from backends.static import StaticLauncher
from kernel.accounting import Accounting
from kernel.config import Config, ModelSettings, ReloadPlan
from kernel.context import STATE
from kernel.fair_accounting import in_memory_accounting
from kernel.ratelimits import InMemoryLedger, Ledger
from kernel.types import ASGIApp, Receive, Scope, Send
from middleware.admission import Admission, BodyBudget
from middleware.auth import ClientKeys
from middleware.concurrency import ModelConcurrencyLimit
from middleware.draining import Draining
from middleware.feedback import StreamFeedback
from middleware.queue_depth import QueueDepthLimit
from middleware.request_context import RequestContext
from middleware.response_ids import CREATE_PATH, RememberResponseIds, ResponseIds, stored_response
from middleware.retry import RetryConnectFailures
from middleware.tenants import Tenants
from relay.passthrough import StreamingPassthrough
from relay.upstream import Upstream
from telemetry.events import EventHub
from telemetry.metrics import GatewayMetrics

from . import anthropic, routes
from .admin import AdminApi
from .reload import Reloads
from .routes import EnginePings, method_not_allowed, no_route

if TYPE_CHECKING:
    from backends.shared import SharedPool
    from cluster.accounting import RedisAccounting
    from cluster.node import ClusterNode
    from cluster.ratelimits import RedisLedger
    from middleware.tracing import GatewayTracing

log = structlog.get_logger("gateway")

FORWARDED = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/v1/rerank", "/v1/score", "/tokenize", "/detokenize", "/pooling", "/classify",
    "/v1/audio/transcriptions", "/v1/audio/translations", *anthropic.PATHS,
})
# Seconds the requests ended after the grace get to send their last words (an SSE error event
# to a client that reads slowly) before the server closes what is left.
END_TIMEOUT = 2.0
# Seconds on top of the slowest stop that the server gives the shutdown of the lifespan.
STOP_MARGIN = 10.0


def shutdown_allowance(config: Config) -> float:
    """Seconds the models' stops may take at the shutdown (they run side by side): a process
    waits for its server, then for its group; a container is stopped, then removed."""
    stops = [2 * STOP_TIMEOUT]
    stops += [e.stop_timeout + 2 * e.api_timeout for e in config.engines.values()]
    return max(stops) + STOP_MARGIN


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
                 gpu: GpuMemory | None = None, tracing: GatewayTracing | None = None,
                 load: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.tracing = tracing or tracing_for(config)
        self.metrics = GatewayMetrics()
        self.gpu = gpu
        self.engines = ContainerEngines(config)
        self.engine_pings = EnginePings(self.engines)
        self.events = EventHub.from_settings(config.admin)
        # What every layer and the pool ask about queues and slots. A model with requests
        # queued for a slot or holding one is not idle: it serves its run before it is swapped
        # out (the slot is released just after the lease).
        # With [cluster], kept in Redis, exact across every process sharing it (imported only
        # then: its client is an optional install).
        # The tenants' rate windows and usage (kernel.ratelimits) the same way.
        self.shared: RedisAccounting | None = None
        self.shared_ledger: RedisLedger | None = None
        self.node: ClusterNode | None = None
        self.cluster_pool: SharedPool | None = None
        accounting: Accounting
        ledger: Ledger
        if config.cluster.enabled:
            from backends.shared import SharedPool
            from cluster.fair_accounting import redis_accounting
            from cluster.node import ClusterNode
            from cluster.ratelimits import RedisLedger

            accounting = self.shared = redis_accounting(config)
            self.shared.on_event = self.events.notice
            ledger = self.shared_ledger = RedisLedger(config)
            # The members (one configuration for all) and the pool's owner: the process that
            # owns it drives the servers, the others route to those it publishes.
            self.node = ClusterNode(config, self.shared.owner, on_event=self.events.notice)
            self.cluster_pool = SharedPool(
                self.node, config.cluster.heartbeat,
                adopt=self.engines.adopt if self.engines.engines else None)
            launchers = self.cluster_pool.wrap(launchers or launchers_for(self.engines))
        else:
            accounting = in_memory_accounting(config)
            ledger = InMemoryLedger()
        self.ledger = ledger
        self.accounting = accounting
        self.pool = BackendPool(config, launchers=launchers or launchers_for(self.engines),
                                gpu=gpu, on_ready=self._started, on_wake=self._woke,
                                on_change=self.events.changed, accounting=accounting)
        self.metrics.registry.register(PoolMetrics(self.pool))
        # What ``/metrics`` answers: this process's figures; with [cluster], labelled with its
        # member id, and the whole gateway's read from Redis at each scrape.
        self.render_metrics: Callable[[], Awaitable[bytes]] = self._render_metrics
        if self.node is not None:
            from telemetry.cluster_metrics import ClusterMetrics

            self.render_metrics = ClusterMetrics(
                self.metrics.registry, self.node.view, self.node.id, owns=self.node.owner.holds,
                states=[state.value for state in ModelState]).render
        self.upstream = Upstream(config)
        self.running_now = False
        self._told: str | None = None
        self._ended: str | None = None
        # The parts that live as long as the gateway (a reload keeps them): the upstream side
        # of the stack (built from [upstream], which cannot change live), the response ids,
        # the body budget, the loading feedback's ticker and the in-flight count.
        upstream = self.tracing.upstream(self.upstream) if self.tracing else self.upstream
        self._passthrough = StreamingPassthrough(pool=self.pool, upstream=upstream,
                                                 send_timeout=config.gateway.send_timeout)
        retry: ASGIApp = RetryConnectFailures(self._passthrough, config=config,
                                              metrics=self.metrics)
        if self.tracing:
            retry = self.tracing.waits(retry)
        self._retry = retry
        self.response_ids = ResponseIds(config.gateway.max_response_ids)
        self.budget = BodyBudget(config.gateway.max_buffered_body_bytes)
        # Its inner layers are the configuration's (``_layers``).
        self.feedback = (StreamFeedback(retry, config=config, pool=self.pool,
                                        accounting=accounting)
                         if config.gateway.stream_keepalive else None)
        self._draining = Draining(self._layers(config))
        self._remembering = RememberResponseIds(self._draining, ids=self.response_ids)
        self._surfaces(config)
        self.reloads = Reloads(self, load)
        self._app: ASGIApp = RequestContext(self._route, metrics=self.metrics, events=self.events)
        if self.tracing:
            self._app = self.tracing.requests(self._app, untraced=frozenset(routes.OPEN_ROUTES),
                                              routes=FORWARDED | frozenset(routes.CLIENT_ROUTES))

    def _layers(self, config: Config) -> ASGIApp:
        """The layers made from the configuration, from admission to the semaphores (a reload
        makes them again); what they count is the accounting's and the budget's, shared."""
        semaphores = ModelConcurrencyLimit(self._retry, config=config, metrics=self.metrics,
                                           accounting=self.accounting)
        queue = QueueDepthLimit(semaphores, config=config, metrics=self.metrics,
                                accounting=self.accounting)
        if self.feedback is not None:
            self.feedback.app = queue
        tenants: ASGIApp = self.feedback or queue
        if config.has_tenants:
            tenants = Tenants(tenants, config=config, ledger=self.ledger, metrics=self.metrics)
        self.admission = Admission(tenants, config=config, response_ids=self.response_ids,
                                   budget=self.budget)
        return self.admission

    def _surfaces(self, config: Config) -> None:
        """Who may call: the clients' keys and the admin token (a reload makes them again)."""
        self._clients: ASGIApp = self._client_routes
        if config.client_keys:
            self._clients = ClientKeys(self._client_routes, keys=config.tenant_of_key)
        self._anthropic_clients = anthropic.AnthropicErrors(self._clients)
        self.admin = AdminApi(self)

    def reconfigure(self, config: Config, plan: ReloadPlan) -> None:
        """Put a new configuration in force (``plan`` from ``plan_reload``, with nothing
        refused), synchronously: no request sees half of it. The accounting's limits and the
        pool change in place (unchanged models untouched); the configuration's layers are made
        anew and take the next requests, while the requests in flight finish in the old ones."""
        self.config = config
        self.accounting.reconfigure(config)
        self.pool.reconfigure(config, plan)
        self._passthrough.set_send_timeout(config.gateway.send_timeout)
        self._draining.app = self._layers(config)
        self._surfaces(config)

    def problem(self) -> str | None:
        """Why a gateway that started no longer does its work (the pool, its reaper or an
        engine's event stream is gone), or None; logged once."""
        if self._ended is not None:
            problem: str | None = self._ended
        elif not self.running_now:
            return None
        else:
            problem = self.pool.problem() or self.engines.supervisor.problem
            if problem is None and self.shared is not None and self.shared.error is not None:
                problem = f"shared state unavailable: {self.shared.error}"
        if problem is not None and problem != self._told:
            log.error("the gateway no longer works; /health answers 503", reason=problem)
            self._told = problem
        return problem

    async def _render_metrics(self) -> bytes:
        return self.metrics.render()

    def _started(self, model: str, seconds: float) -> None:
        self.metrics.start_duration(model).observe(seconds)
        if self.tracing:
            self.tracing.model_ready(model, woke=False)

    def _woke(self, model: str, seconds: float) -> None:
        self.metrics.wake_duration(model).observe(seconds)
        if self.tracing:
            self.tracing.model_ready(model, woke=True)

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
        self.events.changed()

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
        # The dashboards' streams would hold the server's close for its whole timeout.
        self.events.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        if self.gpu is None:
            self.gpu = self.pool.gpu = probe_gpus(self.config.gateway.gpu_memory_mb)
        feedback = self.feedback.running() if self.feedback else nullcontext()
        tracing = self.tracing.running() if self.tracing else nullcontext()
        shared = self.shared.running() if self.shared else nullcontext()
        ledger = self.shared_ledger.running() if self.shared_ledger else nullcontext()
        node = self.node.running() if self.node else nullcontext()
        cluster_pool = (self.cluster_pool.running(self.pool) if self.cluster_pool
                        else nullcontext())
        try:
            async with (tracing, node, shared, ledger, self.engines.running(), self.pool.running(),
                        cluster_pool, self.upstream.running(), feedback):
                self.running_now = True
                try:
                    yield self
                finally:
                    self.running_now = False
                    # [cluster]: the containers are the pool owner's: another member adopts
                    # them as the next, unless this is the owner and no other is there.
                    hand_over = self.node is not None and (
                        not self.node.owner.holds() or not await self.node.alone())
                    self.events.close()
                    self.engines.begin_shutdown(hand_over=hand_over)
        except Exception as exc:
            # The server may go on answering (hypercorn only logs a failed lifespan): say so.
            self._ended = f"the gateway's background work ended: {exc!r}"
            raise

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
        elif path in anthropic.PATHS:
            await self._anthropic_clients(scope, receive, send)
        else:
            await self._clients(scope, receive, send)

    async def _client_routes(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path in FORWARDED:
            if scope["method"] != "POST":
                raise method_not_allowed(path, "POST")
            if path == CREATE_PATH:
                await self._remembering(scope, receive, send)
            else:
                await self._draining(scope, receive, send)
            return
        stored = stored_response(path)
        if stored is not None and scope["method"] == stored[1]:
            await self._draining(scope, receive, send)
            return
        handler = routes.CLIENT_ROUTES.get(path)
        if handler is None and path.startswith(routes.MODEL_PREFIX):
            handler = partial(routes.model, name=path[len(routes.MODEL_PREFIX):])
        if handler is None:
            raise no_route(path)
        # The key's tenant (ClientKeys), or the one of requests where no key is needed.
        tenant = scope[STATE].tenant or self.config.default_tenant
        await self._get(partial(handler, tenant=tenant), scope, send)

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


def build_app(config: Config, load: Callable[[], Config] | None = None) -> Gateway:
    """The gateway; ``load`` reads the configuration again for a reload (SIGHUP,
    ``POST /admin/reload``, ``--watch-config``)."""
    return Gateway(config, load=load)


def tracing_for(config: Config) -> GatewayTracing | None:
    """The gateway's tracing, when ``[telemetry]`` or the ``OTEL_*`` variables turn it on."""
    if config.telemetry.traces is None:
        return None
    # Imported only then: the OpenTelemetry SDK is an optional install (the otel extra).
    from middleware.tracing import GatewayTracing
    return GatewayTracing.from_settings(config.telemetry)
