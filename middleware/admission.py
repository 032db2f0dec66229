"""Admission: the one place a request body is read, bounded, and searched for its model.

The body is bounded three ways: in size per request (``max_body_bytes``, 413; a declared
``Content-Length`` over it is refused before a byte is read), in time (``body_timeout`` for
the whole body, 408), and in size for the whole gateway (``max_buffered_body_bytes``: the bytes
of every body held by a request in flight, 503 with ``Retry-After`` when full). A request whose
body is refused before it was read whole has the rest read and dropped, within ``LINGER_S``,
before its answer ends: a server that closes a connection with unread bytes resets it, and the
client (or nginx, which sends the whole body first) would lose the answer.

What the body is and which model it names is a ``BodyReader``'s to say, one per content type
(415 for another): it is fed each chunk as it arrives and then names the model, or says that
the body names none. ``JsonBody`` reads JSON and builds nothing but the model's name, so a large
body stalls the event loop a sixth as long as parsing it whole did. The model must be
configured (404 ``model_not_found``; aliases resolve here, and the body is renamed to the served
name), or be one of a model's LoRA adapters: the request then goes to that model's servers as
the adapter (``state.adapter``), its body unchanged (vLLM serves an adapter under its name).
A body that names no model (no ``model``, ``null`` or ``""``, as vLLM takes them) goes to
``gateway.default_model``, else to the only model when there is one, and is renamed to name it
(vLLM checks the name it serves); otherwise it is a 400 that says how to set a default. The
model and the raw bytes go to the request's state, nothing parsed is kept; the body is replayed
to the inner app through ``receive``.

Two kinds of path find their model another way: a form upload (``FORM_PATHS``: must be
``multipart/form-data``, read within the same bounds; the model is the form's ``model`` field,
``FormBody`` with ``middleware/forms.py``), and a stored response (``GET /v1/responses/{id}``,
``POST .../cancel``: no body is read; the model is the one that made the response,
``middleware/response_ids.py``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import anyio
import msgspec
import sniffio

from kernel.config import PREFIX_ROUTING, Config, ModelSettings
from kernel.context import STATE, RequestState
from kernel.errors import ERROR_KEY, GatewayError, bad_request, not_found, unavailable
from kernel.types import ASGIApp, Message, Receive, Scope, Send, header

from .forms import FORM_TYPE, form_model, with_model_field
from .prompt_prefix import prefix_blocks
from .response_ids import ResponseIds, stored_response

# A session named by the client: its requests go to one replica of a model (affinity).
SESSION_HEADER = b"x-session-id"
# Bytes: a larger body for an alias is renamed by appending the served name (JsonBody.renamed).
LARGE_BODY = 1 << 20
# Seconds the rest of a refused body is read for, so the answer reaches the client (above).
LINGER_S = 5.0
# Seconds a client refused for a full budget is told to wait.
BUDGET_RETRY_AFTER = 1


class BodyReader(Protocol):
    """Reads one kind of body as it arrives and names the model it asks for."""

    # Whether the body asks for a stream (``"stream": true``), once ``model`` has read it.
    stream: bool
    # The OpenAI ``user`` field (a session, for replica affinity), once ``model`` has read it.
    user: str | None

    async def feed(self, chunk: bytes) -> None:
        """Take the next chunk (raise GatewayError for a body that cannot be right)."""

    def model(self, body: bytes) -> str | None:
        """The name of the model the whole ``body`` asks for, None if it names none;
        GatewayError for a body that cannot be right."""

    def renamed(self, body: bytes, served_name: str) -> bytes:
        """``body`` asking for ``served_name`` instead (for an alias, or a body that named
        no model)."""


# A reader for a request, made from its Content-Type header (which may carry parameters).
ReaderFactory = Callable[[bytes], BodyReader]


class BodyTooLarge(Exception):
    """The body went past the limit; what is left of it is not kept."""


class ClientGone(Exception):
    """The client disconnected before the request was fully read."""


def _not_json() -> GatewayError:
    return bad_request("The request body is not valid JSON.", code="invalid_json")


def _not_a_name() -> GatewayError:
    return bad_request("The request must name a model: 'model' must be a string.",
                       code="invalid_model", param="model")


def _no_model() -> GatewayError:
    return bad_request("The request names no model and this gateway has no default model: name "
                       "one in 'model' (GET /v1/models lists them), or have the operator set "
                       "gateway.default_model.", code="invalid_model", param="model")


class _Named(msgspec.Struct):
    """The three fields of a body the gateway reads; msgspec skips the rest unbuilt (and
    checks it is JSON), ~6 times as fast as json.loads builds it all."""

    model: object = None
    stream: object = None
    user: object = None


_named = msgspec.json.Decoder(_Named)


class JsonBody:
    """A JSON object with a string ``model`` (the last one, if the body repeats it, as
    json.loads would). Read whole, at the end: msgspec takes ~2-4 ms per MiB, json.loads
    ~18; parsing as it arrives (ijson) would free the loop between pieces, but takes ~3.5 times
    as long in all, and a long string in a body made it quadratic (20 s for 24 MiB)."""

    __slots__ = ("stream", "user")

    def __init__(self, content_type: bytes) -> None:
        """Nothing to take from the Content-Type: JSON is UTF-8, whatever charset it names."""
        self.stream = False
        self.user: str | None = None

    async def feed(self, chunk: bytes) -> None:
        """Nothing to do yet: JSON is read whole, at the end."""

    def model(self, body: bytes) -> str | None:
        try:
            named = _named.decode(body)
        except msgspec.ValidationError:  # valid JSON, not an object
            raise bad_request("The request body must be a JSON object.",
                              code="invalid_json") from None
        except (msgspec.DecodeError, RecursionError):  # RecursionError: nested too deep
            raise _not_json() from None
        name = named.model
        if name is not None and not isinstance(name, str):
            raise _not_a_name()
        self.stream = named.stream is True
        user = named.user
        self.user = user if isinstance(user, str) and user else None
        return name or None

    def renamed(self, body: bytes, served_name: str) -> bytes:
        if len(body) > LARGE_BODY:
            # A later key wins (json.loads, pydantic, msgspec): appending one costs a copy of
            # the bytes, where parsing and writing the body again cost ~25 ms per MiB.
            end = body.rindex(b"}")
            return body[:end] + b', "model": ' + json.dumps(served_name).encode() + b"}"
        parsed = json.loads(body)
        parsed["model"] = served_name
        return json.dumps(parsed).encode()


class FormBody:
    """A multipart form with a ``model`` field (``middleware/forms.py``), read whole, at the
    end; an alias is replaced where the field's value lies in the body, and a form without
    one gets a ``model`` field at its end."""

    __slots__ = ("content_type", "named", "span", "stream", "user")

    def __init__(self, content_type: bytes) -> None:
        self.content_type = content_type  # its boundary
        self.named = False
        self.span: slice | None = None
        self.stream = False  # an upload's answer is not held for feedback
        self.user = None

    async def feed(self, chunk: bytes) -> None:
        """Nothing to do yet: the form is searched once it is whole."""

    def model(self, body: bytes) -> str | None:
        name, self.span = form_model(body, self.content_type)
        self.named = name is not None
        return name

    def renamed(self, body: bytes, served_name: str) -> bytes:
        if not self.named:
            return with_model_field(body, self.content_type, served_name)
        if self.span is None:
            raise bad_request("The form's 'model' field names an alias but is not sent in one "
                              "piece; name the model itself.", code="invalid_form")
        return body[:self.span.start] + served_name.encode() + body[self.span.stop:]


READERS: Mapping[bytes, ReaderFactory] = {b"application/json": JsonBody}
FORM_READERS: Mapping[bytes, ReaderFactory] = {FORM_TYPE: FormBody}
FORM_PATHS = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})


class BodyBudget:
    """The bytes of request bodies the gateway holds now, and the most it may hold."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        self.held -= size


