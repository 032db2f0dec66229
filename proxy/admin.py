"""The operator's API under ``/admin``: the models and their state, load, unload, drain.

It exists only when ``[admin] token`` (or ``GATEWAY_ADMIN_TOKEN``) is set; otherwise ``/admin``
is an unknown path (404) like any other. Every request must carry ``Authorization: Bearer
TOKEN``: none gets 401, another token 403 (compared as in ``middleware.auth``). Errors have the
OpenAI shape.

- ``GET /admin/models``: each model's state, leases, queue depth, requests in flight, last use,
  VRAM, address, launcher and last failure, its LoRA adapters and the replicas each is loaded
  on (and each replica's, least recently used first); and whether the gateway drains. With
  ``[cluster]``, ``cluster`` too (``cluster.node``): this member, whether it owns the pool, and
  the members and the owner (its token, since when, lease ages) read from Redis for the call.
- ``POST /admin/models/{name}/load``: start the model as a request would; answers once it is
  ready (or with the error a request would get).
- ``POST /admin/models/{name}/unload``: no new leases, those in flight finish, then the server
  stops; answers once it has stopped. A request that comes meanwhile starts it again.
- ``POST /admin/models/{name}/sleep``: put an idle model with ``sleep_level`` to sleep now
  (409 if it has no ``sleep_level`` or is not ready with no request); answers once it sleeps
  (or was stopped instead, when its server has no sleep API).
- ``POST /admin/models/{name}/wake``: wake an asleep model as a request would; answers once it
  is ready.
- ``POST /admin/reload``: read the configuration again and put it in force (``proxy.reload``):
  200 with what changed (models added, removed, restarted, changed in place; other keys) and
  the new ``config_hash``; 400 ``invalid_config`` with the one-line error, or 409
  ``reload_refused`` naming the keys that cannot change live; either way nothing changed.
  ``GET /admin/models`` shows the hash in force, the reloads and the last one (``config``), and
  the models a reload removed that still finish their requests (``retiring``).
- ``GET /admin/tenants``: each tenant (``[[tenants]]``, and ``default``): its limits, its
  requests in this gateway now (queued or answering), the requests and tokens in its rate
  windows (the last minute), and its usage per model since the start (with ``[cluster]``, of
  every gateway sharing the Redis): requests, prompt and completion tokens, errors, seconds
  waited for a slot. Keys are never shown.
- ``POST /admin/drain``: the whole gateway stops taking requests, as on SIGTERM, but keeps
  running; answers at once (202). ``GET /admin/models`` then shows what is still in flight.
- ``GET /admin/events``: the same state, and each request as it ends, as a live stream of
  server-sent events (``telemetry.events``).
- ``GET /admin/ui``: the dashboard (``proxy.dashboard``), a page that asks for the token
  itself: it is the one path here that needs none (a browser cannot send it on navigation).

Each model lists the ``actions`` (verbs) it offers now, the ones ``VERBS`` gives its state
(sleep and wake only to a model with ``sleep_level``); the dashboard shows a button for each. A
verb it does not offer now is answered 409 ``invalid_state``, naming the state, and does nothing;
one that would start a model, while the gateway drains, 503 ``shutting_down``.

A model's name may hold slashes (``org/model``): the name is what lies between
``/admin/models/`` and the last segment.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from backends.gpu import NvmlMemory
from backends.pool import ModelState
from kernel.errors import GatewayError, not_found
from kernel.types import Receive, Scope, Send
from middleware.auth import Keys, bearer_token
from middleware.draining import shutting_down

from . import dashboard
from .routes import method_not_allowed, no_route, respond_json

if TYPE_CHECKING:
    from backends.pool import Backend

    from .app import Gateway

MODELS = "/admin/models"
# The verbs that apply to a model in each state: nothing to do is no verb (no load for a ready
# model, no sleep for an asleep one), nor is what a transition under way does already.
VERBS: dict[ModelState, tuple[str, ...]] = {
    ModelState.STOPPED: ("load",),
    ModelState.FAILED: ("load",),  # a start again (within its backoff: the backoff's 503)
    ModelState.STARTING: ("unload",),
    ModelState.READY: ("unload", "sleep"),
    ModelState.DRAINING: (),  # an unload under way
    ModelState.STOPPING: (),
    ModelState.ASLEEP: ("unload", "wake"),
    ModelState.WAKING: ("unload",),
}
# Verbs only a model with ``sleep_level`` has, and verbs that start a model.
SLEEP_VERBS = frozenset({"sleep", "wake"})
STARTING_VERBS = frozenset({"load", "wake"})


class AdminApi:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        token = gateway.config.admin.token
        self.token = Keys([token]) if token else None
        self._actions: dict[str, Callable[[str], Awaitable[None]]] = {
            "load": self._load, "unload": self._unload, "sleep": self._sleep,
            "wake": self._load}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if self.token is None:
            raise no_route(path)
        if path == "/admin/ui":
            _allow(scope, "GET")
            await dashboard.page(send)
            return
        token = bearer_token(scope)
        if token is None:
            raise GatewayError(401, "The admin API needs 'Authorization: Bearer TOKEN'.",
                               type="authentication_error", code="missing_admin_token",
                               should_retry=False)
        if token not in self.token:
            raise GatewayError(403, "The admin token is not the configured one.",
                               type="permission_error", code="invalid_admin_token",
                               should_retry=False)
        if path == MODELS:
            _allow(scope, "GET")
            if self.gateway.node is not None:  # the cluster as it is now, not a heartbeat ago
                await self.gateway.node.view.refresh()
            await respond_json(send, 200, self._models())
        elif path == "/admin/tenants":
            _allow(scope, "GET")
            await respond_json(send, 200, await self._tenants())
        elif path == "/admin/events":
            _allow(scope, "GET")
            await self.gateway.events.stream(receive, send, self.snapshot)
        elif path == "/admin/reload":
            _allow(scope, "POST")
            plan = self.gateway.reloads.reload()
            await respond_json(send, 200, {"status": "applied", **plan.as_json(),
                                           "config_hash": self.gateway.reloads.hash})
        elif path == "/admin/drain":
            _allow(scope, "POST")
            self.gateway.drain()
            await respond_json(send, 202, {"status": "draining",
                                           "in_flight": self.gateway.in_flight})
        else:
            await self._model_action(scope, send)

    async def _model_action(self, scope: Scope, send: Send) -> None:
        path = scope["path"]
        name, _, action = path.removeprefix(MODELS + "/").rpartition("/")
        run = self._actions.get(action)
        if not path.startswith(MODELS + "/") or not name or run is None:
            raise no_route(path)
        _allow(scope, "POST")
        model = self.gateway.config.by_name.get(name)
        if model is None:
            raise not_found(f"The model '{name}' does not exist.", code="model_not_found")
        if action in SLEEP_VERBS and model.sleep_level is None:
            raise GatewayError(409, f"The model '{model.name}' cannot sleep: it has no "
                               "sleep_level.", type="invalid_request_error",
                               code="model_cannot_sleep", should_retry=False)
        if action in STARTING_VERBS and self.gateway.draining:
            raise shutting_down()
        offered = self._offered(model.name)
        if action not in offered:
            state = self.gateway.pool.state_of(model.name).value
            raise GatewayError(409, f"The model '{model.name}' is {state}: {action} does not "
                               f"apply (it offers {', '.join(offered) or 'nothing'} now).",
                               type="invalid_request_error", code="invalid_state",
                               should_retry=False)
        await run(model.name)
        await respond_json(send, 200, self._model(model.name))

    def _offered(self, name: str) -> list[str]:
        """The verbs that apply to the model now, in the order of the API."""
        verbs = VERBS[self.gateway.pool.state_of(name)]
        sleeps = self.gateway.pool.backends[name].settings.sleep_level is not None
        return [verb for verb in self._actions
                if verb in verbs and (sleeps or verb not in SLEEP_VERBS)]

    async def _load(self, name: str) -> None:
        await self.gateway.pool.load(name)

    async def _unload(self, name: str) -> None:
        # Shielded: an unload the operator asked for goes through even if their connection
        # drops while the model drains.
        with anyio.CancelScope(shield=True):
            await self.gateway.pool.unload(name)

    async def _sleep(self, name: str) -> None:
        with anyio.CancelScope(shield=True):  # as an unload: it goes through once asked
            await self.gateway.pool.sleep(name)

    def _models(self) -> dict[str, Any]:
        pool = self.gateway.pool
        models = {"object": "list", "draining": self.gateway.draining,
                  "in_flight": self.gateway.in_flight,
                  "config": self.gateway.reloads.view(),
                  "data": [self._model(name) for name in pool.backends],
                  "retiring": [{"name": name, "reason": model.retired,
                                "replicas": [_replica(r) for r in model.replicas]}
                               for name, model in pool.retiring.items()]}
        if self.gateway.node is not None:
            models["cluster"] = self.gateway.node.snapshot()
        return models

    async def _tenants(self) -> dict[str, Any]:
        tenants = self.gateway.config.tenants
        ledger = self.gateway.ledger
        report = await ledger.report(t.name for t in tenants)
        # With [cluster], every process's requests, from the shared queues.
        shared = self.gateway.shared
        in_flight = (await shared.in_flight_by_tenant(self.gateway.config.default_tenant.name)
                     if shared is not None else ledger.in_flight)
        return {"object": "list", "data": [{
            "name": t.name,
            "limits": {"max_concurrent": t.max_concurrent, "rpm_limit": t.rpm_limit,
                       "tpm_limit": t.tpm_limit, "priority": t.priority, "weight": t.weight,
                       "models": list(t.models) or None},
            "in_flight": in_flight.get(t.name, 0),
            "window": {"requests": report[t.name]["requests"],
                       "tokens": report[t.name]["tokens"]},
            "usage": report[t.name]["usage"],
        } for t in tenants]}

    def snapshot(self) -> dict[str, Any]:
        """What the event stream's ``state`` event holds: the models (and, with
        ``[cluster]``, the members and the pool's owner as read at the last heartbeat) and each
        GPU's memory."""
        return {**self._models(), "time": round(time.time(), 3), "gpus": self._gpus()}

    def _gpus(self) -> list[dict[str, Any]]:
        """Each device a model is placed on (or NVML sees on this host), by engine (None: this
        host): its size, what is used and by whom, read where the pool's ledger reads it (a
        remote engine's from its configured size, never this host's NVML). Without a
        measurement the used figure is the configured VRAM of the models loaded there."""
        pool = self.gateway.pool
        devices = {d for b in pool.servers for d in b.devices}
        if isinstance(pool.ledger.local, NvmlMemory):
            devices.update((None, g) for g in range(pool.ledger.local.devices))
        gpus = []
        for engine, g in sorted(devices, key=lambda d: (d[0] or "", d[1])):
            models = [{"name": b.name, "vram_mb": b.vram_mb} for b in pool.servers
                      if (engine, g) in b.devices and b.occupies_slot()]
            reader = pool.ledger.reader(engine)
            used = reader.used_mb(g)
            gpus.append({"engine": engine, "index": g, "total_mb": reader.total_mb(g),
                         "measured": used is not None,
                         "used_mb": sum(m["vram_mb"] for m in models) if used is None else used,
                         "models": models})
        return gpus

    def _model(self, name: str) -> dict[str, Any]:
        pool = self.gateway.pool
        backend = pool.backends[name]
        replicas = pool.replicas[name]
        return {
            "name": name,
            "state": pool.state_of(name).value,
            "launcher": backend.settings.launcher,
            "address": backend.address,
            "leases": sum(r.leases for r in replicas),
            "queue_depth": self.gateway.accounting.depth(name),
            "in_flight": self.gateway.accounting.in_flight(name),
            "last_used": _wall_clock(max(r.last_used for r in replicas)),
            "vram_mb": backend.vram_mb,
            "measured_vram_mb": backend.measured_vram_mb,
            "starts": sum(r.starts for r in replicas),
            "evictions": sum(r.evictions for r in replicas),
            "sleep_level": backend.settings.sleep_level,
            "sleeps": sum(r.sleeps for r in replicas),
            "wakes": sum(r.wakes for r in replicas),
            "asleep_vram_mb": backend.asleep_vram_mb,
            "failure": backend.failure,
            "max_replicas": backend.settings.max_replicas,
            "min_replicas": backend.settings.min_replicas,
            "scale_ups": pool.models[name].scale_ups,
            "scale_downs": pool.models[name].scale_downs,
            "adapters": [{"name": a.name, "loaded_on": [r.replica for r in replicas
                                                         if pool.adapters.holds(r, a.name)]}
                         for a in backend.settings.adapters],
            "replicas": [_replica(r, pool.adapters.loaded(r)) for r in replicas],
            "actions": self._offered(name),
        }


def _replica(backend: Backend, adapters: list[str]) -> dict[str, Any]:
    return {
        "replica": backend.replica,
        "state": backend.state.value,
        "address": backend.address,
        "in_flight": backend.leases,
        "last_used": _wall_clock(backend.last_used),
        "engine": backend.settings.engine,
        "gpus": list(backend.settings.gpus),
        "starts": backend.starts,
        "failure": backend.failure,
        "adapters": adapters,
    }


def _allow(scope: Scope, method: str) -> None:
    if scope["method"] != method:
        raise method_not_allowed(scope["path"], method)


def _wall_clock(loop_time: float) -> float | None:
    """A time of the event loop's clock as Unix time; the pool's 0 (never) as None."""
    if not loop_time:
        return None
    return round(time.time() - (anyio.current_time() - loop_time), 3)
