"""Stored responses: the ids the gateway remembers, in bounded memory, and how it reads them."""

from __future__ import annotations

import json

import pytest

from kernel.context import STATE
from kernel.errors import GatewayError
from kernel.types import Receive, Scope, Send
from middleware.response_ids import PEEK_BYTES, RememberResponseIds, ResponseIds, stored_response
from tests.support import make_config, sim_model

from .asgi import call, http_scope

pytestmark = pytest.mark.anyio

CONFIG = make_config([sim_model("a"), sim_model("b")])
A, B = CONFIG.by_name["a"], CONFIG.by_name["b"]


def test_the_paths_of_a_stored_response() -> None:
    assert stored_response("/v1/responses/resp_1") == ("resp_1", "GET")
    assert stored_response("/v1/responses/resp_1/cancel") == ("resp_1", "POST")
    for path in ("/v1/responses", "/v1/responses/", "/v1/responses/resp_1/input_items",
                 "/v1/responses//cancel", "/v1/responses/a/b/cancel", "/v1/responsesx/1"):
        assert stored_response(path) is None, path


def test_the_least_recently_used_id_is_forgotten_past_the_size() -> None:
    ids = ResponseIds(2)
    ids.remember("r1", A)
    ids.remember("r2", B)
    assert ids.made("r1") == (A, None)  # r1 used: r2 is now the oldest
    ids.remember("r3", A, (1, 4))
    assert len(ids) == 2
    assert ids.made("r1") == (A, None) and ids.made("r3") == (A, (1, 4))
    with pytest.raises(GatewayError) as caught:
        ids.made("r2")
    assert (caught.value.status, caught.value.code) == (404, "response_not_found")


def answering(*bodies: bytes, status: int = 200, content_type: bytes = b"application/json"):
    async def backend(scope: Scope, receive: Receive, send: Send) -> None:
        scope[STATE].model = B
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type)]})
        for i, body in enumerate(bodies):
            await send({"type": "http.response.body", "body": body,
                        "more_body": i < len(bodies) - 1})
    return backend


async def remembered(*bodies: bytes, **answer: object) -> ResponseIds:
    ids = ResponseIds(10)
    scope = http_scope(path="/v1/responses")
    client = await call(RememberResponseIds(answering(*bodies, **answer), ids=ids), scope)
    assert client.body == b"".join(bodies)  # relayed as it came
    return ids


async def test_the_id_of_a_json_answer_in_pieces_is_remembered() -> None:
    answer = json.dumps({"id": "resp_9", "object": "response", "output": []}).encode()
    ids = await remembered(answer[:10], answer[10:], b"")
    assert ids.made("resp_9")[0] is B


async def test_the_id_of_a_stream_is_read_off_its_first_event_across_chunks() -> None:
    created = {"type": "response.created", "sequence_number": 0,
               "response": {"id": "resp_7", "status": "in_progress"}}
    first = f"event: response.created\ndata: {json.dumps(created)}\n".encode()
    ids = await remembered(first, b"\n", b'event: response.in_progress\ndata: {}\n\n',
                           content_type=b"text/event-stream; charset=utf-8")
    assert ids.made("resp_7")[0] is B


async def test_the_id_of_a_stream_after_loading_feedback_is_read_off_its_first_event() -> None:
    created = {"type": "response.created", "response": {"id": "resp_8"}}
    ids = await remembered(b": waiting for model 'b': starting, 2 s\n\n",
                           b": waiting for model 'b': starting, 4 s\n\n",
                           f"event: response.created\ndata: {json.dumps(created)}\n\n".encode(),
                           content_type=b"text/event-stream; charset=utf-8")
    assert ids.made("resp_8")[0] is B


async def test_nothing_is_remembered_from_an_error_or_an_answer_too_long_to_read() -> None:
    error = json.dumps({"id": "resp_1", "error": {"message": "no"}}).encode()
    assert len(await remembered(error, status=400)) == 0
    # Reading stops once more than PEEK_BYTES are held and the answer has not ended.
    padded = json.dumps({"id": "resp_2", "pad": "x" * PEEK_BYTES}).encode()
    half = PEEK_BYTES // 2
    assert len(await remembered(padded[:half], padded[half:])) == 1
    assert len(await remembered(padded[:half], padded[half:PEEK_BYTES + 1],
                                padded[PEEK_BYTES + 1:])) == 0


async def test_an_answer_is_remembered_with_its_last_byte_before_the_empty_end() -> None:
    """The client has the whole answer once its content-length is there; it may ask for the
    response at once, before the empty message that ends the answer is relayed."""
    ids = ResponseIds(10)
    answer = json.dumps({"id": "resp_5", "object": "response"}).encode()
    known_before_the_end = []

    async def backend(scope: Scope, receive: Receive, send: Send) -> None:
        scope[STATE].model = B
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer, "more_body": True})
        known_before_the_end.append(len(ids))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    scope = http_scope(path="/v1/responses")
    await call(RememberResponseIds(backend, ids=ids), scope)
    assert known_before_the_end == [1]
    assert ids.made("resp_5")[0] is B
