"""The official anthropic client against a real ``vllm-gateway serve`` process: Anthropic's
Messages API forwarded to the simulator, and the gateway's own errors raised as the client's own
exception types."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import openai
import pytest

from tests.support import HTTP, module_gateway

KEY = "sk-gateway-test"
SIM = '["{python}", "-m", "simulator", "--port", "{port}", "--model", "{name}"'
CONFIG = f"""
[gateway]
queue_timeout = 3.0
[auth]
api_keys = ["{KEY}"]
[[models]]
name = "sim-chat"
aliases = ["claude-local"]
launcher = "process"
command = {SIM}, "--tokens-per-second", "500"]
startup_timeout = 20.0
[[models]]
name = "sim-slow"
launcher = "process"
command = {SIM}, "--tokens-per-second", "10"]
startup_timeout = 20.0
max_concurrent = 1
max_queue_size = 1
[[models]]
name = "sim-dying"
launcher = "process"
command = {SIM}, "--die-after-tokens", "2"]
startup_timeout = 20.0
"""
# The gateway's Retry-After for a full queue: its queue_timeout (capped at 10 s).
QUEUE_RETRY_AFTER = 3
HELLO = [{"role": "user", "content": "hello there"}]


gateway = module_gateway(CONFIG)


@pytest.fixture
def client(gateway: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway, api_key=KEY, max_retries=0)


def rejected_queue_full(url: str) -> float:
    metrics = HTTP.get(url + "/metrics").text
    found = re.search(r'gateway_rejected_total\{model="sim-slow",reason="queue_full"\} (\S+)',
                      metrics)
    return float(found.group(1)) if found else 0.0


def test_a_message_through_an_alias(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="claude-local", max_tokens=5, messages=HELLO)
    assert message.type == "message" and message.role == "assistant"
    assert message.model == "sim-chat"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text.count("tok") == 5
    assert message.stop_reason == "max_tokens"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (2, 5)


def test_a_stream_has_every_event_in_order(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="sim-chat", max_tokens=3, messages=HELLO) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    raw = [e for e in events if e != "text"]  # the helper adds a "text" event per delta
    assert raw == ["message_start", "content_block_start", *["content_block_delta"] * 3,
                   "content_block_stop", "message_delta", "message_stop"]
    assert final.content[0].text == "tok " * 3
    assert final.stop_reason == "max_tokens"


def test_a_stream_arrives_as_the_tokens_are_made(gateway: str) -> None:
    body = {"model": "sim-slow", "max_tokens": 5, "messages": HELLO, "stream": True}
    began = time.monotonic()
    arrivals = []
    with HTTP.stream("POST", gateway + "/v1/messages", json=body,
                     headers={"x-api-key": KEY}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = b""
        for chunk in response.iter_raw():
            arrivals.append(time.monotonic() - began)
            text += chunk
    # The simulator makes 10 tokens a second: the first comes ~0.1 s in, the last ~0.5 s.
    assert arrivals[-1] - arrivals[0] > 0.3
    assert text.startswith(b"event: message_start\ndata: {")
    assert text.count(b"event: content_block_delta\n") == 5
    assert text.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


def test_count_tokens(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model="sim-chat", messages=HELLO,
                                           system="be brief")
    assert counted.input_tokens == 4


def test_an_unknown_model_is_the_clients_not_found_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="no-such-model", max_tokens=5, messages=HELLO)
    assert caught.value.body == {"type": "error", "error": {
        "type": "not_found_error", "message": "The model 'no-such-model' does not exist."}}
    assert caught.value.type == "not_found_error"


def test_the_key_goes_in_x_api_key_and_a_wrong_one_is_an_authentication_error(
        gateway: str) -> None:
    wrong = anthropic.Anthropic(base_url=gateway, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        wrong.messages.count_tokens(model="sim-chat", messages=HELLO)
    assert caught.value.body["error"]["type"] == "authentication_error"
    # The same key works for an OpenAI client, as a bearer token, with OpenAI's error shape.
    client = openai.OpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0)
    assert client.models.list().data
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert not_found.value.body["code"] == "model_not_found"


def test_a_full_queue_is_a_rate_limit_error_retried_after_retry_after(
        gateway: str, client: anthropic.Anthropic) -> None:
    client.messages.create(model="sim-slow", max_tokens=1, messages=HELLO)  # started
    before = rejected_queue_full(gateway)
    with ThreadPoolExecutor(2) as pool:
        # One holds the slot for ~1.5 s, one waits for it: the queue (1 place) is full.
        holder = pool.submit(client.messages.create, model="sim-slow", max_tokens=15,
                             messages=HELLO)
        time.sleep(0.3)
        waiter = pool.submit(client.messages.create, model="sim-slow", max_tokens=1,
                             messages=HELLO)
        time.sleep(0.3)
        with pytest.raises(anthropic.RateLimitError) as caught:
            client.messages.create(model="sim-slow", max_tokens=1, messages=HELLO)
        assert caught.value.response.headers["retry-after"] == str(QUEUE_RETRY_AFTER)
        assert caught.value.body["error"]["type"] == "rate_limit_error"
        # A client that retries waits Retry-After seconds, by which time the queue is empty.
        retrying = anthropic.Anthropic(base_url=gateway, api_key=KEY, max_retries=1)
        began = time.monotonic()
        answer = retrying.messages.create(model="sim-slow", max_tokens=1, messages=HELLO)
        waited = time.monotonic() - began
        assert holder.result().usage.output_tokens == 15
        assert waiter.result().usage.output_tokens == 1
    assert answer.usage.output_tokens == 1
    assert QUEUE_RETRY_AFTER <= waited < QUEUE_RETRY_AFTER + 5
    assert rejected_queue_full(gateway) == before + 2


def test_a_backend_dying_mid_stream_ends_it_with_an_anthropic_error_event(
        client: anthropic.Anthropic, gateway: str) -> None:
    with pytest.raises(anthropic.APIStatusError) as caught:
        with client.messages.stream(model="sim-dying", max_tokens=5, messages=HELLO) as stream:
            for _ in stream:
                pass
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "api_error"
    assert "sim-dying" in caught.value.body["error"]["message"]
