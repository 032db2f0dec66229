"""RequestContext: the request id both ways, the access log line, errors in the OpenAI shape."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import structlog

from kernel.context import STATE
from kernel.errors import GatewayError
from kernel.types import Receive, Scope, Send
from middleware import request_context
from middleware.request_context import RequestContext
from telemetry.metrics import GatewayMetrics
from tests.support import make_config, sim_model

from .asgi import Client, call, http_scope

pytestmark = pytest.mark.anyio


class Lines:
    """Stands in for the access logger (the suite's logging drops info lines)."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append({"event": event, **fields})

    def one(self) -> dict[str, Any]:
        (line,) = self.lines
        assert line["event"] == "request"
        return line


@pytest.fixture
def access_log(monkeypatch: pytest.MonkeyPatch) -> Lines:
    lines = Lines()
    monkeypatch.setattr(request_context, "access_log", lines)
    return lines


async def ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


def with_id(value: bytes) -> Scope:
    return http_scope(headers=[(b"content-type", b"application/json"), (b"x-request-id", value)])


async def test_the_clients_request_id_comes_back_and_is_kept_for_the_backend() -> None:
    seen: dict[str, Any] = {}

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen["request_id"] = scope[STATE].request_id
        await ok(scope, receive, send)

    client = await call(RequestContext(inner, metrics=GatewayMetrics()), with_id(b"abc-123"))
    assert client.headers["x-request-id"] == "abc-123"
    assert client.headers["content-type"] == "text/plain"
    assert seen["request_id"] == "abc-123"


@pytest.mark.parametrize("value", [None, b"", b"x" * 129, b"evil\x7fid", "caf\u00e9".encode()])
async def test_a_missing_or_unusable_request_id_is_replaced(value: bytes | None) -> None:
    scope = http_scope() if value is None else with_id(value)
    client = await call(RequestContext(ok, metrics=GatewayMetrics()), scope)
    request_id = client.headers["x-request-id"]
    assert len(request_id) == 24
    int(request_id, 16)


async def test_fresh_request_ids_differ() -> None:
    context = RequestContext(ok, metrics=GatewayMetrics())
    ids = {(await call(context, http_scope())).headers["x-request-id"] for _ in range(20)}
    assert len(ids) == 20


async def test_a_start_without_headers_still_gets_the_id() -> None:
    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})

    client = await call(RequestContext(inner, metrics=GatewayMetrics()), with_id(b"r1"))
    assert client.status == 204
    assert client.headers == {"x-request-id": "r1"}


async def test_a_gateway_error_before_the_answer_becomes_an_openai_error() -> None:
    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        raise GatewayError(503, "No capacity.", type="service_unavailable_error",
                           code="no_capacity", retry_after=7)

    client = await call(RequestContext(inner, metrics=GatewayMetrics()), with_id(b"r2"))
    assert client.status == 503
    assert client.headers["retry-after"] == "7"
    assert client.headers["x-request-id"] == "r2"
    assert client.error() == {"message": "No capacity.", "type": "service_unavailable_error",
                              "param": None, "code": "no_capacity"}


async def test_a_gateway_error_after_the_answer_started_is_raised_with_nothing_added(
        access_log: Lines) -> None:
    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise GatewayError(502, "cut", type="upstream_error", code="upstream_failed")

    client = Client()
    with pytest.raises(GatewayError):
        await RequestContext(inner, metrics=GatewayMetrics())(http_scope(), client.receive,
                                                              client.send)
    assert [m["type"] for m in client.sent] == ["http.response.start"]
    line = access_log.one()
    assert line["status"] == 200
    assert line["error"] == "GatewayError('cut')"


async def test_any_other_error_is_a_500_without_details_and_is_raised_for_the_server() -> None:
    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("secret address 10.0.0.7:8000")

    client = Client()
    with pytest.raises(RuntimeError):
        await RequestContext(inner, metrics=GatewayMetrics())(http_scope(), client.receive,
                                                              client.send)
    assert client.status == 500
    error = client.error()
    assert error["code"] == "internal_error"
    assert b"10.0.0.7" not in client.body


async def test_one_access_log_line_per_request_says_what_happened(access_log: Lines) -> None:
    cfg = make_config([sim_model("qwen")])

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        scope[STATE].model = cfg.by_name["qwen"]
        scope[STATE].retries = 1
        await ok(scope, receive, send)

    metrics = GatewayMetrics()
    await call(RequestContext(inner, metrics=metrics), with_id(b"r3"))
    line = access_log.one()
    assert line["method"] == "POST"
    assert line["path"] == "/v1/chat/completions"
    assert line["model"] == "qwen"
    assert line["adapter"] is None
    assert line["status"] == 200
    assert line["bytes"] == 5
    assert line["retries"] == 1
    assert line["ttfb_ms"] is not None
    assert line["duration_ms"] >= line["ttfb_ms"]
    assert line["client"] == "127.0.0.1"
    assert metrics.registry.get_sample_value("gateway_requests_total",
                                             {"model": "qwen", "status": "200"}) == 1


async def test_the_access_line_names_the_adapter_a_request_asked_for(
        access_log: Lines) -> None:
    cfg = make_config([sim_model("qwen", adapters=[{"name": "qwen-sql", "path": "/"}])])

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        scope[STATE].model = cfg.adapters["qwen-sql"]
        scope[STATE].adapter = "qwen-sql"
        await ok(scope, receive, send)

    metrics = GatewayMetrics()
    await call(RequestContext(inner, metrics=metrics), with_id(b"r5"))
    line = access_log.one()
    assert (line["model"], line["adapter"]) == ("qwen", "qwen-sql")
    assert metrics.registry.get_sample_value("gateway_requests_total",
                                             {"model": "qwen", "status": "200"}) == 1


async def test_lines_logged_during_the_request_carry_its_id_and_later_lines_do_not() -> None:
    during: dict[str, Any] = {}

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        during.update(structlog.contextvars.get_contextvars())
        await ok(scope, receive, send)

    await call(RequestContext(inner, metrics=GatewayMetrics()), with_id(b"r4"))
    assert during["request_id"] == "r4"
    assert "request_id" not in structlog.contextvars.get_contextvars()


async def test_a_cancelled_request_is_still_logged(access_log: Lines) -> None:
    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep_forever()

    with anyio.move_on_after(0.01):
        await call(RequestContext(inner, metrics=GatewayMetrics()), http_scope())
    assert access_log.one()["status"] == 0


async def test_other_scopes_pass_through_without_an_id() -> None:
    seen: list[Scope] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    await call(RequestContext(inner, metrics=GatewayMetrics()), {"type": "lifespan"})
    assert seen == [{"type": "lifespan"}]


async def test_a_request_answered_with_nothing_is_counted_under_status_none() -> None:
    metrics = GatewayMetrics()

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    await call(RequestContext(inner, metrics=metrics), with_id(b"r9"))
    assert metrics.registry.get_sample_value("gateway_requests_total",
                                             {"model": "-", "status": "none"}) == 1
