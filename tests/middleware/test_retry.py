"""RetryConnectFailures: only a connect failure, only before anything was sent, within limits."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from kernel.config import Config
from kernel.context import STATE
from kernel.errors import GatewayError
from kernel.types import Receive, Scope, Send
from middleware import retry as retry_module
from middleware.retry import RetryBudget, RetryConnectFailures
from relay.passthrough import UpstreamConnectError
from telemetry.metrics import GatewayMetrics
from tests.support import make_config, sim_model

from .asgi import admitted_scope, call

pytestmark = pytest.mark.anyio


class Log:
    """Stands in for the retry logger; keeps the delay of each retry."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = delays

    def info(self, event: str, **fields: Any) -> None:
        self.delays.append(fields["delay"])


def config(**upstream: Any) -> Config:
    return make_config([sim_model("a")], upstream={
        "backoff_base": 0.001, "backoff_max": 0.002, "retries": 3, "retry_deadline": 5.0,
        "retry_budget_min": 100, **upstream})


class Flaky:
    """Fails to connect ``failures`` times, then answers 200."""

    def __init__(self, failures: int, *, attempt_takes: float = 0.0) -> None:
        self.failures = failures
        self.attempt_takes = attempt_takes
        self.attempts: list[float] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.attempts.append(anyio.current_time())
        await anyio.sleep(self.attempt_takes)
        if len(self.attempts) <= self.failures:
            raise UpstreamConnectError("a")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def test_a_connect_failure_is_tried_again_and_the_answer_gets_through() -> None:
    inner = Flaky(2)
    metrics = GatewayMetrics()
    retry = RetryConnectFailures(inner, config=config(), metrics=metrics)
    scope = admitted_scope(config(), "a")
    client = await call(retry, scope)
    assert client.status == 200
    assert client.body == b"ok"
    assert len(inner.attempts) == 3
    assert scope[STATE].retries == 2
    assert metrics.registry.get_sample_value("gateway_upstream_retries_total",
                                             {"model": "a"}) == 2


async def test_after_the_last_try_the_connect_failure_comes_out() -> None:
    inner = Flaky(100)
    retry = RetryConnectFailures(inner, config=config(retries=3), metrics=GatewayMetrics())
    with pytest.raises(UpstreamConnectError):
        await call(retry, admitted_scope(config(), "a"))
    assert len(inner.attempts) == 4


async def test_no_retries_configured_means_one_try() -> None:
    inner = Flaky(1)
    retry = RetryConnectFailures(inner, config=config(retries=0), metrics=GatewayMetrics())
    with pytest.raises(UpstreamConnectError):
        await call(retry, admitted_scope(config(), "a"))
    assert len(inner.attempts) == 1


async def test_never_after_the_response_started() -> None:
    attempts = 0

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal attempts
        attempts += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise UpstreamConnectError("a")

    retry = RetryConnectFailures(inner, config=config(), metrics=GatewayMetrics())
    with pytest.raises(UpstreamConnectError):
        await call(retry, admitted_scope(config(), "a"))
    assert attempts == 1


@pytest.mark.parametrize("error", [
    GatewayError(502, "failed after sending", type="upstream_error", code="upstream_failed"),
    GatewayError(504, "no first byte", type="timeout_error", code="upstream_timeout"),
    GatewayError(503, "pool exhausted", type="service_unavailable_error",
                 code="upstream_pool_exhausted"),
    RuntimeError("bug"),
], ids=repr)
async def test_never_on_another_error(error: Exception) -> None:
    attempts = 0

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal attempts
        attempts += 1
        raise error

    retry = RetryConnectFailures(inner, config=config(), metrics=GatewayMetrics())
    with pytest.raises(type(error)) as raised:
        await call(retry, admitted_scope(config(), "a"))
    assert raised.value is error
    assert attempts == 1


async def test_an_http_error_status_from_the_backend_is_passed_on_not_retried() -> None:
    attempts = 0

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal attempts
        attempts += 1
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"boom"})

    retry = RetryConnectFailures(inner, config=config(), metrics=GatewayMetrics())
    client = await call(retry, admitted_scope(config(), "a"))
    assert client.status == 500
    assert attempts == 1


async def test_an_exhausted_budget_stops_retries_for_every_request() -> None:
    cfg = config(retries=5, retry_budget_min=2, retry_budget_ratio=0.0)
    inner = Flaky(100)
    retry = RetryConnectFailures(inner, config=cfg, metrics=GatewayMetrics())
    with pytest.raises(UpstreamConnectError):
        await call(retry, admitted_scope(cfg, "a"))
    assert len(inner.attempts) == 3
    with pytest.raises(UpstreamConnectError):
        await call(retry, admitted_scope(cfg, "a"))
    assert len(inner.attempts) == 4


async def test_the_overall_deadline_is_respected() -> None:
    deadline = 0.1
    cfg = config(retries=20, retry_deadline=deadline)
    inner = Flaky(100, attempt_takes=0.02)
    retry = RetryConnectFailures(inner, config=cfg, metrics=GatewayMetrics())
    began = anyio.current_time()
    with pytest.raises(UpstreamConnectError):
        await call(retry, admitted_scope(cfg, "a"))
    ended = anyio.current_time()
    assert 2 <= len(inner.attempts) < 21
    assert all(at - began <= deadline for at in inner.attempts)
    assert ended - began < deadline + 0.02 + 0.1


async def test_each_wait_is_jittered_below_a_doubling_bound_and_the_cap(
        monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[float] = []
    monkeypatch.setattr(retry_module, "log", Log(delays))
    cfg = config(retries=6, backoff_base=0.001, backoff_max=0.004)
    retry = RetryConnectFailures(Flaky(6), config=cfg, metrics=GatewayMetrics())
    began = anyio.current_time()
    client = await call(retry, admitted_scope(cfg, "a"))
    assert client.status == 200
    bounds = [0.001, 0.002, 0.004, 0.004, 0.004, 0.004]
    assert len(delays) == len(bounds)
    assert all(0 <= delay <= bound for delay, bound in zip(delays, bounds, strict=True))
    assert delays != bounds  # jittered, not the bound itself
    assert anyio.current_time() - began >= sum(delays) - 0.001


def test_the_budget_allows_a_floor_plus_a_share_of_recent_requests() -> None:
    budget = RetryBudget(ratio=0.5, minimum=1, window=10.0)
    for _ in range(4):
        budget.record_request(100.0)
    assert [budget.try_spend(100.5) for _ in range(4)] == [True, True, True, False]


def test_spent_retries_leave_the_budget_once_the_window_has_passed() -> None:
    budget = RetryBudget(ratio=0.0, minimum=2, window=10.0)
    assert budget.try_spend(100.0)
    assert budget.try_spend(104.0)
    assert not budget.try_spend(109.0)
    assert budget.try_spend(111.0)
    assert not budget.try_spend(113.0)
    assert budget.try_spend(115.0)


async def test_other_scopes_pass_through_once() -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    retry = RetryConnectFailures(inner, config=config(), metrics=GatewayMetrics())
    await call(retry, {"type": "lifespan"})
    assert seen == ["lifespan"]
