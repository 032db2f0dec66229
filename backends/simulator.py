"""Simulated vLLM server: an OpenAI-compatible backend for tests and benchmarks.

Run it as ``python -m backends.simulator --port 8000 --model NAME``; see
``--help`` for the pacing, concurrency and fault-injection switches.  It
depends only on the standard library and aiohttp (uvloop is used when it is
importable), so it runs in minimal container images too.

Endpoints (shaped like vLLM's):

* ``GET /health``: 200 with an empty body (503 for the first ``--fail-health``
  checks).  Like vLLM, which opens its port only once the engine is ready, the
  simulator binds its port at once but accepts connections only after the
  start-up delay: until then a connection is refused.
* ``GET /v1/models``: the one served model.
* ``POST /v1/chat/completions``, ``POST /v1/completions``: exactly
  ``max_tokens`` tokens of ``"tok "`` (chat also reads
  ``max_completion_tokens``; default 16), paced by ``--tokens-per-second``,
  non-streaming or as SSE (``"stream": true``, honouring
  ``stream_options.include_usage``).  Streamed chat answers start, like
  vLLM's, with a ``{"role": "assistant", "content": ""}`` chunk sent together
  with the first token; each token then has its own chunk, the last one with
  ``finish_reason: "length"``.
* ``POST /v1/embeddings``: deterministic 8-dimensional vectors.
* ``GET /metrics``: ``vllm:num_requests_running`` / ``vllm:num_requests_waiting``.
* ``GET /sim/stats``, ``POST /sim/reset``: counters for tests (see
  :class:`SimulatorStats`).

Prompt token counts in ``usage`` are whitespace-separated words of the
prompt (token-id prompts count one per id).

The hot paths format pre-built byte templates; every SSE event is one write to
the socket.  For embedding in an asyncio program use :func:`serve`, or
:func:`build_app` for just the :class:`aiohttp.web.Application`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import random
import signal
import socket
import sys
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiohttp import web

__all__ = [
    "SIMULATOR_KEY",
    "RunningSimulator",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
    "build_app",
    "main",
    "serve",
]

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
DEFAULT_MAX_TOKENS = 16
EMBEDDING_DIM = 8
TOKEN = b"tok "
# Seconds that shutdown waits for in-flight handlers before cancelling them.
SHUTDOWN_GRACE = 0.02

_COMPLETED, _ABORTED, _CUT = "completed", "aborted", "cut"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class SimulatorConfig:
    """Behaviour of one simulated server; the fault switches default to off."""

    model: str = "sim-model"
    startup_delay: float = 0.0
    tokens_per_second: float = 0.0  # 0: as fast as possible, never sleeps
    max_concurrency: int = 0  # 0: unlimited
    max_model_len: int = 4096
    fail_health: int = 0
    error_rate: float = 0.0
    seed: int = 0
    die_after_tokens: int | None = None
    exit_after_requests: int | None = None
    # Seconds an idle connection stays open: vLLM's HTTP server (uvicorn) closes it after 5.
    keep_alive: float = 5.0

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be {rule}"
            for name, ok, rule in (
                ("model", bool(self.model), "non-empty"),
                ("startup_delay", self.startup_delay >= 0, ">= 0"),
                ("tokens_per_second", self.tokens_per_second >= 0, ">= 0"),
                ("max_concurrency", self.max_concurrency >= 0, ">= 0"),
                ("max_model_len", self.max_model_len > 0, "> 0"),
                ("fail_health", self.fail_health >= 0, ">= 0"),
                ("keep_alive", self.keep_alive > 0, "> 0"),
                ("error_rate", 0.0 <= self.error_rate <= 1.0, "in [0, 1]"),
                (
                    "die_after_tokens",
                    self.die_after_tokens is None or self.die_after_tokens >= 0,
                    ">= 0",
                ),
                (
                    "exit_after_requests",
                    self.exit_after_requests is None or self.exit_after_requests > 0,
                    "> 0",
                ),
            )
            if not ok
        ]
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class SimulatorStats:
    """Counters served at ``/sim/stats``.

    ``requests``: requests received on the chat, completions and embeddings
    endpoints (valid or not); ``by_path``: requests per path on every endpoint
    but ``/sim/*``; ``running``/``waiting``: generations running now / queued
    behind ``max_concurrency``; ``completed``: generations answered in full;
    ``aborted``: generations whose client went away first (or that were
    cancelled by shutdown); ``cut``: generations cut by ``die_after_tokens``;
    ``errors``: answers of ``error_rate``'s injected 500s; ``connections``:
    TCP connections accepted; ``open_connections``: those still open.
    """

    requests: int = 0
    by_path: dict[str, int] = field(default_factory=dict)
    running: int = 0
    waiting: int = 0
    completed: int = 0
    aborted: int = 0
    cut: int = 0
    errors: int = 0
    connections: int = 0
    open_connections: int = 0

    GAUGES: ClassVar[frozenset[str]] = frozenset({"running", "waiting", "open_connections"})

    def reset(self) -> None:
        """Zero the counters, leaving the gauges (``GAUGES``) alone."""
        for f in dataclasses.fields(self):
            if f.name not in self.GAUGES:
                setattr(self, f.name, {} if f.name == "by_path" else 0)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _ApiError(Exception):
    """An error answered in vLLM's shape: the type is the status's, or vLLM's
    ``"Bad Request"`` for a body that fails its request validation."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "BadRequestError",
        404: "NotFoundError",
        500: "InternalServerError",
    }

    def __init__(
        self, status: int, message: str, *, param: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or self.TYPES[status]

    def response(self) -> web.Response:
        error = {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.status,
        }
        return web.Response(
            status=self.status,
            body=json.dumps({"error": error}).encode(),
            content_type="application/json",
        )


@dataclass(frozen=True)
class _Templates:
    """Byte templates of one endpoint's answers; ``%s`` id, ``%d`` created first."""

    id_prefix: bytes
    role: bytes | None  # chunk sent before the first token, if any
    token: bytes
    last: bytes
    usage: bytes  # then: prompt_tokens, total_tokens, completion_tokens
    full: bytes  # then: content, prompt_tokens, total_tokens, completion_tokens


def _templates(kind: str, model: str) -> _Templates:
    """Build the templates of ``kind`` ("chat" or "completion") for ``model``."""
    quoted = json.dumps(model).replace("%", "%%")
    usage = '"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}'
    if kind == "chat":
        head = (
            'data: {"id":"%s","object":"chat.completion.chunk","created":%d,'
            f'"model":{quoted},"choices":['
        )
        role: str | None = (
            head + '{"index":0,"delta":{"role":"assistant","content":""},'
            '"logprobs":null,"finish_reason":null}]}\n\n'
        )
        token = head + '{"index":0,"delta":{"content":"tok "},"logprobs":null,'
        full = (
            '{"id":"%s","object":"chat.completion","created":%d,'
            f'"model":{quoted},"choices":[{{"index":0,"message":'
            '{"role":"assistant","content":"%s","tool_calls":[]},'
            '"logprobs":null,"finish_reason":"length","stop_reason":null}],'
            + usage
            + ',"prompt_logprobs":null}'
        )
        id_prefix = "chatcmpl-"
    else:
        head = (
            'data: {"id":"%s","object":"text_completion","created":%d,'
            f'"model":{quoted},"choices":['
        )
        role = None
        token = head + '{"index":0,"text":"tok ","logprobs":null,'
        full = (
            '{"id":"%s","object":"text_completion","created":%d,'
            f'"model":{quoted},"choices":[{{"index":0,"text":"%s",'
            '"logprobs":null,"finish_reason":"length","stop_reason":null,'
            '"prompt_logprobs":null}],' + usage + "}"
        )
        id_prefix = "cmpl-"
    return _Templates(
        id_prefix=(id_prefix + os.urandom(6).hex() + "-").encode(),
        role=None if role is None else role.encode(),
        token=(token + '"finish_reason":null}]}\n\n').encode(),
        last=(token + '"finish_reason":"length","stop_reason":null}]}\n\n').encode(),
        usage=(head + "]," + usage + "}\n\n").encode(),
        full=full.encode(),
    )


def _count_tokens(value: object) -> int:
    """Approximate the tokens of a prompt, messages list or content part."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(map(_count_tokens, value))
    if isinstance(value, dict):
        return _count_tokens(value.get("content")) + _count_tokens(value.get("text"))
    return 1 if type(value) is int else 0


def _embedding(text: str) -> list[float]:
    crc = zlib.crc32(text.encode())
    return [((crc >> (4 * i)) & 0xF) / 15.0 - 0.5 for i in range(EMBEDDING_DIM)]


def _invalid(field: str, message: str) -> _ApiError:
    """A body field that fails vLLM's validation (pydantic's, before vLLM reads the request)."""
    return _ApiError(400, message, param=f"body.{field}", kind="Bad Request")


def _max_tokens(value: object, max_model_len: int) -> int:
    if value is None:
        return DEFAULT_MAX_TOKENS
    if type(value) is not int:
        raise _invalid("max_tokens", f"Input should be a valid integer, got {value!r}")
    if value < 1:
        raise _ApiError(400, f"max_tokens must be at least 1, got {value}.", param="max_tokens")
    if value > max_model_len:
        raise _ApiError(
            400,
            f"max_tokens={value} cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens.",
            param="max_tokens",
        )
    return value


def _abort_connection(request: web.BaseRequest) -> None:
    """Drop the connection without ending the response, like a dying server."""
    transport = request.transport
    if transport is not None:
        transport.abort()


class Simulator:
    """State and request handlers of one simulated server."""

    def __init__(self, config: SimulatorConfig):
        self.config = config
        self.stats = SimulatorStats()
        # Set by --exit-after-requests (and by main()'s signal handlers).
        self.shutdown_requested = asyncio.Event()
        self._health_failures_left = config.fail_health
        self._rng = random.Random(config.seed)
        self._semaphore = (
            asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        )
        self._answered = 0
        self._ids = itertools.count()
        self._chat = _templates("chat", config.model)
        self._completion = _templates("completion", config.model)
        self._models_body = json.dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": config.model,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "vllm",
                        "root": config.model,
                        "parent": None,
                        "max_model_len": config.max_model_len,
                        "permission": [],
                    }
                ],
            }
        ).encode()
        label = (
            config.model.replace("\\", "\\\\")
            .replace('"', '\\"')
            .replace("\n", "\\n")
            .replace("%", "%%")
        )
        self._metrics_template = "".join(
            f"# HELP vllm:{name} {doc}\n# TYPE vllm:{name} gauge\n"
            f'vllm:{name}{{engine="0",model_name="{label}"}} %.1f\n'
            for name, doc in (
                ("num_requests_running", "Number of requests running on GPU."),
                ("num_requests_waiting", "Number of requests waiting to be processed."),
            )
        ).encode()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post(CHAT_PATH, self.chat_completions)
        app.router.add_post(COMPLETIONS_PATH, self.completions)
        app.router.add_post(EMBEDDINGS_PATH, self.embeddings)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/sim/stats", self.sim_stats)
        app.router.add_post("/sim/reset", self.sim_reset)

    # -- plain endpoints -------------------------------------------------

    def _count(self, path: str) -> None:
        by_path = self.stats.by_path
        by_path[path] = by_path.get(path, 0) + 1

    async def health(self, request: web.Request) -> web.Response:
        self._count("/health")
        if self._health_failures_left:
            self._health_failures_left -= 1
            return web.Response(status=503)
        return web.Response()

    async def models(self, request: web.Request) -> web.Response:
        self._count("/v1/models")
        return web.Response(body=self._models_body, content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        self._count("/metrics")
        body = self._metrics_template % (self.stats.running, self.stats.waiting)
        return web.Response(body=body, headers={"Content-Type": _METRICS_CONTENT_TYPE})

    async def sim_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.as_dict())

    async def sim_reset(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return web.json_response(self.stats.as_dict())

    # -- model endpoints -------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._model_endpoint(request, CHAT_PATH, self._chat_body)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._model_endpoint(request, COMPLETIONS_PATH, self._completion_body)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._model_endpoint(request, EMBEDDINGS_PATH, self._embeddings_body)

    async def _model_endpoint(
        self,
        request: web.Request,
        path: str,
        handle: Callable[
            [web.Request, dict[str, Any]],
            Awaitable[tuple[web.StreamResponse, bool]],
        ],
    ) -> web.StreamResponse:
        """Count, parse, validate and answer; ``handle`` says if it answered."""
        self.stats.requests += 1
        self._count(path)
        try:
            try:
                body = json.loads(await request.read())
            except ValueError as exc:
                raise _ApiError(400, f"Request body is not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise _ApiError(400, "Request body must be a JSON object")
            model = body.get("model")
            if model is not None and model != self.config.model:
                raise _ApiError(404, f"The model `{model}` does not exist.", param="model")
            resp, answered = await handle(request, body)
        except _ApiError as exc:
            resp, answered = exc.response(), True
        if answered and self.config.exit_after_requests is not None:
            self._answered += 1
            if self._answered >= self.config.exit_after_requests:
                # Send the answer before the server goes away.
                with contextlib.suppress(ConnectionError):
                    await resp.prepare(request)
                    await resp.write_eof()
                self.shutdown_requested.set()
        return resp

    async def _chat_body(
        self, request: web.Request, body: dict[str, Any]
    ) -> tuple[web.StreamResponse, bool]:
        if "messages" not in body:
            raise _invalid("messages", "Field required")
        messages = body["messages"]
        if not isinstance(messages, list):
            raise _invalid("messages", "Input should be a valid list")
        if not messages:
            raise _ApiError(
                400,
                "Cannot apply chat template to an empty conversation. "
                "Provide at least one message.",
            )
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        max_tokens = _max_tokens(max_tokens, self.config.max_model_len)
        return await self._generate(request, body, self._chat, max_tokens, _count_tokens(messages))

    async def _completion_body(
        self, request: web.Request, body: dict[str, Any]
    ) -> tuple[web.StreamResponse, bool]:
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str | list):
            raise _invalid("prompt", "Input should be a valid string or list")
        if not prompt:
            raise _ApiError(
                400,
                "Either prompt or prompt_embeds must be provided and non-empty.",
                param="prompt",
            )
        return await self._generate(
            request,
            body,
            self._completion,
            _max_tokens(body.get("max_tokens"), self.config.max_model_len),
            _count_tokens(prompt),
        )

    async def _embeddings_body(
        self, request: web.Request, body: dict[str, Any]
    ) -> tuple[web.StreamResponse, bool]:
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        elif (
            not isinstance(inputs, list)
            or not inputs
            or not all(isinstance(text, str) for text in inputs)
        ):
            raise _ApiError(400, "Field required: 'input' (a string or list of strings)")
        tokens = sum(map(_count_tokens, inputs))
        payload = {
            "id": f"embd-{next(self._ids)}",
            "object": "list",
            "created": int(time.time()),
            "model": self.config.model,
            "data": [
                {"object": "embedding", "index": i, "embedding": _embedding(text)}
                for i, text in enumerate(inputs)
            ],
            "usage": {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "completion_tokens": 0,
            },
        }
        return web.json_response(payload), True

    async def _generate(
        self,
        request: web.Request,
        body: dict[str, Any],
        templates: _Templates,
        max_tokens: int,
        prompt_tokens: int,
    ) -> tuple[web.StreamResponse, bool]:
        """Queue, run and count one generation; True if answered in full."""
        stats = self.stats
        if self.config.error_rate and self._rng.random() < self.config.error_rate:
            stats.errors += 1
            raise _ApiError(500, "Simulated internal server error")
        semaphore = self._semaphore
        if semaphore is not None:
            stats.waiting += 1
            try:
                await semaphore.acquire()
            except BaseException:
                stats.aborted += 1
                raise
            finally:
                stats.waiting -= 1
        stats.running += 1
        outcome = _ABORTED
        try:
            args = (templates.id_prefix + b"%x" % next(self._ids), int(time.time()))
            if body.get("stream"):
                options = body.get("stream_options")
                include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
                resp, outcome = await self._stream(
                    request, templates, args, max_tokens, prompt_tokens, include_usage
                )
            else:
                resp, outcome = await self._respond(
                    request, templates, args, max_tokens, prompt_tokens
                )
        finally:
            stats.running -= 1
            if semaphore is not None:
                semaphore.release()
            if outcome is _COMPLETED:
                stats.completed += 1
            elif outcome is _CUT:
                stats.cut += 1
            else:
                stats.aborted += 1
        return resp, outcome is _COMPLETED

    async def _respond(
        self,
        request: web.Request,
        templates: _Templates,
        args: tuple[bytes, int],
        max_tokens: int,
        prompt_tokens: int,
    ) -> tuple[web.StreamResponse, str]:
        """Non-streaming answer; a client disconnect cancels the handler."""
        rate = self.config.tokens_per_second
        die_after = self.config.die_after_tokens
        if die_after is not None and max_tokens > die_after:
            if rate:
                await asyncio.sleep(die_after / rate)
            _abort_connection(request)
            # aiohttp fails to send this on the aborted transport, quietly.
            return web.Response(), _CUT
        if rate:
            await asyncio.sleep(max_tokens / rate)
        body = templates.full % (
            *args,
            TOKEN * max_tokens,
            prompt_tokens,
            prompt_tokens + max_tokens,
            max_tokens,
        )
        return web.Response(body=body, content_type="application/json"), _COMPLETED

    async def _stream(
        self,
        request: web.Request,
        templates: _Templates,
        args: tuple[bytes, int],
        max_tokens: int,
        prompt_tokens: int,
        include_usage: bool,
    ) -> tuple[web.StreamResponse, str]:
        """SSE answer, one write per event; a failed write means the client left."""
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        die_after = self.config.die_after_tokens
        emitted = max_tokens if die_after is None else min(max_tokens, die_after)
        token = templates.token % args
        interval = 1.0 / self.config.tokens_per_second if self.config.tokens_per_second else 0.0
        loop = asyncio.get_running_loop()
        try:
            await resp.prepare(request)
            write = resp.write
            deadline = loop.time()
            for i in range(1, emitted + 1):
                if interval:
                    deadline += interval
                    delay = deadline - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if i == 1 and templates.role is not None:
                    await write(templates.role % args)
                await write(templates.last % args if i == max_tokens else token)
            if emitted < max_tokens:
                _abort_connection(request)
                return resp, _CUT
            if include_usage:
                await write(
                    templates.usage % (*args, prompt_tokens, prompt_tokens + max_tokens, max_tokens)
                )
            await write(_DONE)
            await resp.write_eof()
        except ConnectionError:
            return resp, _ABORTED
        return resp, _COMPLETED


SIMULATOR_KEY = web.AppKey("simulator", Simulator)


def build_app(config: SimulatorConfig) -> web.Application:
    """An application serving ``config``; its :class:`Simulator` is ``app[SIMULATOR_KEY]``.

    Run it with ``handler_cancellation=True`` (as :func:`serve` does) so that
    a client disconnect cancels a paced non-streaming generation.
    """
    app = web.Application(client_max_size=64 * 1024 * 1024)
    simulator = Simulator(config)
    simulator.add_routes(app)
    app[SIMULATOR_KEY] = simulator
    return app


def _count_connections(server: web.Server, stats: SimulatorStats) -> None:
    """Hook ``server``'s per-connection callbacks to count TCP connections."""
    made, lost = server.connection_made, server.connection_lost

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        stats.connections += 1
        stats.open_connections += 1
        made(handler, transport)

    def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
        stats.open_connections -= 1
        lost(handler, exc)

    server.connection_made = connection_made  # type: ignore[method-assign]
    server.connection_lost = connection_lost  # type: ignore[method-assign]


class RunningSimulator:
    """A simulator listening on a TCP port, as yielded by :func:`serve`."""

    def __init__(self, simulator: Simulator, runner: web.AppRunner, host: str, port: int) -> None:
        self.simulator = simulator
        self.host = host
        self.port = port
        self._runner = runner
        self._closing: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def stats(self) -> SimulatorStats:
        return self.simulator.stats

    async def close(self) -> None:
        """Stop listening and drop the open connections (idempotent)."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._runner.cleanup())
        await asyncio.shield(self._closing)

    async def wait_closed(self) -> None:
        """Wait until ``simulator.shutdown_requested`` has closed the server."""
        await self.simulator.shutdown_requested.wait()
        await self.close()


@contextlib.asynccontextmanager
async def serve(
    config: SimulatorConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    started_at: float | None = None,
) -> AsyncIterator[RunningSimulator]:
    """Serve ``config`` on ``host:port`` (0: any free port) until the block ends.

    The port is bound at once and listened on from ``started_at`` (a
    ``time.monotonic()`` value; default: now) plus the start-up delay.  The
    server also closes itself once ``exit_after_requests`` is reached (or
    ``simulator.shutdown_requested`` is set otherwise).
    """
    app = build_app(config)
    simulator = app[SIMULATOR_KEY]
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=SHUTDOWN_GRACE,
        keepalive_timeout=config.keep_alive,
    )
    await runner.setup()
    assert runner.server is not None
    _count_connections(runner.server, simulator.stats)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except BaseException:
        await runner.cleanup()
        raise
    site = web.SockSite(runner, sock)
    running = RunningSimulator(simulator, runner, host, sock.getsockname()[1])
    ready_at = (time.monotonic() if started_at is None else started_at) + config.startup_delay
    opening = asyncio.create_task(_listen_at(site, ready_at))
    watcher = asyncio.create_task(running.wait_closed())
    try:
        if config.startup_delay <= 0:
            await opening  # a port that cannot be listened on fails here, not later
        yield running
    finally:
        watcher.cancel()
        opening.cancel()
        await running.close()
        sock.close()


async def _listen_at(site: web.SockSite, ready_at: float) -> None:
    await asyncio.sleep(ready_at - time.monotonic())
    await site.start()


async def _serve_until_stopped(
    config: SimulatorConfig, host: str, port: int, started_at: float
) -> None:
    async with serve(config, host, port, started_at=started_at) as running:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, running.simulator.shutdown_requested.set)
        print(f"listening on {running.url}", flush=True)
        print(
            f"simulator: model={config.model!r} url={running.url} "
            f"startup_delay={config.startup_delay} "
            f"tokens_per_second={config.tokens_per_second} "
            f"max_concurrency={config.max_concurrency} fail_health={config.fail_health} "
            f"error_rate={config.error_rate} seed={config.seed} "
            f"die_after_tokens={config.die_after_tokens} "
            f"exit_after_requests={config.exit_after_requests} "
            f"keep_alive={config.keep_alive} pid={os.getpid()}",
            file=sys.stderr,
            flush=True,
        )
        await running.wait_closed()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m backends.simulator",
        description="Simulated vLLM OpenAI-compatible server.",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    add("--port", type=int, required=True, help="port to bind; 0 picks a free one")
    add("--model", default=SimulatorConfig.model, help="served model name")
    add(
        "--startup-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="/health answers 503 for S seconds after start",
    )
    add(
        "--tokens-per-second",
        type=float,
        default=0.0,
        metavar="R",
        help="token pacing per request; 0 = no pacing (default)",
    )
    add(
        "--max-concurrency",
        type=int,
        default=0,
        metavar="N",
        help="generations running at once, the rest wait; 0 = unlimited",
    )
    add(
        "--max-model-len",
        type=int,
        default=SimulatorConfig.max_model_len,
        help="max_model_len reported by /v1/models",
    )
    add(
        "--fail-health",
        type=int,
        default=0,
        metavar="N",
        help="fault: the first N health checks after the start-up delay get 503",
    )
    add(
        "--error-rate",
        type=float,
        default=0.0,
        metavar="R",
        help="fault: this fraction of generations answers 500",
    )
    add("--seed", type=int, default=0, help="seed of --error-rate's choices")
    add(
        "--keep-alive",
        type=float,
        default=SimulatorConfig.keep_alive,
        metavar="S",
        help="seconds an idle connection stays open (default 5, as vLLM's)",
    )
    add(
        "--die-after-tokens",
        type=int,
        default=None,
        metavar="K",
        help="fault: generations longer than K tokens are cut by aborting the "
        "connection after K tokens",
    )
    add(
        "--exit-after-requests",
        type=int,
        default=None,
        metavar="N",
        help="fault: exit (status 0) once N model requests have been answered",
    )
    return parser


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    started_at = time.monotonic()
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be in [0, 65535]")
    try:
        config = SimulatorConfig(
            model=args.model,
            startup_delay=args.startup_delay,
            tokens_per_second=args.tokens_per_second,
            max_concurrency=args.max_concurrency,
            max_model_len=args.max_model_len,
            fail_health=args.fail_health,
            error_rate=args.error_rate,
            seed=args.seed,
            die_after_tokens=args.die_after_tokens,
            exit_after_requests=args.exit_after_requests,
            keep_alive=args.keep_alive,
        )
    except ValueError as exc:
        parser.error(str(exc))
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        try:
            runner.run(_serve_until_stopped(config, args.host, args.port, started_at))
        except OSError as exc:  # e.g. the port is taken
            print(f"simulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    status = main()
    # Skip the interpreter's slow (~0.1 s) teardown: nothing is left to clean up.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
