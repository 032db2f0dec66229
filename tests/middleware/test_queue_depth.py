"""QueueDepthLimit: counts the requests of a model waiting for a slot; 429 beyond the bound."""

from __future__ import annotations

import anyio
import pytest

from kernel.accounting import InMemoryAccounting
from kernel.config import Config
from kernel.context import STATE
from kernel.types import ASGIApp, Receive, Scope, Send
from middleware.concurrency import ModelConcurrencyLimit
from middleware.queue_depth import QueueDepthLimit
from telemetry.metrics import GatewayMetrics
from tests.support import make_config, sim_model

from .asgi import admitted_scope, call, settle, start

pytestmark = pytest.mark.anyio


def config() -> Config:
    return make_config([sim_model("a"), sim_model("b", max_queue_size=1)],
                       gateway={"max_queue_size": 2, "queue_timeout": 5.0})


def layer(inner: ASGIApp, cfg: Config, metrics: GatewayMetrics | None = None,
          ) -> QueueDepthLimit:
    """The queue layer around ``inner``; its accounting is ``layer(...).accounting``."""
    return QueueDepthLimit(inner, config=cfg, metrics=metrics or GatewayMetrics(),
                           accounting=InMemoryAccounting(cfg))


class Waiting:
    """An inner app that stays queued until told: then it takes its slot and answers."""

    def __init__(self) -> None:
        self.go = anyio.Event()
        self.calls = 0
        self.queue: QueueDepthLimit | None = None

    def layer(self, cfg: Config, metrics: GatewayMetrics | None = None) -> QueueDepthLimit:
        self.queue = layer(self, cfg, metrics)
        return self.queue

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        await self.go.wait()
        assert self.queue is not None
        assert await self.queue.accounting.try_acquire(scope[STATE].ticket)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def test_requests_waiting_for_a_slot_are_counted_until_they_get_one() -> None:
    cfg = config()
    inner = Waiting()
    queue = inner.layer(cfg)
    async with anyio.create_task_group() as tg:
        clients = [await start(tg, queue, admitted_scope(cfg, "a")) for _ in range(2)]
        assert queue.accounting.depth("a") == 2
        assert queue.accounting.depth("b") == 0
        inner.go.set()
    assert queue.accounting.depth("a") == 0
    assert [c.status for c in clients] == [200, 200]


async def test_a_request_beyond_the_bound_is_refused_at_once_and_never_counted() -> None:
    cfg = config()
    inner = Waiting()
    metrics = GatewayMetrics()
    queue = inner.layer(cfg, metrics)
    async with anyio.create_task_group() as tg:
        for _ in range(2):
            await start(tg, queue, admitted_scope(cfg, "a"))
        refused = await call(queue, admitted_scope(cfg, "a"))
        assert refused.status == 429
        assert refused.headers["retry-after"] == "5"
        error = refused.error()
        assert error["type"] == "rate_limit_error"
        assert error["code"] == "queue_full"
        assert "'a'" in error["message"]
        assert queue.accounting.depth("a") == 2
        assert inner.calls == 2
        assert metrics.registry.get_sample_value(
            "gateway_rejected_total", {"model": "a", "reason": "queue_full"}) == 1
        inner.go.set()
    assert queue.accounting.depth("a") == 0


async def test_each_model_has_its_own_bound() -> None:
    cfg = config()
    inner = Waiting()
    queue = inner.layer(cfg)
    async with anyio.create_task_group() as tg:
        await start(tg, queue, admitted_scope(cfg, "b"))
        refused = await call(queue, admitted_scope(cfg, "b"))
        assert refused.status == 429
        other = await start(tg, queue, admitted_scope(cfg, "a"))
        assert (queue.accounting.depth("a"), queue.accounting.depth("b")) == (1, 1)
        inner.go.set()
    assert other.status == 200


