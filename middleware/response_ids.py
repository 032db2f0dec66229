"""Stored responses: ``GET /v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel`` go to the
server that created the response.

A response lives in the memory of the vLLM server that made it, and those requests name no
model, so the gateway remembers which model answered each response id it relayed, and which of
its servers (a replica, and which run of it): from the JSON answer of ``POST /v1/responses``, or
from the first event of its stream (``response.created``). The requests for the response go to
that server; if it has stopped since, the response is gone with it (404, and no server is
started for it). It keeps the last ``gateway.max_response_ids`` ids (least recently used out
first); an id it does not know is 404. Only a successful answer is read, and only so much of it
(``PEEK_BYTES``): the id comes first.
"""

from __future__ import annotations

import json
from collections import OrderedDict

from kernel.config import ModelSettings
from kernel.context import STATE, RequestState, Server
from kernel.errors import not_found
from kernel.types import SSE, ASGIApp, Message, Receive, Scope, Send

CREATE_PATH = "/v1/responses"
PREFIX = CREATE_PATH + "/"
CANCEL = "/cancel"
# An answer (or a stream's first event) longer than this is not read for its id.
PEEK_BYTES = 1024 * 1024


def stored_response(path: str) -> tuple[str, str] | None:
    """``(id, method)`` for a path of a stored response: GET to retrieve, POST to cancel."""
    if not path.startswith(PREFIX):
        return None
    rest = path[len(PREFIX):]
    rest, cancel = (rest[:-len(CANCEL)], True) if rest.endswith(CANCEL) else (rest, False)
    if not rest or "/" in rest:
        return None
    return rest, "POST" if cancel else "GET"


class ResponseIds:
    """Which model, and which server of it, answered each of the last ``size`` response ids."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._made: OrderedDict[str, tuple[ModelSettings, Server | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._made)

    def remember(self, response_id: str, model: ModelSettings,
                 server: Server | None = None) -> None:
        self._made[response_id] = model, server
        self._made.move_to_end(response_id)
        if len(self._made) > self.size:
            self._made.popitem(last=False)

    def made(self, response_id: str) -> tuple[ModelSettings, Server | None]:
        """The model that made the response, and its server where known; 404 if unknown."""
        made = self._made.get(response_id)
        if made is None:
            raise not_found(f"No response with id '{response_id}' was made through this "
                            "gateway (or it is no longer remembered).",
                            code="response_not_found", param="response_id")
        self._made.move_to_end(response_id)
        return made


def _id_of(payload: bytes) -> str | None:
    try:
        answer = json.loads(payload)
    except ValueError:
        return None
    if isinstance(answer, dict) and isinstance(answer.get("response"), dict):
        answer = answer["response"]  # the response.created event
    response_id = answer.get("id") if isinstance(answer, dict) else None
    return response_id if isinstance(response_id, str) and response_id else None


def _event_data(event: bytes) -> bytes:
    return b"\n".join(line[5:].lstrip(b" ") for line in event.splitlines()
                      if line.startswith(b"data:"))


class _IdReader:
    """Reads one answer for its response id, as it goes by."""

    __slots__ = ("chunks", "length", "size", "sse")

    def __init__(self, sse: bool, length: int | None) -> None:
        self.sse = sse
        self.length = length  # the answer's content-length, where it has one
        self.chunks: list[bytes] = []
        self.size = 0

    def feed(self, body: bytes, ended: bool) -> tuple[bool, str | None]:
        """Whether reading is over, and the id if it was found."""
        self.chunks.append(body)
        self.size += len(body)
        # Whole with its last byte, not with the empty message that may follow it: the client
        # may ask for the response before that message is relayed.
        ended = ended or (self.length is not None and self.size >= self.length)
        if not (ended or self.sse):
            return self.size > PEEK_BYTES, None
        seen = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        if not self.sse:
            return True, _id_of(seen)
        # The first event with data: comments before it (the loading feedback's, a blank line)
        # are skipped, and not kept.
        complete, _, rest = seen.rpartition(b"\n\n")
        for event in complete.split(b"\n\n"):
            data = _event_data(event)
            if data:
                return True, _id_of(data)
        self.chunks = [rest]
        return ended or self.size > PEEK_BYTES, None


class RememberResponseIds:
    """Wraps ``POST /v1/responses``: reads the id off the answer the backend gives."""

    def __init__(self, app: ASGIApp, *, ids: ResponseIds) -> None:
        self.app = app
        self.ids = ids

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        reader: _IdReader | None = None

        async def remembering(message: Message) -> None:
            nonlocal reader
            if message["type"] == "http.response.start":
                if message["status"] == 200:
                    sse, length = False, None
                    for key, value in message.get("headers", ()):
                        name = key.lower()
                        if name == b"content-type":
                            sse = value.startswith(SSE)
                        elif name == b"content-length" and value.isdigit():
                            length = int(value)
                    reader = _IdReader(sse, length)
            elif reader is not None:
                done, response_id = reader.feed(message.get("body", b""),
                                                not message.get("more_body", False))
                if done:
                    reader = None
                    state: RequestState = scope[STATE]
                    model = state.model
                    if response_id is not None and model is not None:
                        self.ids.remember(response_id, model, state.server)
            await send(message)

        await self.app(scope, receive, remembering)
