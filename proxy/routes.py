"""The gateway's own routes: liveness, readiness, metrics, the model list and one model.

``/health`` says the process does its work: 200 while it serves HTTP and its pool, the pool's
reaper and the engines' event streams run; 503 with the reason once one of them is gone, so a
liveness probe restarts it (a model that is down is no reason: a restart would not help it).
``/ready`` says it should get traffic: it
runs, it is not draining, and every container engine it uses answers a ping, asked at most once
a second however often the probes come (one ping at a time: probes that come meanwhile share
its answer).
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from backends import engine_api
from backends.container import ContainerEngines, Engine
from kernel.config import ModelSettings, TenantSettings
from kernel.errors import GatewayError, not_found
from kernel.types import Send
from middleware.tenants import model_not_allowed
from telemetry.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from .app import Gateway

# Seconds: a probe's own timeout is commonly 1 s, and a ping's answer is kept as long.
PING_TIMEOUT = 1.0
PING_TTL = 1.0


def no_route(path: str) -> GatewayError:
    return not_found(f"No route {path}.")


def method_not_allowed(path: str, allowed: str) -> GatewayError:
    """405, with the ``Allow`` header HTTP requires of it (``allowed``: "POST", "GET, HEAD")."""
    return GatewayError(405, f"{path} accepts {allowed} only.", type="invalid_request_error",
                        code="method_not_allowed", should_retry=False,
                        headers=((b"allow", allowed.encode()),))


async def respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def respond_json(send: Send, status: int, payload: object) -> None:
    await respond(send, status, json.dumps(payload).encode(), b"application/json")


async def _answers(engine: Engine) -> bool:
    """Whether the engine answers its ping within ``PING_TIMEOUT``."""
    with anyio.move_on_after(PING_TIMEOUT):
        return await engine_api.ping(engine.api)
    return False


class EnginePings:
    """Which container engines do not answer, found out at most once per ``PING_TTL``."""

    def __init__(self, engines: ContainerEngines) -> None:
        self.engines = engines
        self._pinged_at = -math.inf
        self._silent: list[str] = []
        self._pinging: anyio.Lock | None = None

    async def silent(self) -> list[str]:
        if self._pinging is None:
            self._pinging = anyio.Lock()
        async with self._pinging:
            if anyio.current_time() - self._pinged_at >= PING_TTL:
                self._silent = [name for name, engine in self.engines.engines.items()
                                if not await _answers(engine)]
                self._pinged_at = anyio.current_time()
        return self._silent


async def health(gateway: Gateway, send: Send) -> None:
    if problem := gateway.problem():
        await respond_json(send, 503, {"status": "failing", "reason": problem,
                                       "config_hash": gateway.reloads.hash})
    else:
        await respond_json(send, 200, {"status": "ok", "config_hash": gateway.reloads.hash})


async def ready(gateway: Gateway, send: Send) -> None:
    if not gateway.running_now:
        reason = "not started"
    elif gateway.draining:
        reason = "draining"
    elif silent := await gateway.engine_pings.silent():
        reason = f"container engine not answering: {', '.join(silent)}"
    else:
        await respond_json(send, 200, {"status": "ready"})
        return
    await respond_json(send, 503, {"status": "not ready", "reason": reason})


async def metrics(gateway: Gateway, send: Send) -> None:
    await respond(send, 200, await gateway.render_metrics(), CONTENT_TYPE.encode())


def _entry(model: ModelSettings) -> dict[str, object]:
    return {"id": model.name, "object": "model", "created": 0, "owned_by": "vllm-gateway",
            "aliases": list(model.aliases)}


def _adapter_entry(name: str, model: ModelSettings) -> dict[str, object]:
    """A LoRA adapter, as vLLM lists one: ``parent`` is its base model."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "vllm-gateway",
            "parent": model.name}


async def models(gateway: Gateway, send: Send, *, tenant: TenantSettings) -> None:
    """Every configured model the client's tenant may use, then every adapter of each, loaded
    or not."""
    data = [_entry(m) for m in gateway.config.models if tenant.may_use(m.name)]
    data += [_adapter_entry(name, m) for name, m in gateway.config.adapters.items()
             if tenant.may_use(m.name)]
    await respond_json(send, 200, {"object": "list", "data": data})


async def model(gateway: Gateway, send: Send, *, name: str, tenant: TenantSettings) -> None:
    """``GET /v1/models/{name}``: the configured model's entry, found by its name or an alias
    (a name may hold slashes: ``org/model``), or an adapter's, whether or not it is running;
    403 ``model_not_allowed`` for one the client's tenant may not use (as its requests get)."""
    found = gateway.config.by_name.get(name)
    base = found or gateway.config.adapters.get(name)
    if base is None:
        raise not_found(f"The model '{name}' does not exist.", code="model_not_found",
                        param="model")
    if not tenant.may_use(base.name):
        raise model_not_allowed(name)
    await respond_json(send, 200, _entry(found) if found else _adapter_entry(name, base))


Handler = Callable[["Gateway", Send], Awaitable[None]]
# A client route answers as the client's tenant may see it.
ClientHandler = Callable[..., Awaitable[None]]
# Open to anyone who reaches the gateway: probes and the scraper carry no key.
OPEN_ROUTES: dict[str, Handler] = {"/health": health, "/ready": ready, "/metrics": metrics}
# Behind the client API keys, when there are keys.
CLIENT_ROUTES: dict[str, ClientHandler] = {"/v1/models": models}
MODEL_PREFIX = "/v1/models/"  # then a model's name: ``model``