async def test_retry_after_follows_the_queue_timeout_within_one_to_ten_seconds() -> None:
    for timeout, expected in ((0.2, "1"), (3.0, "3"), (600.0, "10")):
        cfg = make_config([sim_model("a", max_queue_size=1)],
                          gateway={"queue_timeout": timeout})
        queue = Waiting().layer(cfg)
        async with anyio.create_task_group() as tg:
            await start(tg, queue, admitted_scope(cfg, "a"))
            refused = await call(queue, admitted_scope(cfg, "a"))
            assert refused.headers["retry-after"] == expected
            tg.cancel_scope.cancel()


async def test_leaving_the_queue_twice_counts_once() -> None:
    cfg = config()
    seen: list[int] = []
    queue: QueueDepthLimit

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await queue.accounting.leave(scope[STATE].ticket)
        await queue.accounting.leave(scope[STATE].ticket)
        seen.append(queue.accounting.depth("a"))

    queue = layer(inner, cfg)
    async with anyio.create_task_group() as tg:
        for _ in range(2):
            await start(tg, queue, admitted_scope(cfg, "a"))
    assert seen == [0, 0]
    assert queue.accounting.depth("a") == 0


async def test_the_count_drops_at_once_when_a_queued_client_disconnects() -> None:
    """Through the semaphore layer: the leaver's place frees while the slot is still busy."""
    cfg = make_config([sim_model("a", max_concurrent=1, max_queue_size=1)],
                      gateway={"queue_timeout": 5.0})
    done = anyio.Event()

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await done.wait()

    accounting = InMemoryAccounting(cfg)
    semaphores = ModelConcurrencyLimit(inner, config=cfg, metrics=GatewayMetrics(),
                                       accounting=accounting)
    queue = QueueDepthLimit(semaphores, config=cfg, metrics=GatewayMetrics(),
                            accounting=accounting)
    async with anyio.create_task_group() as tg:
        await start(tg, queue, admitted_scope(cfg, "a"))
        leaver = await start(tg, queue, admitted_scope(cfg, "a"))
        assert queue.accounting.depth("a") == 1
        leaver.disconnect()
        await settle()
        assert queue.accounting.depth("a") == 0
        assert accounting.in_flight("a") == 1
        assert leaver.sent == []
        # The freed place is usable at once, while the slot is still taken.
        await start(tg, queue, admitted_scope(cfg, "a"))
        assert queue.accounting.depth("a") == 1
        done.set()
    assert queue.accounting.depth("a") == 0


@pytest.mark.parametrize("how", ["raises", "cancelled"])
async def test_a_request_that_fails_or_is_cancelled_while_queued_is_uncounted(how: str) -> None:
    cfg = config()
    fail = anyio.Event()

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await fail.wait()
        raise RuntimeError("backend pool broke")

    queue = layer(inner, cfg)
    errors: list[BaseException] = []

    async def request() -> None:
        try:
            await call(queue, admitted_scope(cfg, "a"))
        except RuntimeError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(request)
        await settle()
        assert queue.accounting.depth("a") == 1
        if how == "raises":
            fail.set()
        else:
            tg.cancel_scope.cancel()
    assert queue.accounting.depth("a") == 0
    assert len(errors) == (how == "raises")


async def test_the_depth_is_exposed_as_a_gauge() -> None:
    cfg = config()
    inner = Waiting()
    metrics = GatewayMetrics()
    queue = inner.layer(cfg, metrics)
    async with anyio.create_task_group() as tg:
        await start(tg, queue, admitted_scope(cfg, "a"))
        assert b'gateway_queue_depth{model="a"} 1.0' in metrics.render()
        inner.go.set()
    assert b'gateway_queue_depth{model="a"} 0.0' in metrics.render()


async def test_other_scopes_pass_through_uncounted() -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    queue = layer(inner, config())
    await call(queue, {"type": "websocket"})
    assert seen == ["websocket"]
    assert queue.accounting.depth("a") == 0
