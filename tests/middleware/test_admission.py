"""Admission: bounded body read (size, time, the gateway's budget), JSON and model checks,
state for the layers below, replay."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from starlette.requests import Request

from kernel.context import STATE, RequestState
from kernel.types import Message, Receive, Scope, Send
from middleware import admission
from middleware.admission import LARGE_BODY, Admission
from middleware.response_ids import ResponseIds
from proxy.anthropic import AnthropicErrors
from tests.support import make_config, sim_model

from .asgi import Client, http_scope

pytestmark = pytest.mark.anyio

LIMIT = 128


def config(**gateway: Any) -> Any:
    return make_config([sim_model("llama", aliases=["gpt-4"], served_name="meta/llama",
                                  adapters=[{"name": "llama-sql", "path": "/"}]),
                        sim_model("qwen")], gateway={"max_body_bytes": LIMIT, **gateway})


class Inner:
    """Records what reached it: the state and every message it read."""

    def __init__(self, reads: int = 1) -> None:
        self.reads = reads
        self.state: RequestState | None = None
        self.messages: list[Message] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.state = scope[STATE]
        for _ in range(self.reads):
            self.messages.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def admit(client: Client, *, headers: list[tuple[bytes, bytes]] | None = None,
                inner: Inner | None = None) -> Inner:
    inner = inner or Inner()
    with anyio.fail_after(1):  # reading more than the client sent would wait forever
        await Admission(inner, config=config())(http_scope(headers=headers), client.receive,
                                                client.send)
    return inner


async def test_an_admitted_request_carries_its_model_and_body_downstream() -> None:
    body = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}
    client = Client.with_body(body)
    inner = await admit(client)
    assert client.status == 200
    assert inner.state is not None
    assert inner.state.model.name == "qwen"
    assert json.loads(inner.state.body_bytes) == body
    assert not hasattr(inner.state, "body")  # nothing parsed is kept


async def test_the_body_is_replayed_to_the_inner_app_then_receive_goes_on() -> None:
    raw = b'{"model": "qwen"}'
    client = Client({"type": "http.request", "body": raw[:5], "more_body": True},
                    {"type": "http.request", "body": raw[5:], "more_body": False},
                    {"type": "http.disconnect"})
    inner = await admit(client, inner=Inner(reads=2))
    assert inner.messages == [{"type": "http.request", "body": raw, "more_body": False},
                              {"type": "http.disconnect"}]


async def test_an_alias_resolves_and_the_backend_gets_the_served_name() -> None:
    client = Client.with_body({"model": "gpt-4", "stream": True})
    inner = await admit(client)
    assert inner.state is not None
    assert inner.state.model.name == "llama"
    assert json.loads(inner.state.body_bytes) == {"model": "meta/llama", "stream": True}
    assert json.loads(inner.messages[0]["body"]) == {"model": "meta/llama", "stream": True}


async def test_an_adapter_goes_to_its_base_model_and_the_backend_gets_its_name() -> None:
    raw = b'{"model": "llama-sql", "stream": true}'
    client = Client({"type": "http.request", "body": raw, "more_body": False})
    inner = await admit(client)
    assert inner.state is not None
    assert (inner.state.model.name, inner.state.adapter) == ("llama", "llama-sql")
    assert (inner.state.requested_model, inner.state.stream) == ("llama-sql", True)
    # vLLM serves the adapter under its own name: the body goes on as it came.
    assert inner.state.body_bytes == raw
    assert inner.messages[0]["body"] == raw


async def test_a_content_type_with_parameters_is_json_too() -> None:
    client = Client.with_body({"model": "qwen"})
    await admit(client, headers=[(b"content-type", b"Application/JSON; charset=utf-8")])
    assert client.status == 200


class SendsThenReads(Client):
    """Records, with each message sent, how many the app had read by then."""

    def __init__(self, *messages: Message) -> None:
        super().__init__(*messages)
        self.read_when_sent: list[int] = []

    async def send(self, message: Message) -> None:
        self.read_when_sent.append(self.received)
        await super().send(message)


async def test_a_declared_length_over_the_limit_is_answered_before_reading() -> None:
    client = SendsThenReads({"type": "http.request", "body": b"x" * 100, "more_body": True},
                            {"type": "http.request", "body": b"x" * 100, "more_body": False})
    inner = await admit(client, headers=[(b"content-type", b"application/json"),
                                         (b"content-length", str(LIMIT + 1).encode())])
    assert client.status == 413
    assert client.error()["code"] == "request_too_large"
    # The whole answer went out before a byte was read; the rest was then read and dropped
    # (a connection closed with unread bytes is reset) and only then did the answer end.
    assert client.read_when_sent == [0, 0, 2]
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert inner.state is None


async def test_an_anthropic_client_gets_a_body_over_the_limit_in_anthropics_shape() -> None:
    chunk = b" " * 50
    client = Client(*({"type": "http.request", "body": chunk, "more_body": True}
                      for _ in range(4)),
                    {"type": "http.request", "body": chunk, "more_body": False})
    app = AnthropicErrors(Admission(Inner(), config=config()))
    with anyio.fail_after(1):
        await app(http_scope(path="/v1/messages"), client.receive, client.send)
    assert client.status == 413
    assert client.json() == {"type": "error", "error": {
        "type": "request_too_large", "message": client.json()["error"]["message"]}}
    assert int(client.headers["content-length"]) == len(client.body)


async def test_reading_stops_at_the_limit() -> None:
    chunk = b" " * 50
    client = Client(*({"type": "http.request", "body": chunk, "more_body": True}
                      for _ in range(4)),
                    {"type": "http.request", "body": chunk, "more_body": False})
    inner = await admit(client)
    assert client.status == 413
    error = client.error()
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "request_too_large"
    assert client.unread == 0  # what came after the limit was read, not kept
    assert inner.state is None


async def test_a_body_slower_than_body_timeout_is_a_408(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission, "LINGER_S", 0.2)
    client = Client({"type": "http.request", "body": b'{"model": ', "more_body": True})
    inner = Inner()
    began = anyio.current_time()
    await Admission(inner, config=config(body_timeout=0.3))(
        http_scope(), client.receive, client.send)
    # The answer, then the rest of the body is waited for a while (LINGER_S), then it ends.
    assert 0.5 <= anyio.current_time() - began < 1.5
    assert client.status == 408
    assert client.error()["code"] == "request_timeout"
    assert inner.state is None


async def test_a_full_budget_is_a_503_with_retry_after_and_frees_when_requests_end() -> None:
    layer = Admission(Inner(), config=config(max_buffered_body_bytes=LIMIT))
    raw = json.dumps({"model": "qwen", "pad": "x" * 80}).encode()
    length = [(b"content-type", b"application/json"),
              (b"content-length", str(len(raw)).encode())]
    release = anyio.Event()

    async def holding(scope: Scope, receive: Receive, send: Send) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    layer.app = holding
    first, second = Client.with_body(raw), Client.with_body(raw)
    async with anyio.create_task_group() as tg:
        tg.start_soon(layer, http_scope(headers=length), first.receive, first.send)
        await anyio.sleep(0.05)
        assert layer.budget.held == len(raw)
        await layer(http_scope(headers=length), second.receive, second.send)
        assert second.status == 503
        assert second.error()["code"] == "body_budget_full"
        assert second.headers["retry-after"] == "1"
        release.set()
    assert first.status == 200
    assert layer.budget.held == 0


async def test_a_large_body_in_chunks_is_read_and_its_last_top_level_model_wins() -> None:
    pad = json.dumps([{"model": "not this one"}] * (LARGE_BODY // 20)).encode()
    raw = b'{"model": "llama", "messages": ' + pad + b', "model ": "x", "model": "qwen"}'
    assert len(raw) > LARGE_BODY
    client = Client(*({"type": "http.request", "body": raw[i:i + 300_000], "more_body": True}
                      for i in range(0, len(raw), 300_000)),
                    {"type": "http.request", "body": b"", "more_body": False})
    inner = Inner()
    await Admission(inner, config=config(max_body_bytes=4 * LARGE_BODY))(
        http_scope(), client.receive, client.send)
    assert client.status == 200
    assert inner.state is not None and inner.state.model.name == "qwen"


async def test_a_large_body_for_an_alias_names_the_served_model() -> None:
    raw = json.dumps({"model": "gpt-4", "prompt": [1] * LARGE_BODY}).encode()
    inner = Inner()
    await Admission(inner, config=config(max_body_bytes=4 * LARGE_BODY))(
        http_scope(), Client.with_body(raw).receive, Client().send)
    assert inner.state is not None
    assert json.loads(inner.state.body_bytes)["model"] == "meta/llama"


@pytest.mark.parametrize("raw", [b"{" + b'"a": 1, ' * (LARGE_BODY // 4),
                                 b"[" + b"1, " * (LARGE_BODY // 2) + b"1]",
                                 b'{"model": "qwen"} trailing'])
async def test_a_large_body_that_is_not_a_json_object_is_a_400(raw: bytes) -> None:
    client = Client.with_body(raw)
    await Admission(Inner(), config=config(max_body_bytes=4 * LARGE_BODY))(
        http_scope(), client.receive, client.send)
    assert client.status == 400
    assert client.error()["code"] == "invalid_json"


async def test_a_body_of_exactly_the_limit_is_read() -> None:
    raw = b'{"model": "qwen"}'
    client = Client.with_body(raw.ljust(LIMIT))
    await admit(client)
    assert client.status == 200


@pytest.mark.parametrize("content_type", [b"text/plain", b"application/x-www-form-urlencoded",
                                          None])
async def test_a_body_that_is_not_json_by_type_is_refused(content_type: bytes | None) -> None:
    client = Client.with_body({"model": "qwen"})
    headers = [(b"content-type", content_type)] if content_type else []
    inner = await admit(client, headers=headers)
    assert client.status == 415
    assert client.error()["code"] == "unsupported_media_type"
    assert client.headers["x-should-retry"] == "false"
    assert inner.state is None


@pytest.mark.parametrize(("raw", "code"), [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe\x00", "invalid_json"),
    (b'["model", "qwen"]', "invalid_json"),
    (b"[" * 50 + b"]" * 50, "invalid_json"),
    (b'{"messages": []}', "invalid_model"),
    (b'{"model": 7}', "invalid_model"),
    (b'{"model": ""}', "invalid_model"),
])
async def test_a_body_that_is_not_an_object_with_a_model_is_a_400(raw: bytes, code: str) -> None:
    client = Client.with_body(raw)
    inner = await admit(client)
    assert client.status == 400
    error = client.error()
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    assert inner.state is None


ONE_MODEL = make_config([sim_model("llama", served_name="meta/llama")],
                        gateway={"max_body_bytes": 4 * LARGE_BODY})


async def admitted(app_config: Any, raw: bytes, *,
                   headers: list[tuple[bytes, bytes]] | None = None,
                   path: str = "/v1/chat/completions") -> tuple[Client, Inner]:
    client, inner = Client.with_body(raw), Inner()
    await Admission(inner, config=app_config)(http_scope(headers=headers, path=path),
                                              client.receive, client.send)
    return client, inner


@pytest.mark.parametrize("raw", [b'{"prompt": ""}', b'{"model": null, "tokens": [1]}',
                                 b'{"model": "", "input": ""}'],
                         ids=["absent", "null", "empty"])
async def test_a_body_that_names_no_model_goes_to_the_only_one_under_its_served_name(
        raw: bytes) -> None:
    client, inner = await admitted(ONE_MODEL, raw)
    assert client.status == 200
    assert inner.state is not None and inner.state.model.name == "llama"
    assert inner.state.model_default is True
    assert json.loads(inner.messages[0]["body"]) == {**json.loads(raw), "model": "meta/llama"}


async def test_a_large_body_that_names_no_model_names_the_served_one() -> None:
    raw = json.dumps({"prompt": [1] * LARGE_BODY}).encode()
    client, inner = await admitted(ONE_MODEL, raw)
    assert client.status == 200
    assert inner.state is not None
    assert json.loads(inner.state.body_bytes)["model"] == "meta/llama"


async def test_a_body_that_names_no_model_goes_to_the_default_model() -> None:
    client, inner = await admitted(config(default_model="gpt-4"), b'{"input": "hi"}')
    assert client.status == 200
    assert inner.state is not None and inner.state.model.name == "llama"
    assert json.loads(inner.messages[0]["body"]) == {"input": "hi", "model": "meta/llama"}
    client, inner = await admitted(config(default_model="gpt-4"), b'{"model": "qwen"}')
    assert inner.state is not None and inner.state.model.name == "qwen"
    assert inner.state.model_default is False


async def test_without_a_default_among_several_models_no_model_is_a_400_saying_how_to_set_one(
        ) -> None:
    client, inner = await admitted(config(), b'{"prompt": ""}')
    assert client.status == 400
    error = client.error()
    assert (error["code"], error["param"]) == ("invalid_model", "model")
    assert "names no model" in error["message"]
    assert "gateway.default_model" in error["message"]
    assert inner.state is None


async def test_a_form_that_names_no_model_gets_the_default_ones_served_name() -> None:
    audio = bytes(range(256)) * 4
    upload = (b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
              + audio + b"\r\n--XyZ--\r\n")
    empty_model = b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\n\r\n'
    for raw in (upload, empty_model + upload):
        client, inner = await admitted(ONE_MODEL, raw, headers=[FORM],
                                       path="/v1/audio/transcriptions")
        assert client.status == 200
        assert inner.state is not None and inner.state.model_default is True
        # The form as vLLM's reader (Starlette's) takes it: the served name, the file intact.
        forwarded = Client.with_body(inner.state.body_bytes)
        parsed = await Request(http_scope(headers=[FORM]), forwarded.receive).form()
        assert parsed["model"] == "meta/llama"
        assert await parsed["file"].read() == audio


async def test_json_nested_too_deep_to_parse_is_a_400_not_a_crash() -> None:
    nested = b'{"model": "qwen", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    client = Client.with_body(nested)
    inner = Inner()
    await Admission(inner, config=make_config([sim_model("qwen")]))(
        http_scope(), client.receive, client.send)
    assert client.status == 400
    assert client.error()["code"] == "invalid_json"


async def test_an_unknown_model_is_a_404_naming_the_param() -> None:
    client = Client.with_body({"model": "gpt-5"})
    inner = await admit(client)
    assert client.status == 404
    error = client.error()
    assert error == {"message": "The model 'gpt-5' does not exist.",
                     "type": "invalid_request_error", "param": "model",
                     "code": "model_not_found"}
    assert inner.state is None


async def test_a_client_gone_before_the_body_ends_gets_nothing() -> None:
    client = Client({"type": "http.request", "body": b'{"mo', "more_body": True},
                    {"type": "http.disconnect"})
    inner = await admit(client)
    assert client.sent == []
    assert inner.state is None


def form(model: bytes, audio: bytes) -> bytes:
    return (b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + model
            + b'\r\n--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"'
            + b"\r\n\r\n" + audio + b"\r\n--XyZ--\r\n")


FORM = (b"content-type", b"multipart/form-data; boundary=XyZ")


async def test_a_form_upload_goes_on_byte_for_byte_with_an_alias_replaced() -> None:
    audio = bytes(range(40))
    inner = Inner()
    client = Client.with_body(form(b"qwen", audio))
    await Admission(inner, config=make_config([sim_model("qwen")]))(
        http_scope(headers=[FORM], path="/v1/audio/transcriptions"), client.receive,
        client.send)
    assert inner.state is not None and inner.state.body_bytes == form(b"qwen", audio)
    client = Client.with_body(form(b"gpt-4", audio))
    inner = Inner()
    aliased = make_config([sim_model("llama", aliases=["gpt-4"], served_name="meta/llama")])
    await Admission(inner, config=aliased)(
        http_scope(headers=[FORM], path="/v1/audio/translations"), client.receive, client.send)
    assert inner.state is not None and inner.state.model.name == "llama"
    assert inner.state.body_bytes == form(b"meta/llama", audio)


async def test_a_form_path_refuses_json() -> None:
    client = Client.with_body({"model": "qwen"})
    await Admission(Inner(), config=config())(
        http_scope(path="/v1/audio/transcriptions"), client.receive, client.send)
    assert (client.status, client.error()["code"]) == (415, "unsupported_media_type")


async def test_a_stored_response_goes_to_its_model_without_reading_a_body() -> None:
    ids = ResponseIds(4)
    ids.remember("resp_1", config().by_name["qwen"])
    admission = Admission(Inner(reads=0), config=config(), response_ids=ids)
    client = Client.with_body(b"ignored")
    await admission(http_scope(headers=[], method="GET", path="/v1/responses/resp_1"),
                    client.receive, client.send)
    assert client.status == 200 and client.received == 0
    client = Client.with_body()
    await admission(http_scope(path="/v1/responses/resp_2/cancel"), client.receive, client.send)
    assert (client.status, client.error()["code"]) == (404, "response_not_found")


async def test_other_scopes_pass_through_untouched() -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    client = Client()
    await Admission(inner, config=config())({"type": "lifespan"}, client.receive, client.send)
    assert seen == ["lifespan"]
    assert client.received == 0
