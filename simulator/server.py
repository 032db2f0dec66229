"""Simulated vLLM server: an OpenAI-compatible backend for tests and benchmarks.

Run it as ``python -m simulator --port 8000 --model NAME``; see
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
* ``POST /v1/messages`` (Anthropic Messages, streamed with ``event:`` lines
  as vLLM converts a chat stream: ``message_start``, ``content_block_start``,
  ``content_block_delta`` per token, ``content_block_stop``,
  ``message_delta``, ``message_stop``; errors in Anthropic's shape) and
  ``POST /v1/messages/count_tokens``.
* ``POST /v1/responses`` (plain, ``stream`` with vLLM's ``response.*`` events,
  or ``background``), ``GET /v1/responses/{id}`` and
  ``POST /v1/responses/{id}/cancel``: the server stores its responses, as
  vLLM does with ``VLLM_ENABLE_RESPONSES_API_STORE=1``.
* ``POST /pooling``, ``POST /classify``: deterministic vectors and labels.
* ``POST /v1/audio/transcriptions``, ``/translations`` (multipart forms): the
  text answered is the SHA-256 of the uploaded ``file``, so a test sees what
  arrived.
* ``GET /metrics``: ``vllm:num_requests_running`` / ``vllm:num_requests_waiting``.
* ``GET /sim/stats``, ``POST /sim/reset``: counters for tests (see
  :class:`SimulatorStats`).
* With ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1`` (as vLLM): vLLM's
  sleep API (``/sleep``, ``/wake_up``, ``/is_sleeping``, ``/collective_rpc``),
  generations held while asleep, ``vllm:engine_sleep_state``; see
  :mod:`simulator.sleep`.
* With ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (as vLLM):
  ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``, loaded adapters served
  under their names and listed with their ``parent``; see :mod:`simulator.lora`.

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
import hashlib
import itertools
import json
import os
import random
import signal
import socket
import sys
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiohttp import web

from . import lora
from .sleep import SleepMode

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
MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
RESPONSES_PATH = "/v1/responses"
POOLING_PATH = "/pooling"
CLASSIFY_PATH = "/classify"
TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
TRANSLATIONS_PATH = "/v1/audio/translations"
# Responses kept for GET /v1/responses/{id} (vLLM keeps them all; a test tool needs fewer).
STORED_RESPONSES = 10_000
CLASS_LABELS = ("LABEL_0", "LABEL_1")
# The "duration" of an upload in a transcription's usage: 16 kHz, 16-bit mono.
AUDIO_BYTES_PER_SECOND = 32_000
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
    # vLLM's sleep mode: served only with both, as vLLM (``--enable-sleep-mode`` and
    # ``VLLM_SERVER_DEV_MODE=1``); see simulator/sleep.py.
    enable_sleep_mode: bool = False
    server_dev_mode: bool = False
    sleep_delay: float = 0.0
    wake_delay: float = 0.0
    # Seconds an idle connection stays open: vLLM's HTTP server (uvicorn) closes it after 5.
    keep_alive: float = 5.0
    fail_wake: bool = False  # fault: every wake_up answers 500, the engine stays asleep
    start_asleep: bool = False  # as a server an earlier gateway put to sleep (level 1)
    # vLLM's runtime LoRA API: served only with both, as vLLM (``--enable-lora`` and
    # ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``); see simulator/lora.py.
    enable_lora: bool = False
    runtime_lora: bool = False
    lora_load_delay: float = 0.0

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
                ("sleep_delay", self.sleep_delay >= 0, ">= 0"),
                ("wake_delay", self.wake_delay >= 0, ">= 0"),
                ("lora_load_delay", self.lora_load_delay >= 0, ">= 0"),
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
        self, status: int, message: str, *, type: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or self.TYPES[status]
        self.param = param

    def response(self) -> web.Response:
        error = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.status,
        }
        return web.Response(
            status=self.status,
            body=json.dumps({"error": error}).encode(),
            content_type="application/json",
        )

    def anthropic_response(self) -> web.Response:
        """The error as vLLM's Anthropic routes say it (``translate_error_response``)."""
        error = {"type": self.type, "message": self.message}
        return web.json_response({"type": "error", "error": error}, status=self.status)


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


