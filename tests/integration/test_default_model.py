"""Requests that name no model, through the gateway on real sockets: as on a single vLLM, they
go to the one model (or to ``gateway.default_model``), on every path that routes by model, and
the backend is sent the name it serves; among several models without a default they are refused
with a message that says how to set one."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import pytest
from starlette.requests import Request

from kernel.types import Receive, Scope, Send
from middleware import request_context
from middleware.admission import FORM_PATHS
from proxy.anthropic import PATHS as ANTHROPIC_PATHS
from proxy.app import FORWARDED
from tests.middleware.test_request_context import Lines
from tests.support import (
    answer_lifespan,
    make_config,
    serving,
    serving_app,
    sim_model,
    static_model,
)

pytestmark = pytest.mark.anyio

JSON_PATHS = sorted(FORWARDED - FORM_PATHS)


class Recording:
    """A backend that answers every POST with ``{}`` and keeps the body it was sent, as its
    framework would read it (JSON, or a form's fields)."""

    def __init__(self) -> None:
        self.received: dict[str, dict[str, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["method"] == "POST":
            request = Request(scope, receive)
            if scope["path"] in FORM_PATHS:
                form = await request.form()
                self.received[scope["path"]] = {"model": form.get("model"),
                                                "file": await form["file"].read()}
            else:
                self.received[scope["path"]] = await request.json()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})


@pytest.fixture
def access_log(monkeypatch: pytest.MonkeyPatch) -> Lines:
    lines = Lines()
    monkeypatch.setattr(request_context, "access_log", lines)
    return lines


@pytest.mark.parametrize("gateway_section", [{}, {"default_model": "tiny-alias"}],
                         ids=["the-only-model", "default_model"])
async def test_every_path_sends_a_request_without_a_model_to_the_served_name(
        gateway_section: dict[str, Any], access_log: Lines) -> None:
    backend = Recording()
    async with serving_app(backend) as backend_url:
        models = [static_model("tiny", backend_url, served_name="org/tiny",
                               aliases=["tiny-alias"])]
        if gateway_section:  # a second model, so that only the default says where to go
            models.append(static_model("other", backend_url))
        config = make_config(models, gateway=gateway_section)
        async with serving(config) as (url, _), httpx2.AsyncClient(timeout=30) as client:
            for i, path in enumerate(JSON_PATHS):
                body = ({"input": ""} if i % 3 == 0 else {"model": None, "prompt": ""}
                        if i % 3 == 1 else {"model": "", "prompt": ""})
                answer = await client.post(url + path, json=body)
                assert answer.status_code == 200, (path, answer.text)
                assert backend.received[path] == {**body, "model": "org/tiny"}, path
            for path in sorted(FORM_PATHS):
                answer = await client.post(url + path, files={"file": ("a.wav", b"RIFF")})
                assert answer.status_code == 200, (path, answer.text)
                assert backend.received[path] == {"model": "org/tiny", "file": b"RIFF"}, path
            named = await client.post(url + "/v1/completions", json={"model": "tiny"})
            assert named.status_code == 200
    lines = [line for line in access_log.lines if line["path"] in FORWARDED]
    assert [(line["model"], line["model_default"]) for line in lines] == (
        [("tiny", True)] * len(FORWARDED) + [("tiny", False)])


async def test_among_several_models_without_a_default_no_model_is_a_400_in_each_apis_shape(
        ) -> None:
    config = make_config([static_model("a", "http://127.0.0.1:9"),
                          static_model("b", "http://127.0.0.1:9")])
    async with serving(config) as (url, _), httpx2.AsyncClient(timeout=30) as client:
        openai = await client.post(url + "/tokenize", json={"prompt": ""})
        assert openai.status_code == 400
        error = openai.json()["error"]
        assert (error["code"], error["param"]) == ("invalid_model", "model")
        assert "names no model" in error["message"]
        assert "gateway.default_model" in error["message"]
        for path in sorted(ANTHROPIC_PATHS):
            anthropic = await client.post(url + path, json={"messages": []})
            assert anthropic.status_code == 400
            assert anthropic.json()["type"] == "error"
            assert anthropic.json()["error"]["type"] == "invalid_request_error"
            assert "gateway.default_model" in anthropic.json()["error"]["message"]


async def test_the_simulator_streams_and_answers_requests_that_name_no_model() -> None:
    config = make_config([sim_model("sim", aliases=["small"])])
    async with serving(config) as (url, _), httpx2.AsyncClient(timeout=30) as client:
        events = []
        async with client.stream("POST", url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                "stream": True}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert {chunk["model"] for chunk in chunks} == {"sim"}
        assert sum(bool(c["choices"] and c["choices"][0]["delta"].get("content"))
                   for c in chunks) == 3
        responses = await client.post(url + "/v1/responses", json={"input": "hi"})
        assert (responses.status_code, responses.json()["model"]) == (200, "sim")
        messages = await client.post(url + "/v1/messages", json={
            "model": None, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert (messages.status_code, messages.json()["model"]) == (200, "sim")
