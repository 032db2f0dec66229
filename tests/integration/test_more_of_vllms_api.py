"""The rest of vLLM's API through a real ``vllm-gateway serve`` process, with the official openai
client: audio uploads (multipart forms), stored responses and the pooling paths."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

import openai
import pytest

from tests.support import HTTP, gateway_process, module_gateway

LIMIT = 256 * 1024
SIM = '["{python}", "-m", "simulator", "--port", "{port}", "--model", "{name}"'
CONFIG = f"""
[gateway]
max_body_bytes = {LIMIT}
[[models]]
name = "sim-a"
aliases = ["whisper"]
launcher = "process"
command = {SIM}]
startup_timeout = 20.0
[[models]]
name = "sim-b"
launcher = "process"
command = {SIM}, "--tokens-per-second", "20"]
startup_timeout = 20.0
"""


gateway = module_gateway(CONFIG)


@pytest.fixture
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)


def test_a_transcription_upload_arrives_intact(client: openai.OpenAI) -> None:
    audio = os.urandom(LIMIT // 2)
    answer = client.audio.transcriptions.create(model="sim-a", file=("talk.wav", audio),
                                                language="en")
    assert answer.text == hashlib.sha256(audio).hexdigest()


def test_an_upload_naming_an_alias_reaches_the_model_with_its_own_name(
        client: openai.OpenAI) -> None:
    audio = b"RIFF" + os.urandom(1000)
    answer = client.audio.translations.create(model="whisper", file=("talk.wav", audio))
    assert answer.text == hashlib.sha256(audio).hexdigest()


def test_an_upload_without_a_model_or_for_an_unknown_one_is_refused(gateway: str) -> None:
    files = {"file": ("talk.wav", b"RIFF")}
    missing = HTTP.post(gateway + "/v1/audio/transcriptions", files=files)
    assert (missing.status_code, missing.json()["error"]["code"]) == (400, "invalid_model")
    unknown = HTTP.post(gateway + "/v1/audio/transcriptions", files=files,
                        data={"model": "nope"})
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "model_not_found")
    as_json = HTTP.post(gateway + "/v1/audio/transcriptions", json={"model": "sim-a"})
    assert as_json.status_code == 415


def _read_answer(sock: socket.socket) -> bytes:
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer


def test_an_upload_over_the_limit_is_413_before_the_body_is_sent(gateway: str) -> None:
    host, port = gateway.removeprefix("http://").split(":")
    boundary = "b0undary"
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {LIMIT * 4}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + f"--{boundary}\r\n".encode())  # and nothing more of the body
        began = time.monotonic()
        answer = _read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert time.monotonic() - began < 5


def test_a_chunked_upload_over_the_limit_is_413_once_past_it(gateway: str) -> None:
    host, port = gateway.removeprefix("http://").split(":")
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: multipart/form-data; boundary=b0undary\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    piece = os.urandom(64 * 1024)
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        for _ in range(LIMIT // len(piece) + 1):  # just past the limit, never the end
            sock.sendall(chunk)
        answer = _read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_stored_responses_go_to_the_model_that_made_them(client: openai.OpenAI) -> None:
    made_by_b = client.responses.create(model="sim-b", input="hello", max_output_tokens=2)
    streamed = client.responses.create(model="sim-a", input="hello", max_output_tokens=3,
                                       stream=True)
    events = list(streamed)
    assert events[0].type == "response.created"
    made_by_a = events[-1].response
    # Each server knows only its own responses: an id sent to the other one would be its 404.
    assert client.responses.retrieve(made_by_b.id).output_text == "tok " * 2
    assert client.responses.retrieve(made_by_a.id).output_text == "tok " * 3


def test_a_background_response_is_cancelled_on_its_model(client: openai.OpenAI) -> None:
    queued = client.responses.create(model="sim-b", input="hello", max_output_tokens=100,
                                     background=True)
    assert queued.status == "queued"
    assert client.responses.cancel(queued.id).status == "cancelled"
    assert client.responses.retrieve(queued.id).status == "cancelled"


def test_an_unknown_response_id_is_404_and_so_is_another_verb(
        client: openai.OpenAI, gateway: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve("resp_never_made_here")
    assert caught.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_never_made_here")
    made = client.responses.create(model="sim-a", input="hello", max_output_tokens=1)
    # vLLM's POST /v1/responses/render, a DELETE: not forwarded, whatever the id.
    for method, path in (("POST", "/v1/responses/render"), ("DELETE", f"/v1/responses/{made.id}"),
                         ("GET", f"/v1/responses/{made.id}/cancel")):
        refused = HTTP.request(method, gateway + path)
        assert (refused.status_code, refused.json()["error"]["code"]) == (404, "not_found")


def test_pooling_and_classify(gateway: str) -> None:
    pooled = HTTP.post(gateway + "/pooling", json={"model": "sim-a", "input": ["a", "b"]})
    assert pooled.status_code == 200
    assert [d["object"] for d in pooled.json()["data"]] == ["pooling", "pooling"]
    classified = HTTP.post(gateway + "/classify", json={"model": "whisper", "input": "a"})
    assert classified.status_code == 200
    assert classified.json()["model"] == "sim-a"
    assert classified.json()["data"][0]["num_classes"] == 2


def test_the_same_under_the_trio_worker(tmp_path: Path) -> None:
    """httpx2 carries the upstream requests there: an upload, a stored response, an Anthropic
    error."""
    with gateway_process(CONFIG, tmp_path, "--worker", "trio") as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        audio = os.urandom(LIMIT // 2)
        answer = client.audio.transcriptions.create(model="whisper", file=("a.wav", audio))
        assert answer.text == hashlib.sha256(audio).hexdigest()
        events = list(client.responses.create(model="sim-b", input="hi", max_output_tokens=2,
                                              stream=True))
        assert client.responses.retrieve(events[0].response.id).status == "completed"
        refused = HTTP.post(url + "/v1/messages", json={"model": "nope", "max_tokens": 1,
                                                        "messages": []})
        assert (refused.status_code, refused.json()["error"]["type"]) == (404, "not_found_error")
