"""ModelConcurrencyLimit: per-model slots, FIFO waits bounded in time, released exactly once.

The layer runs inside QueueDepthLimit, as in the gateway: that one joins each request to the
accounting and leaves it, this one takes the slot in between."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint

from kernel.accounting import InMemoryAccounting
from kernel.config import Config
from kernel.context import STATE
from kernel.fair_accounting import in_memory_accounting
from kernel.types import ASGIApp, Receive, Scope, Send
from middleware.concurrency import ModelConcurrencyLimit
from middleware.queue_depth import QueueDepthLimit
from telemetry.metrics import GatewayMetrics
from tests.support import make_config, sim_model

from .asgi import Client, admitted_scope, call, settle, start

pytestmark = pytest.mark.anyio


def config(*, total: int | None = None, timeout: float = 5.0) -> Config:
    return make_config([sim_model("a"), sim_model("b", max_concurrent=1)],
                       gateway={"max_concurrent": 2, "max_concurrent_total": total,
                                "queue_timeout": timeout})


def slots(inner: ASGIApp, cfg: Config, metrics: GatewayMetrics | None = None,
          ) -> tuple[QueueDepthLimit, InMemoryAccounting]:
    """The slots layer inside the queue layer, around ``inner``, and their accounting."""
    metrics = metrics or GatewayMetrics()
    accounting = in_memory_accounting(cfg)
    semaphores = ModelConcurrencyLimit(inner, config=cfg, metrics=metrics, accounting=accounting)
    return QueueDepthLimit(semaphores, config=cfg, metrics=metrics,
                           accounting=accounting), accounting


class Held:
    """An inner app that answers, then holds its slot until its request is told to finish."""

    def __init__(self) -> None:
        self.finish: dict[int, anyio.Event] = {}
        self.order: list[int] = []

    def request(self, cfg: Config, model: str, number: int) -> Scope:
        scope = admitted_scope(cfg, model)
        scope["number"] = number
        self.finish[number] = anyio.Event()
        return scope

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        number = scope["number"]
        self.order.append(number)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        await self.finish[number].wait()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def test_at_most_max_concurrent_requests_of_a_model_run_at_once() -> None:
    cfg = config()
    inner = Held()
    limit, accounting = slots(inner, cfg)
    async with anyio.create_task_group() as tg:
        clients = [await start(tg, limit, inner.request(cfg, "a", n)) for n in range(3)]
        assert inner.order == [0, 1]
        assert accounting.in_flight("a") == 2
        assert clients[2].sent == []
        inner.finish[0].set()
        await settle()
        assert inner.order == [0, 1, 2]
        inner.finish[1].set()
        inner.finish[2].set()
    assert accounting.in_flight("a") == 0
    assert [c.status for c in clients] == [200, 200, 200]


async def test_a_model_with_its_own_limit_uses_it_and_models_do_not_share_slots() -> None:
    cfg = config()
    inner = Held()
    limit, accounting = slots(inner, cfg)
    async with anyio.create_task_group() as tg:
        for n in range(2):
            await start(tg, limit, inner.request(cfg, "b", n))
        await start(tg, limit, inner.request(cfg, "a", 2))
        assert inner.order == [0, 2]
        assert (accounting.in_flight("a"), accounting.in_flight("b")) == (1, 1)
        for event in inner.finish.values():
            event.set()
    assert inner.order == [0, 2, 1]


async def test_waiters_get_the_slot_in_the_order_they_came() -> None:
    cfg = config()
    inner = Held()
    limit, _ = slots(inner, cfg)
    async with anyio.create_task_group() as tg:
        await start(tg, limit, inner.request(cfg, "b", 0))
        for n in range(1, 6):
            await start(tg, limit, inner.request(cfg, "b", n))
        for n in range(6):
            inner.finish[n].set()
            await settle()
    assert inner.order == [0, 1, 2, 3, 4, 5]


async def test_the_requests_tenant_orders_the_queue() -> None:
    """The tenant the client keys layer found: a higher priority first, equal ones by turns,
    one at its max_concurrent (over every model) passed over; the places the feedback reads say
    the grant order."""
    cfg = make_config([sim_model("a"), sim_model("b", max_concurrent=1)],
                      tenants=[{"name": "low", "priority": -1}, {"name": "high", "priority": 1},
                               {"name": "other", "priority": 1},
                               {"name": "capped", "priority": 1, "max_concurrent": 1}])
    tenants = {t.name: t for t in cfg.tenants}
    inner = Held()
    limit, accounting = slots(inner, cfg)
    scopes = []
    async with anyio.create_task_group() as tg:
        for n, (model, name) in enumerate([("a", "capped"), ("b", "other"), ("b", "low"),
                                           ("b", "high"), ("b", "high"), ("b", "other"),
                                           ("b", "capped")]):
            scope = inner.request(cfg, model, n)
            scope[STATE].tenant = tenants[name]
            scopes.append(scope)
            await start(tg, limit, scope)
        assert [accounting.position(s[STATE].ticket) for s in scopes[2:]] == [5, 1, 4, 2, 3]
        for n in (1, 3, 5, 4, 2):
            inner.finish[n].set()
            await settle()
        # The capped one waits while b's slot is free: its tenant holds a slot of a.
        assert (accounting.in_flight("b"), accounting.depth("b")) == (0, 1)
        inner.finish[0].set()
        await settle()
        inner.finish[6].set()
    assert inner.order == [0, 1, 3, 5, 4, 2, 6]
    assert accounting.in_flight("b") == accounting.depth("b") == 0


async def test_a_request_leaves_the_queue_when_it_gets_its_slot() -> None:
    cfg = config()
    inner = Held()
    limit, accounting = slots(inner, cfg)
    async with anyio.create_task_group() as tg:
        await start(tg, limit, inner.request(cfg, "b", 0))
        await start(tg, limit, inner.request(cfg, "b", 1))
        assert accounting.depth("b") == 1
        inner.finish[0].set()
        await settle()
        assert accounting.depth("b") == 0
        inner.finish[1].set()


async def test_the_slot_is_held_until_the_last_byte_went_out() -> None:
    cfg = config()
    inner = Held()
    limit, accounting = slots(inner, cfg)
    async with anyio.create_task_group() as tg:
        client = await start(tg, limit, inner.request(cfg, "b", 0))
        assert client.status == 200
        assert accounting.in_flight("b") == 1
        inner.finish[0].set()
        await settle()
        assert client.sent[-1] == {"type": "http.response.body", "body": b"",
                                   "more_body": False}
        assert accounting.in_flight("b") == 0


async def test_a_wait_past_the_queue_timeout_is_a_503_with_retry_after() -> None:
    cfg = config(timeout=0.05)
    inner = Held()
    metrics = GatewayMetrics()
    limit, accounting = slots(inner, cfg, metrics)
    async with anyio.create_task_group() as tg:
        await start(tg, limit, inner.request(cfg, "b", 0))
        began = anyio.current_time()
        late = await call(limit, inner.request(cfg, "b", 1))
        waited = anyio.current_time() - began
        assert 0.05 <= waited < 1.0
        assert late.status == 503
        assert late.headers["retry-after"] == "1"
        error = late.error()
        assert error["type"] == "service_unavailable_error"
        assert error["code"] == "queue_timeout"
        assert accounting.depth("b") == 0
        assert inner.order == [0]
        assert accounting.in_flight("b") == 1
        assert metrics.registry.get_sample_value(
            "gateway_rejected_total", {"model": "b", "reason": "queue_timeout"}) == 1
        inner.finish[0].set()
    assert accounting.in_flight("b") == 0


async def test_a_client_gone_while_waiting_leaves_at_once_with_nothing_sent() -> None:
    cfg = config()
    inner = Held()
    limit, accounting = slots(inner, cfg)
    async with anyio.create_task_group() as tg:
        await start(tg, limit, inner.request(cfg, "b", 0))
        leaver = await start(tg, limit, inner.request(cfg, "b", 1))
        leaver.disconnect()
        await settle()
        assert accounting.depth("b") == 0
        assert leaver.sent == []
        # Its place in line is gone: the next request comes right after the holder.
        await start(tg, limit, inner.request(cfg, "b", 2))
        inner.finish[0].set()
        await settle()
        assert inner.order == [0, 2]
        inner.finish[2].set()
    assert accounting.in_flight("b") == 0


async def test_the_inner_app_reads_what_came_while_the_request_waited() -> None:
    """The watch for a disconnect reads the replayed body while the request waits; the inner
    app must still get it."""
    cfg = config()
    inner = Held()
    got: list[Any] = []

    async def reads_first(scope: Scope, receive: Receive, send: Send) -> None:
        got.append(await receive())
        await inner(scope, receive, send)

    limit, _ = slots(reads_first, cfg)
    async with anyio.create_task_group() as tg:
        await start(tg, limit, inner.request(cfg, "b", 0))
        waiting = await start(tg, limit, inner.request(cfg, "b", 1),
                              Client.with_body(b'{"model": "b"}'))
        assert waiting.received == 1
        inner.finish[0].set()
        await settle()
        inner.finish[1].set()
    assert got[1] == {"type": "http.request", "body": b'{"model": "b"}', "more_body": False}
    assert waiting.status == 200


@pytest.mark.parametrize("outcome", ["raises", "cancelled"])
async def test_the_slot_is_released_when_the_inner_app_fails_or_is_cancelled(
        outcome: str) -> None:
    cfg = config()
    calls = 0

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            if outcome == "raises":
                raise RuntimeError("upstream exploded")
            await anyio.sleep_forever()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limit, accounting = slots(inner, cfg)
    with anyio.move_on_after(0.05), contextlib.suppress(RuntimeError):
        await call(limit, admitted_scope(cfg, "b"))
    assert accounting.in_flight("b") == 0
    # The slot really is free again: the next request gets it at once.
    with anyio.fail_after(1):
        assert (await call(limit, admitted_scope(cfg, "b"))).status == 200


async def cancel_a_waiter_while_its_slot_frees(cfg: Config, steps: int) -> None:
    inner = Held()
    queue, accounting = slots(inner, cfg)

    waiter = anyio.CancelScope()

    async def wait_in_line() -> None:
        with waiter:
            await call(queue, inner.request(cfg, "a", 1))

    async with anyio.create_task_group() as tg:
        await start(tg, queue, inner.request(cfg, "a", 0))
        tg.start_soon(wait_in_line)
        await settle()
        assert accounting.depth("a") == 1
        inner.finish[0].set()
        for _ in range(steps):
            await checkpoint()
        waiter.cancel()
        await settle()
        assert accounting.depth("a") == 0, steps
        assert accounting.in_flight("a") == 0, steps
        # Whatever the cancelled waiter took, it gave back: the next request runs at once.
        await start(tg, queue, inner.request(cfg, "a", 2))
        assert accounting.in_flight("a") == 1, steps
        assert inner.order[-1] == 2
        inner.finish[2].set()
    assert (accounting.depth("a"), accounting.in_flight("a")) == (0, 0)


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("total", [None, 1])
async def test_a_waiter_cancelled_at_any_point_releases_exactly_what_it_took(
        total: int | None, replicas: int) -> None:
    """Cancel a waiter after each number of scheduling steps while its slot is being freed, so
    the cancellation lands before, during and after the handover; nothing may leak or double.
    With replicas (one ready: the model's slots are one replica's), the same."""
    cfg = make_config([sim_model("a", max_concurrent=1, max_queue_size=5,
                                 max_replicas=replicas)],
                      gateway={"queue_timeout": 5.0, "max_concurrent_total": total})
    for steps in range(25):
        await cancel_a_waiter_while_its_slot_frees(cfg, steps)


async def test_a_model_with_replicas_has_the_slots_of_each_ready_replica() -> None:
    cfg = make_config([sim_model("a", max_concurrent=2, max_replicas=3)],
                      gateway={"max_models_concurrent": 3})
    inner = Held()
    limit, accounting = slots(inner, cfg)
    async with anyio.create_task_group() as tg:
        # None ready yet: one replica's slots, so that requests may start the first.
        for n in range(6):
            await start(tg, limit, inner.request(cfg, "a", n))
        assert inner.order == [0, 1]
        assert accounting.oldest_wait("a") is not None
        # A second replica ready: two more, in the order they came.
        accounting.serving("a", 2)
        await settle()
        assert sorted(inner.order) == [0, 1, 2, 3]
        accounting.serving("a", 3)
        await settle()
        # (Two handed out at once run in the order the event loop wakes them.)
        assert sorted(inner.order) == [0, 1, 2, 3, 4, 5]
        assert accounting.oldest_wait("a") is None
        # Down to one replica: those in flight finish, a new one waits for room below two.
        accounting.serving("a", 1)
        for n in range(4):
            inner.finish[n].set()
        await start(tg, limit, inner.request(cfg, "a", 6))
        await settle()
        assert 6 not in inner.order
        inner.finish[4].set()
        await settle()
        assert inner.order[-1] == 6
        for n in (5, 6):
            inner.finish[n].set()
    assert accounting.in_flight("a") == 0


async def test_max_concurrent_total_bounds_all_models_together() -> None:
    cfg = config(total=2)
    inner = Held()
    limit, accounting = slots(inner, cfg)
    async with anyio.create_task_group() as tg:
        await start(tg, limit, inner.request(cfg, "a", 0))
        await start(tg, limit, inner.request(cfg, "b", 1))
        await start(tg, limit, inner.request(cfg, "a", 2))
        assert inner.order == [0, 1]
        # Request 2 holds a slot of model a but waits for the shared one: not in flight yet.
        assert (accounting.in_flight("a"), accounting.in_flight("b")) == (1, 1)
        assert (accounting.depth("a"), accounting.depth("b")) == (1, 0)
        inner.finish[1].set()
        await settle()
        assert inner.order == [0, 1, 2]
        assert (accounting.in_flight("a"), accounting.in_flight("b")) == (2, 0)
        inner.finish[0].set()
        inner.finish[2].set()
    assert (accounting.in_flight("a"), accounting.in_flight("b")) == (0, 0)


async def test_in_flight_is_exposed_as_a_gauge() -> None:
    cfg = config()
    inner = Held()
    metrics = GatewayMetrics()
    limit, _ = slots(inner, cfg, metrics)
    async with anyio.create_task_group() as tg:
        await start(tg, limit, inner.request(cfg, "a", 0))
        assert metrics.registry.get_sample_value("gateway_in_flight", {"model": "a"}) == 1
        inner.finish[0].set()
    assert metrics.registry.get_sample_value("gateway_in_flight", {"model": "a"}) == 0


async def test_other_scopes_pass_through_without_a_slot() -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    limit = ModelConcurrencyLimit(inner, config=config(), metrics=GatewayMetrics(),
                                  accounting=InMemoryAccounting(config()))
    await call(limit, {"type": "lifespan"})
    assert seen == ["lifespan"]
