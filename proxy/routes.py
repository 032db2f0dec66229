"""The gateway's own routes: liveness, readiness, metrics and the model list."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .metrics import CONTENT_TYPE
from .types import Send

if TYPE_CHECKING:
    from .app import Gateway


async def respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def respond_json(send: Send, status: int, payload: object) -> None:
    await respond(send, status, json.dumps(payload).encode(), b"application/json")


async def health(gateway: Gateway, send: Send) -> None:
    await respond_json(send, 200, {"status": "ok"})


async def ready(gateway: Gateway, send: Send) -> None:
    if gateway.is_ready():
        await respond_json(send, 200, {"status": "ready"})
    else:
        await respond_json(send, 503, {"status": "not ready"})


async def metrics(gateway: Gateway, send: Send) -> None:
    await respond(send, 200, gateway.metrics.render(), CONTENT_TYPE.encode())


async def models(gateway: Gateway, send: Send) -> None:
    data = [{"id": m.name, "object": "model", "created": 0, "owned_by": "vllm-gateway",
             "aliases": list(m.aliases)} for m in gateway.config.models]
    await respond_json(send, 200, {"object": "list", "data": data})


GET_ROUTES = {"/health": health, "/ready": ready, "/metrics": metrics, "/v1/models": models}
