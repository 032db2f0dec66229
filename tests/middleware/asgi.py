"""Driving one layer by hand: a request's scope (with the state the first layer makes), a
``receive`` the test feeds, a ``send`` that records, and a way to let every task run until all
of them wait for something."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Any

import anyio
import sniffio
from anyio.abc import TaskGroup

from kernel.config import Config
from kernel.context import STATE, RequestState
from kernel.types import ASGIApp, Message, Scope


def http_scope(*, headers: list[tuple[bytes, bytes]] | None = None, method: str = "POST",
               path: str = "/v1/chat/completions") -> Scope:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1", "method": method, "scheme": "http", "path": path,
            "raw_path": path.encode(), "root_path": "", "query_string": b"",
            "headers": headers if headers is not None else [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
            STATE: RequestState()}


def admitted_scope(config: Config, model: str) -> Scope:
    """A scope as the admission layer leaves it, for the layers below it."""
    scope = http_scope()
    settings = config.by_name[model]
    body = {"model": settings.served_name}
    state = scope[STATE]
    state.model = settings
    state.body_bytes = json.dumps(body).encode()
    return scope


class Client:
    """The server side of one request: what the app will receive, and what it sent.

    ``receive`` takes a message off the queue only after its wait is over, so a ``receive``
    that is cancelled loses nothing (as in hypercorn, whose queues behave the same way).
    """

    def __init__(self, *messages: Message) -> None:
        self._inbox: deque[Message] = deque(messages)
        self._arrived = anyio.Event()
        self.received = 0
        self.sent: list[Message] = []

    @classmethod
    def with_body(cls, body: bytes | dict[str, Any] = b"{}") -> Client:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return cls({"type": "http.request", "body": raw, "more_body": False})

    def push(self, message: Message) -> None:
        self._inbox.append(message)
        self._arrived.set()

    def disconnect(self) -> None:
        self.push({"type": "http.disconnect"})

    @property
    def unread(self) -> int:
        return len(self._inbox)

    async def receive(self) -> Message:
        while not self._inbox:
            await self._arrived.wait()
            self._arrived = anyio.Event()
        self.received += 1
        return self._inbox.popleft()

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        assert len(starts) <= 1, self.sent
        return starts[0]["status"] if starts else None

    @property
    def headers(self) -> dict[str, str]:
        (start,) = [m for m in self.sent if m["type"] == "http.response.start"]
        return {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> dict[str, Any]:
        """The OpenAI error object, after checking the envelope has exactly its four keys."""
        payload = self.json()
        assert list(payload) == ["error"], payload
        assert set(payload["error"]) == {"message", "type", "param", "code"}, payload
        assert self.headers["content-type"] == "application/json"
        assert int(self.headers["content-length"]) == len(self.body)
        return payload["error"]


async def start(tg: TaskGroup, app: ASGIApp, scope: Scope,
                client: Client | None = None) -> Client:
    """Start a request in ``tg`` and let it go as far as it can (requests started one after
    the other arrive in that order: trio runs tasks started together in a random order)."""
    client = client or Client.with_body()
    tg.start_soon(app, scope, client.receive, client.send)
    await settle()
    return client


async def call(app: ASGIApp, scope: Scope, client: Client | None = None) -> Client:
    """Run a request to its end."""
    client = client or Client.with_body()
    await app(scope, client.receive, client.send)
    return client


async def settle() -> None:
    """Return once every other task waits for something (a slot, a message, an event)."""
    if sniffio.current_async_library() == "trio":
        import trio.testing

        await trio.testing.wait_all_tasks_blocked()
        return
    # anyio's own version polls every 0.1 s and overlooks callbacks not yet run (a finished
    # child waking its task group); here nothing is left to run when the loop's ready queue,
    # seen from the one task that runs, is empty.
    loop = asyncio.get_running_loop()
    for _ in range(10_000):
        await asyncio.sleep(0)
        if not loop._ready:  # type: ignore[attr-defined]
            return
    raise AssertionError("some task never waits: a busy loop?")
