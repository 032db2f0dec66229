"""The simulator (simulator/server.py) held to real vLLM: the same requests to both, and what
a client or the gateway can see compared.

Compared: status codes and the error envelope (``type``, ``param``, ``code``), the SSE framing
(a role chunk first, the finish reason on the last content chunk, a usage chunk with
``choices: []``, then ``[DONE]``), the answer's usage, the fields of ``/v1/models``, the
metrics the simulator serves (names, types, labels), health while the server loads (the port
refuses connections until it is ready), the keep-alive (an idle connection is closed after
5 s), and the runtime LoRA API (a load's and an unload's answers and errors, an adapter's entry
in ``/v1/models``).

Deliberately different, and not compared:
- the text: the simulator answers ``"tok "`` per token, the tiny model random bytes; vLLM also
  stops at an end-of-sequence token (these requests send ``ignore_eos``), the simulator never;
- the timing: the simulator paces tokens at ``--tokens-per-second``; vLLM, when its reader
  lags, merges several tokens into one chunk (so chunk counts differ, not the framing);
- the prompt's token count: vLLM tokenizes (and applies the chat template), the simulator
  counts words;
- error messages' wording beyond the part a client matches on, and vLLM's list of aliases;
- fields only vLLM sends (``system_fingerprint``, ``prompt_token_ids``, ``token_ids``,
  ``service_tier``, ``kv_transfer_params``, ...), the model's ``root`` (vLLM's model
  directory) and ``permission`` (vLLM's permission object);
- the metrics only vLLM has (the simulator serves the two the gateway's tests watch);
- bodies that are not a JSON object: the gateway answers them itself (400 ``invalid_json``),
  so they never reach a backend.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.support import simulator

from .conftest import LORA_ENV, MAX_MODEL_LEN, STARTUP_TIMEOUT, Served, load_health

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(STARTUP_TIMEOUT + 60)]

HI = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
KEEP_ALIVE = 5.0  # vLLM's (uvicorn's timeout_keep_alive), the simulator's default


@pytest.fixture(scope="module")
def backends(served: Served) -> Iterator[dict[str, str]]:
    """vLLM's own address and a simulator's, serving the same model name and context, both
    with the runtime LoRA API."""
    httpx2.post(served.url + "/admin/models/tiny/load", headers=served.auth,
                timeout=STARTUP_TIMEOUT)
    with simulator("--max-model-len", str(MAX_MODEL_LEN), "--enable-lora", model="tiny",
                   env=LORA_ENV) as sim:
        yield {"vllm": served.backend(), "simulator": sim.url}


def both(backends: dict[str, str], path: str, body: Any) -> dict[str, httpx2.Response]:
    return {name: httpx2.post(url + path, json=body, timeout=60)
            for name, url in backends.items()}


ERRORS = [
    (CHAT, {"model": "no-such-model", "messages": HI}),
    (CHAT, {"model": "tiny", "messages": HI, "max_tokens": MAX_MODEL_LEN + 1}),
    (CHAT, {"model": "tiny", "messages": HI, "max_tokens": 0}),
    (CHAT, {"model": "tiny", "messages": HI, "max_tokens": "many"}),
    (CHAT, {"model": "tiny", "messages": "not a list"}),
    (CHAT, {"model": "tiny"}),
    (CHAT, {"model": "tiny", "messages": []}),
    (COMPLETIONS, {"model": "tiny"}),
    (COMPLETIONS, {"model": "no-such-model", "prompt": "hi"}),
    (COMPLETIONS, {"model": "tiny", "prompt": "hi", "max_tokens": MAX_MODEL_LEN + 1}),
]


@pytest.mark.parametrize(("path", "body"), ERRORS, ids=[json.dumps(b) for _, b in ERRORS])
def test_errors_have_the_same_status_and_envelope(backends: dict[str, str], path: str,
                                                   body: dict[str, Any]) -> None:
    seen = {}
    for name, response in both(backends, path, body).items():
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"], name
        seen[name] = (response.status_code, error["type"], error["param"], error["code"])
    assert seen["simulator"] == seen["vllm"]


def test_plain_answers_have_the_same_shape_and_usage(backends: dict[str, str]) -> None:
    for path, body in ((CHAT, {"messages": HI}), (COMPLETIONS, {"prompt": "hello"})):
        answers = both(backends, path, {"model": "tiny", "max_tokens": 5, "ignore_eos": True,
                                        **body})
        shapes = {}
        for name, response in answers.items():
            answer = response.json()
            choice = answer["choices"][0]
            shapes[name] = (response.status_code, answer["object"], answer["model"],
                            sorted(set(choice) & {"index", "message", "text", "finish_reason"}),
                            choice["finish_reason"], answer["usage"]["completion_tokens"],
                            choice.get("message", {}).get("role"))
        assert shapes["simulator"] == shapes["vllm"], path


def _events(url: str, path: str, body: dict[str, Any]) -> tuple[str, list[str]]:
    with httpx2.stream("POST", url + path, json=body, timeout=60) as response:
        raw = b"".join(response.iter_raw())
        media_type = response.headers["content-type"].split(";")[0]
    assert raw.endswith(b"\n\n")
    return media_type, raw.decode(errors="replace").split("\n\n")[:-1]


def _framing(events: list[str]) -> list[str]:
    """Each event as what it is: role, content (repeats merged), finish, usage, done."""
    kinds: list[str] = []
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
        data = event.removeprefix("data: ")
        if data == "[DONE]":
            kinds.append("done")
            continue
        chunk = json.loads(data)
        if not chunk["choices"]:
            kinds.append(f"usage {chunk['usage']['completion_tokens']}")
            continue
        choice = chunk["choices"][0]
        if choice.get("delta", {}).get("role") == "assistant":
            kinds.append("role")
        elif choice["finish_reason"] is not None:
            kinds.append(f"finish {choice['finish_reason']}")
        elif kinds[-1:] != ["content"]:
            kinds.append("content")
    return kinds


@pytest.mark.parametrize(("path", "body", "framing"), [
    (CHAT, {"messages": HI},
     ["role", "content", "finish length", "usage 6", "done"]),
    (COMPLETIONS, {"prompt": "hello"},
     ["content", "finish length", "usage 6", "done"]),
])
def test_streams_have_the_same_framing(backends: dict[str, str], path: str,
                                       body: dict[str, Any], framing: list[str]) -> None:
    request = {"model": "tiny", "max_tokens": 6, "stream": True, "ignore_eos": True,
               "stream_options": {"include_usage": True}, **body}
    for name, url in backends.items():
        media_type, events = _events(url, path, request)
        assert (name, media_type) == (name, "text/event-stream")
        assert (name, _framing(events)) == (name, framing)


def test_models_lists_have_the_same_fields(backends: dict[str, str]) -> None:
    listed = {name: httpx2.get(url + "/v1/models", timeout=10).json()
              for name, url in backends.items()}
    shapes = {name: (body["object"], [(m["id"], m["object"], m["owned_by"], m["max_model_len"],
                                      sorted(m)) for m in body["data"]])
              for name, body in listed.items()}
    assert shapes["simulator"] == shapes["vllm"]


def test_the_lora_api_answers_as_vllms(backends: dict[str, str],
                                      tiny_loras: dict[str, Path]) -> None:
    name, path = next(iter(tiny_loras.items()))
    load, unload = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"

    def same(answers: dict[str, httpx2.Response]) -> int:
        seen = {n: (r.status_code, r.json() if r.status_code != 200 else r.text)
                for n, r in answers.items()}
        assert seen["simulator"] == seen["vllm"]
        return seen["vllm"][0]

    assert same(both(backends, load, {"lora_name": "gone",
                                      "lora_path": str(path.parent / "gone")})) == 404
    try:
        assert same(both(backends, load, {"lora_name": name, "lora_path": str(path)})) == 200
        assert same(both(backends, load, {"lora_name": name, "lora_path": str(path)})) == 400
        cards = {n: [(m["id"], m["parent"], m["max_model_len"], sorted(m))
                     for m in httpx2.get(url + "/v1/models", timeout=10).json()["data"]]
                 for n, url in backends.items()}
        assert cards["simulator"] == cards["vllm"]
    finally:
        assert same(both(backends, unload, {"lora_name": name})) == 200
    assert same(both(backends, unload, {"lora_name": name})) == 404


def _metric_families(url: str) -> dict[str, tuple[str, list[str]]]:
    """Each ``vllm:`` metric's type and its label names."""
    types: dict[str, str] = {}
    labels: dict[str, list[str]] = {}
    for line in httpx2.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("# TYPE vllm:"):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line.startswith("vllm:") and "{" in line:
            name, rest = line.split("{", 1)
            labels.setdefault(name, sorted(p.split("=")[0] for p in rest.split("}")[0]
                                           .split(",")))
    return {name: (kind, labels.get(name, [])) for name, kind in types.items()}


