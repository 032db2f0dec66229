"""Tenants: the models a key may use (403), its rate limits (429 with OpenAI's headers, and the
headers on answers that go through), and the usage read from the answers as they pass."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kernel.config import Config
from kernel.context import STATE
from kernel.errors import GatewayError
from kernel.ratelimits import InMemoryLedger
from kernel.types import Message, Receive, Scope, Send
from middleware.tenants import Tenants, reset_text
from telemetry.metrics import GatewayMetrics
from tests.support import make_config, sim_model

from .asgi import admitted_scope, call

pytestmark = pytest.mark.anyio

USAGE = {"prompt_tokens": 7, "total_tokens": 10, "completion_tokens": 3}


def config(**tenant: Any) -> Config:
    return make_config([sim_model("a"), sim_model("b")],
                       tenants=[{"name": "team", "keys": ["sk-team-0001"], **tenant}])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Backend:
    """An inner app that answers with the chunks it is given (an SSE answer when they are
    events), and keeps the body it was asked to forward."""

    def __init__(self, *chunks: bytes, status: int = 200) -> None:
        self.chunks = chunks or (json.dumps({"choices": [], "usage": USAGE}).encode(),)
        self.status = status
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.bodies.append(scope[STATE].body_bytes)
        sse = self.chunks[0].startswith((b"data:", b"event:"))
        kind = b"text/event-stream" if sse else b"application/json"
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", kind)]})
        for i, chunk in enumerate(self.chunks):
            await send({"type": "http.response.body", "body": chunk,
                        "more_body": i < len(self.chunks) - 1})


def tenants(cfg: Config, inner: Any, ledger: InMemoryLedger | None = None,
            metrics: GatewayMetrics | None = None) -> Tenants:
    return Tenants(inner, config=cfg, ledger=ledger or InMemoryLedger(Clock()),
                   metrics=metrics or GatewayMetrics())


def scope_of(cfg: Config, model: str = "a", *, tenant: str = "team",
             body: dict[str, Any] | None = None, path: str = "/v1/chat/completions") -> Scope:
    scope = admitted_scope(cfg, model)
    scope["path"] = path
    state = scope[STATE]
    state.tenant = next(t for t in cfg.tenants if t.name == tenant)
    if body is not None:
        state.body_bytes = json.dumps({"model": model, **body}).encode()
        state.stream = body.get("stream") is True
    return scope


async def refused(app: Tenants, scope: Scope) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        await call(app, scope)
    return info.value


async def test_a_model_the_tenant_may_not_use_is_403_and_never_forwarded() -> None:
    cfg = config(models=["b"])
    inner = Backend()
    app = tenants(cfg, inner)
    error = await refused(app, scope_of(cfg, "a"))
    assert (error.status, error.code, error.param) == (403, "model_not_allowed", "model")
    assert inner.bodies == []
    assert (await call(app, scope_of(cfg, "b"))).status == 200


async def test_requests_beyond_rpm_limit_are_429_with_openais_headers_until_the_minute_passed(
) -> None:
    cfg = config(rpm_limit=2)
    clock = Clock()
    inner = Backend()
    app = tenants(cfg, inner, InMemoryLedger(clock))
    first = await call(app, scope_of(cfg))
    clock.now += 20
    second = await call(app, scope_of(cfg))
    assert first.status == second.status == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-limit-tokens" not in first.headers  # no such limit
    clock.now += 10
    error = await refused(app, scope_of(cfg))
    assert (error.status, error.code, error.type) == (429, "rate_limit_exceeded", "requests")
    headers = dict(error.headers())
    # Room again once the first request's second has left the window, 30 s on.
    assert headers[b"retry-after"] == b"30"
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert headers[b"x-ratelimit-reset-requests"] == b"50s"
    assert len(inner.bodies) == 2
    clock.now += 30
    assert (await call(app, scope_of(cfg))).status == 200
    # A refusal takes no place in the window: the window holds the 2nd and the 3rd answered.
    assert (await app.ledger.report(["team"]))["team"]["requests"] == 2


async def test_a_spent_token_window_refuses_the_next_request_before_it_starts() -> None:
    cfg = config(tpm_limit=15)
    inner = Backend()
    app = tenants(cfg, inner)
    first = await call(app, scope_of(cfg))
    second = await call(app, scope_of(cfg))
    assert first.headers["x-ratelimit-remaining-tokens"] == "15"
    assert second.headers["x-ratelimit-remaining-tokens"] == "5"
    assert second.headers["x-ratelimit-limit-tokens"] == "15"
    error = await refused(app, scope_of(cfg))
    assert (error.status, error.code, error.type) == (429, "rate_limit_exceeded", "tokens")
    assert dict(error.headers())[b"x-ratelimit-remaining-tokens"] == b"0"
    assert len(inner.bodies) == 2


def _events(*data: dict[str, Any] | str) -> list[bytes]:
    return [f"data: {d if isinstance(d, str) else json.dumps(d)}\n\n".encode() for d in data]


CONTENT = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
USAGE_CHUNK = {"choices": [], "usage": USAGE}


async def test_a_stream_whose_client_did_not_ask_for_usage_asks_and_the_client_never_sees_it(
) -> None:
    cfg = config()
    ledger = InMemoryLedger(Clock())
    inner = Backend(*_events(CONTENT, USAGE_CHUNK, "[DONE]"))
    client = await call(tenants(cfg, inner, ledger), scope_of(cfg, body={"stream": True}))
    forwarded = json.loads(inner.bodies[0])
    assert forwarded["stream_options"] == {"include_usage": True,
                                           "continuous_usage_stats": False}
    assert client.body == b"".join(_events(CONTENT, "[DONE]"))
    usage = (await ledger.report(["team"]))["team"]["usage"]["a"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (7, 3)


async def test_a_stream_whose_client_asked_for_usage_gets_it_and_it_is_counted() -> None:
    cfg = config()
    ledger = InMemoryLedger(Clock())
    # The usage chunk cut in two on its way.
    chunks = _events(CONTENT, USAGE_CHUNK, "[DONE]")
    inner = Backend(chunks[0], chunks[1][:30], chunks[1][30:], chunks[2])
    body = {"stream": True, "stream_options": {"include_usage": True}}
    client = await call(tenants(cfg, inner, ledger), scope_of(cfg, body=body))
    assert json.loads(inner.bodies[0])["stream_options"] == {"include_usage": True}
    assert client.body == b"".join(chunks)
    usage = (await ledger.report(["team"]))["team"]["usage"]["a"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (7, 3)


async def test_anthropic_usage_is_counted_from_its_events_and_its_answer() -> None:
    cfg = config()
    ledger = InMemoryLedger(Clock())
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 5,
                                                            "output_tokens": 0}}}
    delta = {"type": "message_delta", "usage": {"input_tokens": 5, "output_tokens": 4}}
    streamed = Backend(f"event: message_start\ndata: {json.dumps(start)}\n\n".encode(),
                       f"event: message_delta\ndata: {json.dumps(delta)}\n\n".encode())
    await call(tenants(cfg, streamed, ledger),
               scope_of(cfg, body={"stream": True}, path="/v1/messages"))
    assert "stream_options" not in json.loads(streamed.bodies[0])
    plain = Backend(json.dumps({"type": "message", "usage": {
        "input_tokens": 2, "cache_read_input_tokens": 6, "output_tokens": 1}}).encode())
    await call(tenants(cfg, plain, ledger), scope_of(cfg, path="/v1/messages"))
    usage = (await ledger.report(["team"]))["team"]["usage"]["a"]
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (2, 13, 5)


async def test_usage_goes_to_the_tenants_counters_with_errors_and_refusals() -> None:
    cfg = config(rpm_limit=2)
    metrics = GatewayMetrics()
    ledger = InMemoryLedger(Clock())
    await call(tenants(cfg, Backend(), ledger, metrics), scope_of(cfg))
    await call(tenants(cfg, Backend(status=500), ledger, metrics), scope_of(cfg))
    await refused(tenants(cfg, Backend(), ledger, metrics), scope_of(cfg))
    text = metrics.render().decode()
    assert 'gateway_tenant_requests_total{model="a",tenant="team"} 3.0' in text
    assert 'gateway_tenant_tokens_total{kind="prompt",model="a",tenant="team"} 14.0' in text
    assert 'gateway_tenant_tokens_total{kind="completion",model="a",tenant="team"} 6.0' in text
    assert 'gateway_tenant_errors_total{model="a",tenant="team"} 2.0' in text
    usage = (await ledger.report(["team"]))["team"]["usage"]["a"]
    assert (usage["requests"], usage["errors"]) == (3, 2)
    assert ledger.in_flight["team"] == 0


async def test_a_request_without_a_key_is_the_default_tenants() -> None:
    cfg = make_config([sim_model("a")], tenants=[{"name": "default", "rpm_limit": 1}])
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope[STATE].tenant.name)
        await Backend()(scope, receive, send)

    app = tenants(cfg, inner)
    assert (await call(app, admitted_scope(cfg, "a"))).status == 200
    assert (await refused(app, admitted_scope(cfg, "a"))).code == "rate_limit_exceeded"
    assert seen == ["default"]


async def test_a_failed_stream_counts_as_an_error_and_its_error_event_passes() -> None:
    cfg = config()
    ledger = InMemoryLedger(Clock())
    error = GatewayError(502, "gone", type="upstream_error", code="upstream_failed")

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": _events(CONTENT)[0],
                    "more_body": True})
        message: Message = error.sse_message()
        await send(message)

    client = await call(tenants(cfg, inner, ledger), scope_of(cfg, body={"stream": True}))
    assert client.body.endswith(error.sse_message()["body"])
    assert (await ledger.report(["team"]))["team"]["usage"]["a"]["errors"] == 1


@pytest.mark.parametrize(("seconds", "text"), [
    (0.25, "250ms"), (1.5, "1.5s"), (59.5, "59.5s"), (60, "1m0s"), (0, "0s")])
def test_reset_is_written_as_openai_writes_it(seconds: float, text: str) -> None:
    assert reset_text(seconds) == text