def _event(kind: str, data: dict[str, Any]) -> bytes:
    """One event of an SSE stream with ``event:`` lines (the Anthropic and Responses APIs),
    its data as compact as pydantic's ``model_dump_json``."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _output_message(response_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": None}]
    return {
        "id": f"msg_{response_id[5:]}",
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content if text else [],
    }


def _texts(body: dict[str, Any]) -> list[str]:
    """The ``input`` of a pooling request: a string or a list of strings."""
    inputs = body.get("input")
    if isinstance(inputs, str):
        return [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
        raise _ApiError(400, "Field required: 'input' (a string or list of strings)")
    return inputs


def _embedding(text: str) -> list[float]:
    crc = zlib.crc32(text.encode())
    return [((crc >> (4 * i)) & 0xF) / 15.0 - 0.5 for i in range(EMBEDDING_DIM)]


def _invalid(field: str, message: str) -> _ApiError:
    """A body field that fails vLLM's validation (pydantic's, before vLLM reads the request)."""
    return _ApiError(400, message, param=f"body.{field}", type="Bad Request")


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
        self.sleep_mode = (
            SleepMode(config.sleep_delay, config.wake_delay, fail_wake=config.fail_wake,
                      start_asleep=config.start_asleep)
            if config.enable_sleep_mode and config.server_dev_mode
            else None
        )
        self.lora = (
            lora.Lora(config.model, config.lora_load_delay)
            if config.enable_lora and config.runtime_lora
            else None
        )
        self._ids = itertools.count()
        self._chat = _templates("chat", config.model)
        self._completion = _templates("completion", config.model)
        # An adapter's answers name it: their templates, made at its first generation.
        self._adapter_templates: dict[tuple[str, str], _Templates] = {}
        self._stored_responses: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._background: dict[str, asyncio.Task[None]] = {}
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
        self._label = label

    def add_routes(self, app: web.Application) -> None:
        if self.sleep_mode is not None:
            self.sleep_mode.add_routes(app)
        if self.lora is not None:
            self.lora.add_routes(app)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post(CHAT_PATH, self.chat_completions)
        app.router.add_post(COMPLETIONS_PATH, self.completions)
        app.router.add_post(EMBEDDINGS_PATH, self.embeddings)
        app.router.add_post(MESSAGES_PATH, self.anthropic_messages)
        app.router.add_post(COUNT_TOKENS_PATH, self.anthropic_count_tokens)
        app.router.add_post(RESPONSES_PATH, self.responses)
        app.router.add_get(RESPONSES_PATH + "/{response_id}", self.retrieve_response)
        app.router.add_post(RESPONSES_PATH + "/{response_id}/cancel", self.cancel_response)
        app.router.add_post(POOLING_PATH, self.pooling)
        app.router.add_post(CLASSIFY_PATH, self.classify)
        app.router.add_post(TRANSCRIPTIONS_PATH, self.transcriptions)
        app.router.add_post(TRANSLATIONS_PATH, self.translations)
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
        if self.lora is not None and self.lora.loaded:
            listed = json.loads(self._models_body)
            listed["data"] += self.lora.cards(listed["data"][0]["created"])
            return web.json_response(listed)
        return web.Response(body=self._models_body, content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        self._count("/metrics")
        body = self._metrics_template % (self.stats.running, self.stats.waiting)
        if self.sleep_mode is not None:
            body += self.sleep_mode.metrics(self._label).encode()
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
        shape: Callable[[_ApiError], web.Response] = _ApiError.response,
    ) -> web.StreamResponse:
        """Count, parse, validate and answer; ``handle`` says if it answered; errors are said
        by ``shape``."""
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
            if model is not None and model != self.config.model and not self._adapter(model):
                raise _ApiError(404, f"The model `{model}` does not exist.", param="model")
            resp, answered = await handle(request, body)
        except _ApiError as exc:
            resp, answered = shape(exc), True
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
        return await self._generate(
            request, body, self._templates("chat", body), max_tokens, _count_tokens(messages)
        )

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
            self._templates("completion", body),
            _max_tokens(body.get("max_tokens"), self.config.max_model_len),
            _count_tokens(prompt),
        )

    def _adapter(self, name: object) -> bool:
        """Whether ``name`` is a LoRA adapter loaded here (counted as one generation of it)."""
        if self.lora is None or not isinstance(name, str) or not self.lora.serves(name):
            return False
        self.lora.generated(name)
        return True

    def _templates(self, kind: str, body: dict[str, Any]) -> _Templates:
        """The answer's templates: the served model's, or the adapter's the body names."""
        model = body.get("model")
        if self.lora is None or model is None or model == self.config.model:
            return self._chat if kind == "chat" else self._completion
        key = (kind, model)
        templates = self._adapter_templates.get(key)
        if templates is None:
            templates = self._adapter_templates[key] = _templates(kind, model)
        return templates

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
        sleep = self.sleep_mode
        if sleep is not None and sleep.sleeping:
            sleep.held += 1
            stats.waiting += 1
            try:
                await sleep.hold()  # as vLLM: held, not answered, until awake
            finally:
                stats.waiting -= 1
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
        task = asyncio.current_task()
        ended = sleep.generating(task) if sleep is not None and task is not None else None
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
            if ended is not None:
                ended()
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
        sleep = self.sleep_mode
        try:
            await resp.prepare(request)
            write = resp.write
            deadline = loop.time()
            for i in range(1, emitted + 1):
                if sleep is not None and sleep.keeping:
                    await sleep.hold()  # a sleep with mode=keep pauses it until the wake
                    deadline = loop.time()  # and the pace goes on from there
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

    # -- the rest of vLLM's API: Anthropic Messages, responses, pooling, audio --------------
    #
    # Shaped after vLLM 0.32 (vllm/entrypoints/anthropic/, openai/responses/, pooling/,
    # speech_to_text/). These generations are paced by --tokens-per-second and counted in
    # ``running``/``completed``/``aborted``; a stream is cut by --die-after-tokens;
    # --max-concurrency and the other fault switches apply to chat and completions only.

    async def anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        return await self._model_endpoint(
            request, MESSAGES_PATH, self._messages_body, _ApiError.anthropic_response
        )

    async def anthropic_count_tokens(self, request: web.Request) -> web.StreamResponse:
        return await self._model_endpoint(
            request, COUNT_TOKENS_PATH, self._count_tokens_body, _ApiError.anthropic_response
        )

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._model_endpoint(request, RESPONSES_PATH, self._responses_body)

    async def pooling(self, request: web.Request) -> web.StreamResponse:
        return await self._model_endpoint(request, POOLING_PATH, self._pooling_body)

    async def classify(self, request: web.Request) -> web.StreamResponse:
        return await self._model_endpoint(request, CLASSIFY_PATH, self._classify_body)

    async def retrieve_response(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(self._stored(request, "/{id}"))
        except _ApiError as exc:
            return exc.response()

    async def cancel_response(self, request: web.Request) -> web.Response:
        try:
            stored = self._stored(request, "/{id}/cancel")
            if stored["status"] not in ("queued", "in_progress"):
                raise _ApiError(
                    400,
                    "Cannot cancel a synchronous response.",
                    type="invalid_request_error",
                    param="response_id",
                )
        except _ApiError as exc:
            return exc.response()
        stored["status"] = "cancelled"
        task = self._background.pop(stored["id"], None)
        if task is not None:
            task.cancel()
        return web.json_response(stored)

    def _stored(self, request: web.Request, route: str) -> dict[str, Any]:
        """Count the request; the stored response its path names, else vLLM's 404."""
        self._count(RESPONSES_PATH + route)
        response_id = request.match_info["response_id"]
        stored = self._stored_responses.get(response_id)
        if stored is None:
            raise _ApiError(
                404,
                f"Response with id '{response_id}' not found.",
                type="invalid_request_error",
                param="response_id",
            )
        return stored

    async def transcriptions(self, request: web.Request) -> web.Response:
        return await self._audio(request, TRANSCRIPTIONS_PATH, transcribe=True)

    async def translations(self, request: web.Request) -> web.Response:
        return await self._audio(request, TRANSLATIONS_PATH, transcribe=False)

    async def _audio(self, request: web.Request, path: str, *, transcribe: bool) -> web.Response:
        """The text "answered" for an upload is its SHA-256: a test sees it arrived intact."""
        self.stats.requests += 1
        self._count(path)
        try:
            try:
                form = await request.post()
            except ValueError as exc:
                raise _ApiError(400, f"Request body is not a valid form: {exc}") from None
            model = form.get("model")
            if model is not None and model != self.config.model:
                raise _ApiError(404, f"The model `{model}` does not exist.")
            upload = form.get("file")
            if not isinstance(upload, web.FileField):
                raise _ApiError(400, "Field required: 'file' (the audio, as a file upload)")
            audio = upload.file.read()
        except _ApiError as exc:
            return exc.response()
        text = hashlib.sha256(audio).hexdigest()
        async with self._generation(1):
            pass
        if not transcribe:
            return web.json_response({"text": text})
        seconds = max(1, len(audio) // AUDIO_BYTES_PER_SECOND)
        return web.json_response({"text": text, "usage": {"type": "duration", "seconds": seconds}})

    @contextlib.asynccontextmanager
    async def _generation(self, tokens: int) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        """Count one generation of ``tokens`` tokens; yields the wait before each next token
        (non-streaming answers wait for all of them on the way out)."""
        stats = self.stats
        rate = self.config.tokens_per_second
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        streamed = False

        async def next_token() -> None:
            nonlocal deadline, streamed
            streamed = True
            if rate:
                deadline += 1.0 / rate
                delay = deadline - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)

        stats.running += 1
        outcome = _ABORTED
        try:
            yield next_token
            if rate and not streamed:
                await asyncio.sleep(tokens / rate)
            outcome = _COMPLETED
        finally:
            stats.running -= 1
            if outcome is _COMPLETED:
                stats.completed += 1
            else:
                stats.aborted += 1

    async def _events(
        self,
        request: web.Request,
        head: Sequence[bytes],
        token: Callable[[int], bytes],
        tokens: int,
        tail: Callable[[], Sequence[bytes]],
    ) -> tuple[web.StreamResponse, bool]:
        """An SSE answer: ``head``, then ``token(i)`` for each token, paced, then ``tail()``;
        cut like the chat streams by ``--die-after-tokens``."""
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        die_after = self.config.die_after_tokens
        try:
            async with self._generation(tokens) as next_token:
                await resp.prepare(request)
                for event in head:
                    await resp.write(event)
                for i in range(tokens):
                    if i == die_after:
                        _abort_connection(request)
                        return resp, False
                    await next_token()
                    await resp.write(token(i))
                for event in tail():
                    await resp.write(event)
                await resp.write_eof()
        except ConnectionError:
            return resp, False
        return resp, True

    async def _messages_body(
        self, request: web.Request, body: dict[str, Any]
    ) -> tuple[web.StreamResponse, bool]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _ApiError(400, "Field required: 'messages' (a non-empty list)")
        if body.get("max_tokens") is None:
            raise _ApiError(400, "Field required: 'max_tokens'")
        max_tokens = _max_tokens(body.get("max_tokens"), self.config.max_model_len)
        prompt = _count_tokens(messages) + _count_tokens(body.get("system"))
        message_id = f"chatcmpl-{os.urandom(8).hex()}"  # vLLM answers with the chat id
        usage = {"input_tokens": prompt, "output_tokens": max_tokens}
        if not body.get("stream"):
            async with self._generation(max_tokens):
                pass
            return web.json_response(
                {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "text", "text": "tok " * max_tokens}],
                    "model": self.config.model,
                    "stop_reason": "max_tokens",
                    "usage": usage,
                }
            ), True
        # vLLM 0.32 dumps each event with exclude_unset: the fields it sets, in field order.
        start = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": self.config.model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": 0},
        }
        text_block = {"type": "text", "text": ""}
        head = (
            _event("message_start", {"type": "message_start", "message": start}),
            _event(
                "content_block_start",
                {"type": "content_block_start", "content_block": text_block, "index": 0},
            ),
        )
        text_delta = {"type": "text_delta", "text": "tok "}
        delta = _event(
            "content_block_delta", {"type": "content_block_delta", "delta": text_delta, "index": 0}
        )
        stop = {"stop_reason": "max_tokens", "stop_sequence": None}
        tail = (
            _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _event("message_delta", {"type": "message_delta", "delta": stop, "usage": usage}),
            _event("message_stop", {"type": "message_stop"}),
        )
        return await self._events(request, head, lambda i: delta, max_tokens, lambda: tail)

    async def _count_tokens_body(
        self, request: web.Request, body: dict[str, Any]
    ) -> tuple[web.StreamResponse, bool]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _ApiError(400, "Field required: 'messages' (a non-empty list)")
        tokens = _count_tokens(messages) + _count_tokens(body.get("system"))
        return web.json_response(
            {
                "input_tokens": tokens,
                "context_management": {"original_input_tokens": tokens},
            }
        ), True

    def _response(
        self, response_id: str, body: dict[str, Any], status: str, prompt: int, tokens: int
    ) -> dict[str, Any]:
        """A ``response`` object as vLLM dumps it (``ResponsesResponse``), with the text of
        ``tokens`` tokens once it is done."""
        done = status == "completed"
        output = [_output_message(response_id, "tok " * tokens, "completed")] if done else []
        usage = (
            {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + tokens,
            }
            if done
            else None
        )
        return {
            "id": response_id,
            "created_at": int(time.time()),
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "metadata": body.get("metadata"),
            "model": self.config.model,
            "object": "response",
            "output": output,
            "parallel_tool_calls": True,
            "temperature": body.get("temperature", 1.0),
            "tool_choice": "auto",
            "tools": [],
            "top_p": body.get("top_p", 1.0),
            "background": bool(body.get("background")),
            "max_output_tokens": body.get("max_output_tokens"),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": None,
            "service_tier": "auto",
            "status": status,
            "text": None,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
        }

    def _store(self, response: dict[str, Any]) -> None:
        stored = self._stored_responses
        stored[response["id"]] = response
        while len(stored) > STORED_RESPONSES:
            stored.popitem(last=False)

    async def _responses_body(
        self, request: web.Request, body: dict[str, Any]
    ) -> tuple[web.StreamResponse, bool]:
        inputs = body.get("input")
        if not isinstance(inputs, str | list) or not inputs:
            raise _ApiError(400, "Field required: 'input' (a string or a list of items)")
        tokens = _max_tokens(body.get("max_output_tokens"), self.config.max_model_len)
        prompt = _count_tokens(inputs)
        response_id = f"resp_{os.urandom(16).hex()}"
        store = body.get("store", True)
        if body.get("background"):
            if not store:
                raise _ApiError(400, "background can only be used when `store` is true")
            queued = self._response(response_id, body, "queued", prompt, 0)
            self._store(queued)
            self._background[response_id] = asyncio.create_task(
                self._run_in_background(queued, body, prompt, tokens)
            )
            return web.json_response(queued), True
        if not body.get("stream"):
            async with self._generation(tokens):
                pass
            done = self._response(response_id, body, "completed", prompt, tokens)
            if store:
                self._store(done)
            return web.json_response(done), True
        return await self._stream_response(request, response_id, body, prompt, tokens, store)

    async def _run_in_background(
        self, queued: dict[str, Any], body: dict[str, Any], prompt: int, tokens: int
    ) -> None:
        queued["status"] = "in_progress"
        try:
            async with self._generation(tokens):
                pass
        finally:
            self._background.pop(queued["id"], None)
        self._store(self._response(queued["id"], body, "completed", prompt, tokens))

    async def _stream_response(
        self,
        request: web.Request,
        response_id: str,
        body: dict[str, Any],
        prompt: int,
        tokens: int,
        store: bool,
    ) -> tuple[web.StreamResponse, bool]:
        """vLLM's event stream of a response: ``event: TYPE`` and ``data: {...}`` per event,
        each with its ``sequence_number``."""
        item_id = f"msg_{response_id[5:]}"
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        running = self._response(response_id, body, "in_progress", prompt, 0)
        numbers = itertools.count()

        def event(kind: str, **fields: Any) -> bytes:
            return _event(kind, {"type": kind, "sequence_number": next(numbers), **fields})

        text = "tok " * tokens
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        head = (
            event("response.created", response=running),
            event("response.in_progress", response=running),
            event(
                "response.output_item.added",
                output_index=0,
                item=_output_message(response_id, "", "in_progress"),
            ),
            event("response.content_part.added", **where, part=part),
        )

        def delta(i: int) -> bytes:
            return event("response.output_text.delta", **where, delta="tok ", logprobs=[])

        def tail() -> list[bytes]:
            done = self._response(response_id, body, "completed", prompt, tokens)
            if store:
                self._store(done)
            return [
                event("response.output_text.done", **where, text=text, logprobs=[]),
                event("response.content_part.done", **where, part={**part, "text": text}),
                event("response.output_item.done", output_index=0, item=done["output"][0]),
                event("response.completed", response=done),
            ]

        return await self._events(request, head, delta, tokens, tail)

    async def _pooling_body(
        self, request: web.Request, body: dict[str, Any]
    ) -> tuple[web.StreamResponse, bool]:
        inputs = _texts(body)
        return web.json_response(
            self._pooled(
                "pool",
                inputs,
                [
                    {"index": i, "object": "pooling", "data": _embedding(text)}
                    for i, text in enumerate(inputs)
                ],
            )
        ), True

    async def _classify_body(
        self, request: web.Request, body: dict[str, Any]
    ) -> tuple[web.StreamResponse, bool]:
        inputs = _texts(body)
        data = []
        for i, text in enumerate(inputs):
            first = (zlib.crc32(text.encode()) % 100) / 100
            probs = [first, 1.0 - first]
            label = CLASS_LABELS[probs.index(max(probs))]
            data.append({"index": i, "label": label, "probs": probs, "num_classes": 2})
        return web.json_response(self._pooled("classify", inputs, data)), True

    def _pooled(self, kind: str, inputs: list[str], data: list[Any]) -> dict[str, Any]:
        tokens = sum(map(_count_tokens, inputs))
        return {
            "id": f"{kind}-{os.urandom(8).hex()}",
            "object": "list",
            "created": int(time.time()),
            "model": self.config.model,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }


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
        prog="python -m simulator",
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
        help="max_model_len reported by /v1/models; max_tokens past it is a 400, as in vLLM",
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
    add(
        "--enable-sleep-mode",
        action="store_true",
        help="serve vLLM's sleep API (with VLLM_SERVER_DEV_MODE=1, as vLLM needs)",
    )
    add("--sleep-delay", type=float, default=0.0, metavar="S", help="seconds a sleep takes")
    add("--wake-delay", type=float, default=0.0, metavar="S", help="seconds a wake_up takes")
    add("--fail-wake", action="store_true",
        help="fault: every wake_up answers 500 and the engine stays asleep")
    add("--start-asleep", action="store_true",
        help="start asleep at level 1, as a server an earlier gateway put to sleep")
    add(
        "--enable-lora",
        action="store_true",
        help="serve vLLM's LoRA adapter API (with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, as "
        "vLLM needs)",
    )
    add("--max-loras", type=int, default=1, help="accepted, as vLLM's; not enforced")
    add("--max-lora-rank", type=int, default=16, help="accepted, as vLLM's")
    add("--lora-load-delay", type=float, default=0.0, metavar="S",
        help="seconds a LoRA adapter load takes")
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
            enable_sleep_mode=args.enable_sleep_mode,
            server_dev_mode=os.environ.get("VLLM_SERVER_DEV_MODE", "0") not in ("", "0"),
            sleep_delay=args.sleep_delay,
            wake_delay=args.wake_delay,
            keep_alive=args.keep_alive,
            fail_wake=args.fail_wake,
            start_asleep=args.start_asleep,
            enable_lora=args.enable_lora,
            runtime_lora=lora.enabled_by(os.environ),
            lora_load_delay=args.lora_load_delay,
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

