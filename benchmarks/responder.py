"""A lean OpenAI-shaped backend for the benchmarks: raw asyncio protocol on uvloop.

Run it as ``python -m benchmarks.responder --port N [--tokens-per-second R]``. It answers what
the simulator answers (``simulator/server.py``), in the same shapes, but with a hand-written
HTTP/1.1 parser and pre-built byte templates, so one core serves several times the simulator's
rate and the backend is not what a benchmark measures. It is not a general HTTP server: requests
carry ``Content-Length`` bodies (as httpx, nginx and the openai client send them), keep-alive,
no pipelining of a second request while a stream is running.

* ``GET /health``: 200, empty.
* ``GET /v1/models``: the model list.
* ``POST /v1/chat/completions`` / ``/v1/completions``: ``max_tokens`` tokens (``"tok0 "`` to
  ``"tok9 "`` in turn: a relay may refuse a stream that repeats one chunk, as LiteLLM does),
  non-streaming (one JSON body) or SSE (``"stream": true``, chunked). With R = 0 every event is
  written at once, one ``write`` per event, like the simulator at 0; with R > 0 each token is
  paced at R per second on the loop's timer (no task per stream). Each SSE event carries the
  monotonic time it was written in ``system_fingerprint`` (``"t=<seconds>"``), so a client on
  the same host can tell how long a relay held it.
* ``GET /sim/stats``: counters, as the simulator names them (``requests``, ``running``,
  ``completed``, ``aborted``, ``connections``, ``open_connections``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

STATS_KEYS = ("requests", "running", "completed", "aborted", "connections", "open_connections")

_OK_EMPTY = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
_SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
             b"transfer-encoding: chunked\r\n\r\n")
_DONE_EVENT = b"data: [DONE]\n\n"
_END = b"0\r\n\r\n"


TOKENS = tuple(b"tok%d " % i for i in range(10))
_TEXTS: dict[int, bytes] = {}


def _text(tokens: int) -> bytes:
    """The whole answer of a non-streaming request: the tokens a stream would carry."""
    text = _TEXTS.get(tokens)
    if text is None:
        text = b"".join(TOKENS[i % len(TOKENS)] for i in range(tokens))
        if len(_TEXTS) < 1024:
            _TEXTS[tokens] = text
    return text


def _json_response(status: int, body: bytes, *, close: bool = False) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"Error")
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
            % (status, reason, len(body), b"connection: close\r\n" if close else b"") + body)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _error(status: int, message: str) -> bytes:
    return _json_response(status, json.dumps(
        {"error": {"message": message, "type": "BadRequestError", "param": None,
                   "code": status}}).encode())


class Templates:
    """Byte templates of one model's answers (the model name is echoed from the request)."""

    def __init__(self, model: str) -> None:
        quoted = json.dumps(model).encode().replace(b"%", b"%%")
        head = (b'data: {"id":"chatcmpl-%s","object":"chat.completion.chunk","created":%d,'
                b'"model":' + quoted + b',"system_fingerprint":"t=%.6f","choices":[')
        self.role = head + (b'{"index":0,"delta":{"role":"assistant","content":""},'
                            b'"logprobs":null,"finish_reason":null}]}\n\n')
        self.token = head + (b'{"index":0,"delta":{"content":"%s"},"logprobs":null,'
                             b'"finish_reason":null}]}\n\n')
        self.last = head + (b'{"index":0,"delta":{"content":"%s"},"logprobs":null,'
                            b'"finish_reason":"length","stop_reason":null}]}\n\n')
        self.full = (b'{"id":"chatcmpl-%s","object":"chat.completion","created":%d,"model":'
                     + quoted + b',"choices":[{"index":0,"message":{"role":"assistant",'
                     b'"content":"%s","tool_calls":[]},"logprobs":null,"finish_reason":"length",'
                     b'"stop_reason":null}],"usage":{"prompt_tokens":1,"total_tokens":%d,'
                     b'"completion_tokens":%d},"prompt_logprobs":null}')
        chead = (b'data: {"id":"cmpl-%s","object":"text_completion","created":%d,"model":'
                 + quoted + b',"system_fingerprint":"t=%.6f","choices":[')
        self.c_token = chead + (b'{"index":0,"text":"%s","logprobs":null,'
                                b'"finish_reason":null}]}\n\n')
        self.c_last = chead + (b'{"index":0,"text":"%s","logprobs":null,'
                               b'"finish_reason":"length","stop_reason":null}]}\n\n')
        self.c_full = (b'{"id":"cmpl-%s","object":"text_completion","created":%d,"model":'
                       + quoted + b',"choices":[{"index":0,"text":"%s","logprobs":null,'
                       b'"finish_reason":"length","stop_reason":null}],"usage":'
                       b'{"prompt_tokens":1,"total_tokens":%d,"completion_tokens":%d}}')


class Responder:
    def __init__(self, tokens_per_second: float) -> None:
        self.interval = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0
        self.stats = dict.fromkeys(STATS_KEYS, 0)
        self._templates: dict[str, Templates] = {}
        self._ids = 0

    def templates(self, model: str) -> Templates:
        t = self._templates.get(model)
        if t is None:
            if len(self._templates) > 64:
                self._templates.clear()
            t = self._templates[model] = Templates(model)
        return t

    def next_id(self) -> bytes:
        self._ids += 1
        return b"%x" % self._ids


