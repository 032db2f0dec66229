"""The official openai client against a real ``vllm-gateway serve`` process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support import gateway_process

CONFIG = """
[gateway]
max_concurrent = 8
[[models]]
name = "sim-chat"
aliases = ["chat"]
launcher = "process"
command = ["{python}", "-m", "simulator", "--port", "{port}", "--model", "{name}",
           "--tokens-per-second", "200"]
startup_timeout = 20.0
idle_timeout = 60.0
"""


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    tmp: Path = tmp_path_factory.mktemp("openai")
    with gateway_process(CONFIG, tmp) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_chat_completion_from_a_model_started_on_demand(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="sim-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens == 5


def test_streaming_chat_through_an_alias(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.count("tok") == 6
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_completions(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="sim-chat", prompt="once upon", max_tokens=3)
    assert answer.choices[0].text.count("tok") == 3


def test_embeddings(client: openai.OpenAI) -> None:
    answer = client.embeddings.create(model="sim-chat", input=["a", "b"])
    assert [d.index for d in answer.data] == [0, 1]
    assert len(answer.data[0].embedding) > 0


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["sim-chat"]


def test_models_retrieve_by_name_or_alias(client: openai.OpenAI) -> None:
    for name in ("sim-chat", "chat"):
        model = client.models.retrieve(name)
        assert (model.id, model.object, model.owned_by) == ("sim-chat", "model", "vllm-gateway")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.body == {"message": "The model 'no-such-model' does not exist.",
                                 "type": "invalid_request_error", "param": "model",
                                 "code": "model_not_found"}


def test_unknown_model_raises_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found"