def test_the_simulators_metrics_are_vllms(backends: dict[str, str]) -> None:
    vllm = _metric_families(backends["vllm"])
    simulated = _metric_families(backends["simulator"])
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting"} <= simulated.keys()
    assert {name: vllm.get(name) for name in simulated} == simulated


def _closed_after(url: str) -> float:
    """Seconds until the server closes an idle connection after one answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        answered = time.monotonic()
        sock.settimeout(3 * KEEP_ALIVE)
        while sock.recv(65536):
            pass
        return time.monotonic() - answered


def test_an_idle_connection_is_closed_after_the_same_keep_alive(
        backends: dict[str, str]) -> None:
    closed: dict[str, float] = {}
    threads = [threading.Thread(target=lambda n=name, u=url: closed.update({n: _closed_after(u)}))
               for name, url in backends.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in backends:
        assert KEEP_ALIVE - 0.5 < closed[name] < KEEP_ALIVE + 1.5, (name, closed)


def test_health_while_loading_is_a_refused_connection(served: Served) -> None:
    seen = {"vllm": load_health(served)}
    with simulator("--startup-delay", "1.0", ready=False) as sim:
        outcomes = []
        while True:
            try:
                outcomes.append(httpx2.get(sim.url + "/health", timeout=2).status_code)
                break
            except httpx2.ConnectError:
                outcomes.append("refused")
            time.sleep(0.05)
    seen["simulator"] = outcomes
    for name, outcomes in seen.items():
        assert set(outcomes[:-1]) == {"refused"} and outcomes[-1] == 200, (name, outcomes)