class Connection(asyncio.Protocol):
    """One client connection: parse requests, answer them one at a time."""

    def __init__(self, responder: Responder, loop: asyncio.AbstractEventLoop) -> None:
        self.r = responder
        self.loop = loop
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a paced answer is being written
        self.timer: asyncio.TimerHandle | None = None
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.r.stats["connections"] += 1
        self.r.stats["open_connections"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.r.stats["open_connections"] -= 1
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self._finish(completed=False)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._process()

    def _process(self) -> None:
        buf = self.buf
        while not self.busy and self.transport is not None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).split(b"\r\n")
            try:
                method, target, _version = head[0].split(b" ", 2)
            except ValueError:
                self._reply(_error(400, "bad request line"), close=True)
                return
            length = 0
            close = False
            for line in head[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value.strip())
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
                elif name == b"transfer-encoding":
                    self._reply(_error(400, "chunked request bodies are not supported"),
                                close=True)
                    return
            if len(buf) < end + 4 + length:
                return
            body = bytes(buf[end + 4:end + 4 + length])
            del buf[:end + 4 + length]
            self.close_after = close
            self._handle(method, target.split(b"?", 1)[0], body)

    def _reply(self, data: bytes, *, close: bool = False) -> None:
        """Write a whole answer; close if asked to (here or by the request)."""
        if self.transport is None:
            return
        self.transport.write(data)
        if close or self.close_after:
            self.transport.close()
            self.transport = None

    def _handle(self, method: bytes, path: bytes, body: bytes) -> None:
        if method == b"GET":
            if path == b"/health":
                self._reply(_OK_EMPTY)
            elif path == b"/v1/models":
                self._reply(_json_response(200, json.dumps({"object": "list", "data": [
                    {"id": "bench", "object": "model", "owned_by": "bench"}]}).encode()))
            elif path == b"/sim/stats":
                self._reply(_json_response(200, json.dumps(self.r.stats).encode()))
            else:
                self._reply(_error(404, "no such route"))
            return
        chat = path == b"/v1/chat/completions"
        if method != b"POST" or not (chat or path == b"/v1/completions"):
            self._reply(_error(404, "no such route"))
            return
        self.r.stats["requests"] += 1
        try:
            request: Any = json.loads(body)
            model = str(request.get("model") or "bench")
            tokens = request.get("max_completion_tokens") or request.get("max_tokens") or 16
            tokens = int(tokens)
            stream = bool(request.get("stream"))
        except (ValueError, AttributeError, TypeError):
            self._reply(_error(400, "invalid JSON body"))
            return
        t = self.r.templates(model)
        self.r.stats["running"] += 1
        ident = self.r.next_id()
        created = int(time.time())
        if not stream:
            full = t.full if chat else t.c_full
            answer = _json_response(200, full % (ident, created, _text(tokens), tokens + 1,
                                                 tokens))
            if self.r.interval:
                self.busy = True
                self.timer = self.loop.call_later(tokens * self.r.interval, self._send_full,
                                                  answer)
            else:
                self._reply(answer)
                self._finish(completed=True)
            return
        if self.transport is None:
            return
        self.transport.write(_SSE_HEAD)
        token, last = (t.token, t.last) if chat else (t.c_token, t.c_last)
        role = t.role if chat else None
        if not self.r.interval:
            write = self.transport.write
            mono = time.monotonic
            if role is not None:
                write(_chunk(role % (ident, created, mono())))
            for i in range(tokens - 1):
                write(_chunk(token % (ident, created, mono(), TOKENS[i % len(TOKENS)])))
            self._reply(_chunk(last % (ident, created, mono(), TOKENS[(tokens - 1) % len(TOKENS)]))
                        + _chunk(_DONE_EVENT) + _END)
            self._finish(completed=True)
            return
        self.busy = True
        state = [ident, created, tokens, role, token, last, self.loop.time(), 0]
        self._tick(state)

    def _tick(self, state: list[Any]) -> None:
        """Write the next token of a paced stream and schedule the one after it."""
        self.timer = None
        transport = self.transport
        if transport is None:
            return
        ident, created, left, role, token, last, deadline, sent = state
        now = time.monotonic()
        text = TOKENS[sent % len(TOKENS)]
        state[7] = sent + 1
        if role is not None:
            transport.write(_chunk(role % (ident, created, now)))
            state[3] = None
        if left <= 1:
            self.busy = False
            self._reply(_chunk(last % (ident, created, now, text)) + _chunk(_DONE_EVENT) + _END)
            self._finish(completed=True)
            self._process()
            return
        transport.write(_chunk(token % (ident, created, now, text)))
        state[2] = left - 1
        state[6] = deadline = deadline + self.r.interval
        self.timer = self.loop.call_at(deadline, self._tick, state)

    def _send_full(self, answer: bytes) -> None:
        self.timer = None
        self.busy = False
        self._reply(answer)
        self._finish(completed=True)
        self._process()

    def _finish(self, *, completed: bool) -> None:
        stats = self.r.stats
        stats["running"] -= 1
        stats["completed" if completed else "aborted"] += 1


async def serve(host: str, port: int, tokens_per_second: float) -> None:
    loop = asyncio.get_running_loop()
    responder = Responder(tokens_per_second)
    server = await loop.create_server(lambda: Connection(responder, loop), host, port,
                                      backlog=4096, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.responder",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens-per-second", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a gateway dependency
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.host, args.port, args.tokens_per_second))
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    os._exit(status)
