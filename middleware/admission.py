"""Admission: the one place a request body is read and parsed.

The body is read up to ``max_body_bytes`` (reading stops there: 413), must be JSON (415 for
another content type, 400 for anything but an object with a string ``model``), and the model
must be configured (404 ``model_not_found``; aliases resolve here). The model and the parsed
body go to ``scope["state"]``, the raw bytes too, so nothing downstream parses again; the body
is replayed to the inner app through ``receive``.

Two kinds of path find their model another way: a form upload (``FORM_PATHS``: must be
``multipart/form-data``, read within the same bounds; the model is the form's ``model`` field,
``middleware/forms.py``), and a stored response (``GET /v1/responses/{id}``, ``POST
.../cancel``: no body is read; the model is the one that made the response,
``middleware/response_ids.py``).
"""

from __future__ import annotations

import json
from typing import Any

from proxy.config import Config, ModelSettings
from proxy.errors import GatewayError, bad_request, not_found
from proxy.types import ASGIApp, Message, Receive, Scope, Send, header, request_state

from .forms import FORM_TYPE, form_model
from .response_ids import ResponseIds, stored_response

JSON_TYPES = (b"application/json",)
FORM_PATHS = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})


class BodyTooLarge(Exception):
    """The body went past the limit; what is left of it is not read."""


class ClientGone(Exception):
    """The client disconnected before the request was fully read."""


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing to read past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> GatewayError:
    return bad_request(f"Request body is larger than the limit of {limit} bytes.",
                       code="request_too_large", status=413)


class Admission:
    def __init__(self, app: ASGIApp, *, config: Config,
                 response_ids: ResponseIds | None = None) -> None:
        self.app = app
        self.models = config.by_name
        self.limit = config.gateway.max_body_bytes
        if response_ids is None:
            response_ids = ResponseIds(config.gateway.max_response_ids)
        self.response_ids = response_ids

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            raw, body, model = await self._admit(scope, receive)
        except GatewayError as error:
            await error.send(send)
            return
        except ClientGone:
            return
        state = request_state(scope)
        state["model"] = model
        state["body"] = body
        state["body_bytes"] = raw
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}

        await self.app(scope, replay, send)

    async def _admit(self, scope: Scope, receive: Receive) -> tuple[bytes, dict[str, Any], Any]:
        stored = stored_response(scope["path"])
        if stored is not None:
            return b"", {}, self.response_ids.model_of(stored[0])
        content_type = header(scope, b"content-type") or b""
        media_type = content_type.split(b";")[0].strip().lower()
        form = scope["path"] in FORM_PATHS
        if form and media_type != FORM_TYPE:
            raise _unsupported("Content-Type must be multipart/form-data.")
        if not form and media_type not in JSON_TYPES:
            raise _unsupported("Content-Type must be application/json.")
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            raise _too_large(self.limit)
        try:
            raw = await read_body(receive, self.limit)
        except BodyTooLarge:
            raise _too_large(self.limit) from None
        if form:
            return self._form(raw, content_type)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than json can go
            raise bad_request("The request body is not valid JSON.", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object.", code="invalid_json")
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise bad_request("The request must name a model: 'model' must be a non-empty string.",
                              code="invalid_model", param="model")
        model = self._model(name)
        if name != model.served_name:
            body["model"] = model.served_name
            raw = json.dumps(body).encode()
        return raw, body, model

    def _form(self, raw: bytes, content_type: bytes) -> tuple[bytes, dict[str, Any], Any]:
        name, span = form_model(raw, content_type)
        model = self._model(name)
        if name != model.served_name:
            if span is None:
                raise bad_request("The form's 'model' field names an alias but is not sent in "
                                  "one piece; name the model itself.", code="invalid_form")
            raw = raw[:span.start] + model.served_name.encode() + raw[span.stop:]
        return raw, {"model": model.served_name}, model

    def _model(self, name: str) -> ModelSettings:
        model = self.models.get(name)
        if model is None:
            raise not_found(f"The model '{name}' does not exist.", code="model_not_found",
                            param="model")
        return model


def _unsupported(message: str) -> GatewayError:
    return GatewayError(415, message, type="invalid_request_error",
                        code="unsupported_media_type", should_retry=False)
