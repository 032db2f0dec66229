"""A real vLLM through ``vllm-gateway serve``, seen with the official openai client: started on
demand, streaming, aborting what a client hangs up on, and passing vLLM's own errors through."""

from __future__ import annotations

import time

import anthropic
import httpx2
import openai
import pytest

from kernel.config import load_config
from tests.support import ROOT

from .conftest import (
    MAX_MODEL_LEN,
    STARTUP_TIMEOUT,
    VLLM_ENV,
    Served,
    metric,
    vllm_command,
    watch_load,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(STARTUP_TIMEOUT + 60)]

HI = [{"role": "user", "content": "hi"}]
# A generation of seconds (see MAX_MODEL_LEN): the random weights would stop it at their first
# end-of-sequence token without ignore_eos.
LONG = MAX_MODEL_LEN - 64


def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0,
                         timeout=300)


def test_first_request_starts_vllm_and_waits_for_it(served: Served) -> None:
    if served.admin()["state"] != "stopped":  # an earlier test started the shared one
        httpx2.post(served.url + "/admin/models/tiny/unload", headers=served.auth, timeout=60)
    starts = served.admin()["starts"]
    began = time.monotonic()
    answer = watch_load(served, lambda: client(served).chat.completions.create(
        model="tiny", messages=HI, max_tokens=5, extra_body={"ignore_eos": True}))
    print(f"cold start through the gateway: {time.monotonic() - began:.1f} s")
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    assert served.admin()["starts"] == starts + 1


def test_chat_completions_streaming_and_models(served: Served) -> None:
    api = client(served)
    chat = api.chat.completions.create(model="tiny", messages=HI, max_tokens=4,
                                       extra_body={"ignore_eos": True})
    assert chat.model == "tiny" and chat.usage is not None and chat.usage.completion_tokens == 4
    completion = api.completions.create(model="tiny", prompt="hello", max_tokens=3,
                                        extra_body={"ignore_eos": True})
    assert completion.object == "text_completion"
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    chunks = list(api.chat.completions.create(
        model="tiny", messages=HI, max_tokens=6, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert "tiny" in [m.id for m in api.models.list()]


def test_a_client_that_hangs_up_mid_stream_stops_the_generation(served: Served) -> None:
    api = client(served)
    api.completions.create(model="tiny", prompt="warm", max_tokens=1)  # started, and idle
    vllm = served.backend()
    before = metric(vllm, "generation_tokens_total")
    stream = api.completions.create(model="tiny", prompt="hello", max_tokens=LONG, stream=True,
                                    extra_body={"ignore_eos": True})
    next(iter(stream))  # under way (vLLM merges tokens into one chunk when a reader lags)
    stream.close()
    hung_up = time.monotonic()
    while metric(vllm, "num_requests_running") != 0:
        assert time.monotonic() - hung_up < 1.0, "vLLM still generates for a client that left"
        time.sleep(0.02)
    stopped = metric(vllm, "generation_tokens_total")
    time.sleep(0.5)
    assert metric(vllm, "generation_tokens_total") == stopped
    assert stopped - before < LONG  # stopped, not finished


def test_vllms_own_400s_reach_the_client_unchanged(served: Served) -> None:
    api = client(served)
    api.completions.create(model="tiny", prompt="warm", max_tokens=1)
    too_many = MAX_MODEL_LEN + 1
    direct = httpx2.post(served.backend() + "/v1/chat/completions", timeout=30,
                         json={"model": "tiny", "messages": HI, "max_tokens": too_many}).json()
    with pytest.raises(openai.BadRequestError) as too_long:
        api.chat.completions.create(model="tiny", messages=HI, max_tokens=too_many)
    assert too_long.value.body == direct["error"]
    assert too_long.value.body["param"] == "max_tokens"
    assert "cannot be greater than max_model_len" in too_long.value.message
    with pytest.raises(openai.BadRequestError) as malformed:
        api.chat.completions.create(model="tiny", messages="not a list")  # type: ignore[arg-type]
    assert malformed.value.body["type"] == "Bad Request"
    assert malformed.value.body["param"] == "body.messages"
    assert "Input should be a valid list" in malformed.value.message


def test_anthropic_clients_get_vllms_messages_api_and_the_gateways_errors_in_its_shape(
        served: Served) -> None:
    api = anthropic.Anthropic(base_url=served.url, api_key="unused", max_retries=0, timeout=300)
    message = api.messages.create(model="tiny", max_tokens=5, messages=HI)
    assert (message.type, message.role, message.model) == ("message", "assistant", "tiny")
    assert message.stop_reason in ("end_turn", "max_tokens")
    with api.messages.stream(model="tiny", max_tokens=5, messages=HI) as stream:
        kinds = [event.type for event in stream]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "message_delta" in kinds
    assert api.messages.count_tokens(model="tiny", messages=HI).input_tokens > 0
    with pytest.raises(anthropic.NotFoundError) as unknown:  # the gateway's own 404
        api.messages.create(model="no-such-model", max_tokens=5, messages=HI)
    assert unknown.value.body["error"]["type"] == "not_found_error"


def test_the_cpu_example_runs_the_vllm_this_tier_runs() -> None:
    config = load_config(str(ROOT / "examples" / "vllm-cpu.toml"), environ={})
    (model,) = config.models
    assert list(model.command) == vllm_command(".venv-vllm/bin/python", "/tmp/tiny-model")
    assert dict(model.env) == VLLM_ENV
    assert config.upstream.keepalive_expiry < 5.0  # vLLM's