class BudgetFull(Exception):
    """The gateway holds as many body bytes as it may."""


class _Body:
    """One request's body as it is read: its bytes, and the budget they are counted in."""

    __slots__ = ("budget", "chunks", "complete", "counted", "size")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.chunks: list[bytes] = []
        self.size = 0
        self.counted = 0
        self.complete = False

    def count(self, size: int) -> None:
        """Count ``size`` bytes against the budget, beyond those already counted."""
        if size > self.counted:
            if not self.budget.take(size - self.counted):
                raise BudgetFull
            self.counted = size

    def release(self) -> None:
        self.budget.give_back(self.counted)
        self.counted = 0

    async def read(self, receive: Receive, limit: int, reader: BodyReader) -> bytes:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            self.size += len(chunk)
            if self.size > limit:
                raise BodyTooLarge
            self.count(self.size)
            if chunk:
                self.chunks.append(chunk)
                await reader.feed(chunk)
            if not message.get("more_body", False):
                self.complete = True
                chunks, self.chunks = self.chunks, []  # the joined bytes only, from here on
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _drop_rest(receive: Receive) -> None:
    """Read what is left of the request and keep none of it, for LINGER_S at most."""
    with anyio.move_on_after(LINGER_S):
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return


class BodyDeadlines:
    """The deadlines of the body reads in progress on asyncio, all on one timer: a timer of its
    own per request (an anyio cancel scope, asyncio.timeout) cost uvloop ~15-25 us, more than
    the rest of admitting a small body (~8 us), whose read is over before any timer would fire.
    The timer runs only while reads are in progress, once a tick (min(1 s, timeout / 4)), and
    cancels a read past its deadline; on trio a cancel scope is cheap and does it."""

    __slots__ = ("_expired", "_reads", "_timer", "tick", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.tick = min(1.0, timeout / 4)
        self._reads: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def read(self, body: _Body, receive: Receive, limit: int,
                   reader: BodyReader) -> bytes:
        """``body.read``, or TimeoutError once ``timeout`` has passed."""
        if sniffio.current_async_library() != "asyncio":
            with anyio.fail_after(self.timeout):
                return await body.read(receive, limit, reader)
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self._reads[task] = loop.time() + self.timeout
        if self._timer is None:
            self._timer = loop.call_later(self.tick, self._check, loop)
        try:
            return await body.read(receive, limit, reader)
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            task.uncancel()
            raise TimeoutError from None
        finally:
            self._reads.pop(task, None)
            self._expired.discard(task)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for task, due in list(self._reads.items()):
            if due <= now:
                del self._reads[task]
                self._expired.add(task)
                task.cancel()
        self._timer = loop.call_later(self.tick, self._check, loop) if self._reads else None


def _too_large(limit: int) -> GatewayError:
    return bad_request(f"Request body is larger than the limit of {limit} bytes.",
                       code="request_too_large", status=413)


class Admission:
    def __init__(self, app: ASGIApp, *, config: Config,
                 readers: Mapping[bytes, ReaderFactory] = READERS,
                 response_ids: ResponseIds | None = None,
                 budget: BodyBudget | None = None) -> None:
        self.app = app
        self.models = config.by_name
        self.adapters = config.adapters
        default = config.gateway.default_model
        only = config.models[0] if len(config.models) == 1 else None
        # Where a request that names no model goes (None: it is refused).
        self.default = config.by_name[default] if default is not None else only
        self.readers = readers
        if response_ids is None:
            response_ids = ResponseIds(config.gateway.max_response_ids)
        self.response_ids = response_ids
        self.limit = config.gateway.max_body_bytes
        self.timeout = config.gateway.body_timeout
        self.deadlines = BodyDeadlines(self.timeout)
        # Shared with the layer this one replaces at a reload (the bodies it holds still count).
        if budget is None:
            budget = BodyBudget(config.gateway.max_buffered_body_bytes)
        budget.limit = config.gateway.max_buffered_body_bytes
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _Body(self.budget)
        try:
            try:
                raw = await self._admit(scope, receive, body)
            except GatewayError as error:
                body.release()  # nothing of it is kept from here on
                if body.complete:
                    await error.answer(scope, send)
                else:
                    await self._refuse_unread(scope, receive, send, error)
                return
            except ClientGone:
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}

            await self.app(scope, replay, send)
        finally:
            body.release()

    async def _refuse_unread(self, scope: Scope, receive: Receive, send: Send,
                             error: GatewayError) -> None:
        """The error, for a body not read whole: every byte of the answer goes out, the rest of
        the body is dropped, and only then does the answer end (the server then closes or
        reuses a connection with nothing left unread on it)."""
        scope[STATE].error = error.code
        answer = error.body()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [*error.headers(),
                                (b"content-length", str(len(answer)).encode())],
                    ERROR_KEY: error})
        await send({"type": "http.response.body", "body": answer, "more_body": True,
                    ERROR_KEY: error})
        await _drop_rest(receive)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _admit(self, scope: Scope, receive: Receive, body: _Body) -> bytes:
        state: RequestState = scope[STATE]
        stored = stored_response(scope["path"])
        if stored is not None:
            body.complete = True  # there is none to read
            state.model, state.pin = self.response_ids.made(stored[0])
            state.body_bytes = b""
            return b""
        content_type = header(scope, b"content-type") or b""
        form = scope["path"] in FORM_PATHS
        readers = FORM_READERS if form else self.readers
        factory = readers.get(content_type.split(b";")[0].strip().lower())
        if factory is None:
            wanted = "multipart/form-data" if form else ", ".join(t.decode() for t in readers)
            raise GatewayError(415, f"Content-Type must be {wanted}.",
                               type="invalid_request_error", code="unsupported_media_type",
                               should_retry=False)
        length = header(scope, b"content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        if declared is not None and declared > self.limit:
            raise _too_large(self.limit)
        reader = factory(content_type)
        try:
            if declared is not None:
                body.count(declared)
            raw = await self.deadlines.read(body, receive, self.limit, reader)
        except BodyTooLarge:
            raise _too_large(self.limit) from None
        except BudgetFull:
            raise unavailable("The gateway holds as many request bodies as it may; send the "
                              "request again shortly.", code="body_budget_full",
                              retry_after=BUDGET_RETRY_AFTER) from None
        except TimeoutError:
            raise bad_request(f"The request body did not arrive within {self.timeout:g} s.",
                              code="request_timeout", status=408) from None
        name = reader.model(raw)
        if name is None:
            if self.default is None:
                raise _no_model()
            model = self.default
            state.model_default = True
        else:
            state.requested_model = name
            model = self.adapters.get(name)
            if model is not None:
                # vLLM serves an adapter under its own name: the body keeps it.
                state.adapter = name
            else:
                model = self._model(name)
        if name != model.served_name and state.adapter is None:
            raw = reader.renamed(raw, model.served_name)
        state.model = model
        state.stream = reader.stream
        state.body_bytes = raw
        if model.max_replicas > 1:
            # The session whose requests go to one replica: its header, else the body's user.
            session = header(scope, SESSION_HEADER)
            state.session = session.decode("latin-1") if session else reader.user
            if model.routing == PREFIX_ROUTING and state.session is None:
                state.prefix = prefix_blocks(raw, model.prefix_block_chars)
        return raw

    def _model(self, name: str) -> ModelSettings:
        model = self.models.get(name)
        if model is None:
            raise not_found(f"The model '{name}' does not exist.", code="model_not_found",
                            param="model")
        return model
