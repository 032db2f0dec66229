"""Tests of simulator/server.py, run as real subprocesses over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from simulator.server import SimulatorConfig, serve

ROOT = Path(__file__).resolve().parents[1]

MODEL = "sim-model"
START_TIMEOUT = 30.0  # start-up is CPU-bound: slow on a busy machine
STATS_KEYS = {
    "requests",
    "by_path",
    "running",
    "waiting",
    "completed",
    "aborted",
    "cut",
    "errors",
    "connections",
    "open_connections",
}


# httpx2 builds an SSL context (~80 ms) per client unless told not to verify.
def get(url: str, **kwargs: Any) -> httpx2.Response:
    return httpx2.get(url, verify=False, **kwargs)


def post(url: str, **kwargs: Any) -> httpx2.Response:
    return httpx2.post(url, verify=False, **kwargs)


def client(url: str) -> httpx2.Client:
    return httpx2.Client(base_url=url, verify=False)


@dataclass
class Sim:
    """A simulator subprocess."""

    proc: subprocess.Popen[bytes]
    url: str
    port: int
    stderr_path: Path

    def stats(self) -> dict[str, Any]:
        return get(f"{self.url}/sim/stats").json()

    def reset(self) -> None:
        post(f"{self.url}/sim/reset")

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def assert_quiet(self) -> None:
        """Nothing but the start-up line on stderr (no tracebacks, no errors)."""
        lines = self.stderr().splitlines()
        assert len(lines) == 1 and lines[0].startswith("simulator: "), lines

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 3.0
    ) -> dict[str, Any]:
        """Poll /sim/stats until ``predicate`` holds; return those stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"stats never matched: {stats}")
            time.sleep(0.01)


def _spawn(args: list[str], stderr_path: Path) -> subprocess.Popen[bytes]:
    with stderr_path.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "simulator", "--port", "0", "--model", MODEL, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )


def _wait_listening(proc: subprocess.Popen[bytes], stderr_path: Path) -> Sim:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("listening on http://"):
        proc.kill()
        raise AssertionError(f"no start: {line!r} {stderr_path.read_text()}")
    url = line.split()[-1]
    return Sim(proc, url, int(url.rsplit(":", 1)[1]), stderr_path)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Sim]]:
    """``launch(*args)`` starts a fresh simulator, killed after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> Sim:
        stderr_path = tmp_path / f"sim-{len(procs)}.stderr"
        procs.append(_spawn(list(args), stderr_path))
        return _wait_listening(procs[-1], stderr_path)

    yield start
    for proc in procs:
        _kill(proc)


# Simulators shared by the tests of this module (each test that looks at
# counters resets them first).  Start-up (~0.5 s, mostly importing aiohttp) is
# the slowest part of these tests, so they are few and all start at once.
FLEET_ARGS: dict[str, list[str]] = {
    "default": [],
    "paced": ["--tokens-per-second", "20"],
    "queue": ["--max-concurrency", "1", "--tokens-per-second", "100"],
    "faults": ["--fail-health", "2", "--error-rate", "0.5", "--seed", "7"],
    "same_seed": ["--error-rate", "0.5", "--seed", "7"],
    "die": ["--die-after-tokens", "3", "--tokens-per-second", "400"],
}


class Fleet:
    """The ``FLEET_ARGS`` simulators; ``fleet[name]`` waits for one to listen."""

    def __init__(self, directory: Path) -> None:
        self._spawned = {
            name: (_spawn(args, directory / f"{name}.stderr"), directory / f"{name}.stderr")
            for name, args in FLEET_ARGS.items()
        }
        self._sims: dict[str, Sim] = {}

    def __getitem__(self, name: str) -> Sim:
        if name not in self._sims:
            self._sims[name] = _wait_listening(*self._spawned[name])
        return self._sims[name]

    def kill(self) -> None:
        for proc, _ in self._spawned.values():
            _kill(proc)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    started = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        yield started
    finally:
        started.kill()


@pytest.fixture
def sim(fleet: Fleet) -> Sim:
    return fleet["default"]


def chat(max_tokens: object = 4, **extra: Any) -> dict[str, Any]:
    """A chat request body (3 prompt words); ``max_tokens=None`` leaves it out."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello there simulator"}],
        "max_tokens": max_tokens,
        **extra,
    }
    return {key: value for key, value in body.items() if value is not None}


def sse_events(text: str) -> list[str]:
    events = text.split("\n\n")
    assert events[-1] == ""
    assert all(event.startswith("data: ") for event in events[:-1])
    return [event.removeprefix("data: ") for event in events[:-1]]


def raw_request(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a POST on a fresh socket and return it, response unread."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    """Read until the peer closes or resets the connection."""
    chunks = []
    sock.settimeout(5)
    with sock, contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# -- endpoints ----------------------------------------------------------------


def test_models(sim: Sim) -> None:
    resp = get(f"{sim.url}/v1/models")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["object"] == "list"
    [model] = body["data"]
    assert model["id"] == model["root"] == MODEL
    assert model["object"] == "model" and model["owned_by"] == "vllm"
    assert isinstance(model["created"], int) and model["max_model_len"] > 0


def test_health_ok(sim: Sim) -> None:
    resp = get(f"{sim.url}/health")
    assert resp.status_code == 200 and resp.content == b""


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"max_tokens": 5}, 5),
        ({"max_completion_tokens": 3, "max_tokens": 9}, 3),
        ({}, 16),
    ],
)
def test_chat_non_streaming(sim: Sim, extra: dict[str, Any], expected: int) -> None:
    resp = post(f"{sim.url}/v1/chat/completions", json={**chat(None), **extra})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "tok " * expected
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": expected,
        "total_tokens": 3 + expected,
    }


def test_completions_non_streaming(sim: Sim) -> None:
    resp = post(
        f"{sim.url}/v1/completions",
        json={"model": MODEL, "prompt": "one two", "max_tokens": 7},
    )
    assert resp.status_code == 200
    body = resp.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    [choice] = body["choices"]
    assert choice["text"] == "tok " * 7 and choice["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 7,
        "total_tokens": 9,
    }


def test_chat_streaming(sim: Sim) -> None:
    resp = post(
        f"{sim.url}/v1/chat/completions",
        json=chat(3, stream=True, stream_options={"include_usage": True}),
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len({chunk["id"] for chunk in chunks}) == 1
    for chunk in chunks:
        assert chunk["id"].startswith("chatcmpl-")
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == MODEL and isinstance(chunk["created"], int)
    role, *tokens, usage = chunks
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [t["choices"][0]["delta"] for t in tokens] == [{"content": "tok "}] * 3
    assert [t["choices"][0]["finish_reason"] for t in tokens] == [None, None, "length"]
    assert all(t["choices"][0]["logprobs"] is None for t in tokens)
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "total_tokens": 6,
    }


def test_completions_streaming_without_usage(sim: Sim) -> None:
    resp = post(
        f"{sim.url}/v1/completions",
        json={"model": MODEL, "prompt": ["a", "b c"], "max_tokens": 2, "stream": True},
    )
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert [c["object"] for c in chunks] == ["text_completion"] * 2
    assert [c["choices"][0]["text"] for c in chunks] == ["tok ", "tok "]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "length"]
    assert all("usage" not in c for c in chunks)


def test_embeddings(sim: Sim) -> None:
    url = f"{sim.url}/v1/embeddings"
    body = post(url, json={"model": MODEL, "input": ["a b", "c"]}).json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert [d["index"] for d in body["data"]] == [0, 1]
    for item in body["data"]:
        assert item["object"] == "embedding"
        assert len(item["embedding"]) == 8
        assert all(isinstance(x, float) for x in item["embedding"])
    assert body["usage"]["prompt_tokens"] == 3 == body["usage"]["total_tokens"]
    single = post(url, json={"input": "a b"}).json()
    assert single["data"][0]["embedding"] == body["data"][0]["embedding"]


BAD = "BadRequestError"
INVALID = "Bad Request"  # vLLM's type for a body that fails its request validation


@pytest.mark.parametrize(
    ("path", "body", "kind", "param"),
    [
        ("/v1/chat/completions", b"{not json", BAD, None),
        ("/v1/chat/completions", b"[1, 2]", BAD, None),
        ("/v1/chat/completions", {"model": MODEL}, INVALID, "body.messages"),
        ("/v1/chat/completions", {"messages": "hi"}, INVALID, "body.messages"),
        ("/v1/chat/completions", {"messages": []}, BAD, None),
        ("/v1/chat/completions", chat(0), BAD, "max_tokens"),
        ("/v1/chat/completions", chat(-1), BAD, "max_tokens"),
        ("/v1/chat/completions", chat(4097), BAD, "max_tokens"),
        ("/v1/chat/completions", chat("5"), INVALID, "body.max_tokens"),
        ("/v1/chat/completions", chat(1.5), INVALID, "body.max_tokens"),
        ("/v1/chat/completions", chat(True), INVALID, "body.max_tokens"),
        ("/v1/chat/completions", chat(None, max_completion_tokens=0), BAD, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "max_tokens": 3}, BAD, "prompt"),
        ("/v1/completions", {"prompt": 7}, INVALID, "body.prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, BAD, "max_tokens"),
        ("/v1/embeddings", {"model": MODEL}, BAD, None),
        ("/v1/embeddings", {"input": [1, 2]}, BAD, None),
    ],
)
def test_bad_request(
    sim: Sim, path: str, body: bytes | dict[str, Any], kind: str, param: str | None
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = post(f"{sim.url}{path}", content=content)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == kind and error["code"] == 400
    assert error["param"] == param and error["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat(2, model="other")),
        ("/v1/completions", {"model": "other", "prompt": "x"}),
        ("/v1/embeddings", {"model": "other", "input": "x"}),
    ],
)
def test_unknown_model(sim: Sim, path: str, body: dict[str, Any]) -> None:
    resp = post(f"{sim.url}{path}", json=body)
    assert resp.status_code == 404
    assert resp.json() == {
        "error": {
            "message": "The model `other` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


def test_metrics(sim: Sim) -> None:
    resp = get(f"{sim.url}/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    lines = resp.text.splitlines()
    for name in ("num_requests_running", "num_requests_waiting"):
        assert f"# TYPE vllm:{name} gauge" in lines
        assert f'vllm:{name}{{engine="0",model_name="{MODEL}"}} 0.0' in lines


def test_stats_count_and_reset(sim: Sim) -> None:
    sim.reset()
    post(f"{sim.url}/v1/chat/completions", json=chat(2))
    post(f"{sim.url}/v1/chat/completions", json=chat(0))
    post(f"{sim.url}/v1/embeddings", json={"input": "x"})
    get(f"{sim.url}/health")
    stats = sim.stats()
    assert set(stats) == STATS_KEYS
    assert stats["requests"] == 3 and stats["completed"] == 1
    assert stats["by_path"] == {
        "/v1/chat/completions": 2,
        "/v1/embeddings": 1,
        "/health": 1,
    }
    assert stats["connections"] == 5  # one per request above
    reset = post(f"{sim.url}/sim/reset").json()
    assert set(reset) == STATS_KEYS
    assert reset["requests"] == reset["completed"] == reset["connections"] == 0
    assert reset["by_path"] == {}
    assert reset["open_connections"] >= 1  # the reset's own connection


def test_keep_alive_counts_one_connection(sim: Sim) -> None:
    before = sim.stats()["connections"]
    with client(sim.url) as first:
        for _ in range(3):
            assert first.post("/v1/chat/completions", json=chat(1)).is_success
            assert first.get("/health").is_success
        assert first.get("/sim/stats").json()["connections"] == before + 1
        with client(sim.url) as second:
            stats = second.get("/sim/stats").json()
            assert stats["connections"] == before + 2
            assert stats["open_connections"] >= 2
    sim.wait_for(lambda s: s["open_connections"] == 1)  # the poll's own


def test_an_idle_connection_is_closed_after_the_keep_alive(launch: Callable[..., Sim]) -> None:
    sim = launch("--keep-alive", "0.5")
    with socket.create_connection((sim.url.split("//")[1].split(":")[0], sim.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: sim\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        opened = time.monotonic()
        sock.settimeout(5)
        assert sock.recv(4096) == b""  # closed by the simulator
        assert 0.4 <= time.monotonic() - opened < 2.0


# -- pacing, aborts and concurrency -------------------------------------------


def test_connections_refused_during_startup_delay(launch: Callable[..., Sim]) -> None:
    # As vLLM: its port opens only once the engine is ready (no 503 while it loads).
    launched = time.monotonic()
    sim = launch("--startup-delay", "1.0")
    with pytest.raises(httpx2.ConnectError):
        get(f"{sim.url}/health")
    while True:
        try:
            response = get(f"{sim.url}/health")
            break
        except httpx2.ConnectError:
            assert time.monotonic() - launched < 5
            time.sleep(0.02)
    assert time.monotonic() - launched >= 1.0
    assert response.status_code == 200


def test_streaming_is_incremental(fleet: Fleet) -> None:
    sim = fleet["paced"]
    arrivals = []
    start = time.monotonic()
    with httpx2.stream(
        "POST",
        f"{sim.url}/v1/chat/completions",
        json=chat(10, stream=True),
        verify=False,
    ) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic() - start, line))
    assert arrivals[-1][1] == "data: [DONE]"
    tokens = [t for t, line in arrivals if '"content":"tok "' in line]
    assert len(tokens) == 10
    assert tokens[0] < 0.3  # due 1/20 s after the request
    assert tokens[-1] - tokens[0] > 0.2  # 9 more tokens at 20/s: 0.45 s
    assert 0.45 <= tokens[-1] < 2.0


def test_paced_non_streaming_takes_max_tokens_over_rate(fleet: Fleet) -> None:
    sim = fleet["paced"]
    start = time.monotonic()
    resp = post(f"{sim.url}/v1/chat/completions", json=chat(6))
    assert 0.3 <= time.monotonic() - start < 2.0  # 6 tokens at 20/s
    assert resp.json()["usage"]["completion_tokens"] == 6


def test_stream_disconnect_is_aborted(fleet: Fleet) -> None:
    sim = fleet["paced"]
    sim.reset()
    sock = raw_request(sim.port, "/v1/chat/completions", chat(4_000, stream=True))
    with sock:
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sim.wait_for(lambda s: s["running"] == 1)
    stats = sim.wait_for(lambda s: s["aborted"] == 1)
    assert stats["running"] == 0 and stats["completed"] == 0
    sim.assert_quiet()


def test_non_streaming_disconnect_is_aborted(fleet: Fleet) -> None:
    sim = fleet["paced"]
    sim.reset()
    body = {"prompt": "x", "max_tokens": 4_000}
    with raw_request(sim.port, "/v1/completions", body):
        sim.wait_for(lambda s: s["running"] == 1)
    stats = sim.wait_for(lambda s: s["aborted"] == 1)
    assert stats["running"] == 0 and stats["completed"] == 0
    sim.assert_quiet()


def test_max_concurrency_queues(fleet: Fleet) -> None:
    sim = fleet["queue"]
    body = {"prompt": "x", "max_tokens": 4_000}
    socks = [raw_request(sim.port, "/v1/completions", body) for _ in range(3)]
    sim.wait_for(lambda s: s["running"] == 1 and s["waiting"] == 2)
    metrics = get(f"{sim.url}/metrics").text
    assert f'vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 1.0' in metrics
    assert f'vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 2.0' in metrics
    for sock in socks:
        sock.close()
    sim.wait_for(lambda s: (s["running"], s["waiting"], s["aborted"]) == (0, 0, 3))

    # Queued requests run one after the other: 2 x (10 tokens at 100/s).
    codes: list[int] = []

    def run() -> None:
        url = f"{sim.url}/v1/completions"
        codes.append(post(url, json={"prompt": "x", "max_tokens": 10}).status_code)

    start = time.monotonic()
    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [200, 200]
    assert time.monotonic() - start >= 0.2
    assert sim.stats()["completed"] == 2
    sim.assert_quiet()


# -- fault switches -------------------------------------------------------------


def test_fail_health(fleet: Fleet) -> None:
    sim = fleet["faults"]
    codes = [get(f"{sim.url}/health").status_code for _ in range(4)]
    assert codes == [503, 503, 200, 200]


def test_error_rate_is_deterministic(fleet: Fleet) -> None:
    sims = [fleet["faults"], fleet["same_seed"]]
    runs = []
    for sim in sims:
        sim.reset()
        with client(sim.url) as http:
            runs.append([http.post("/v1/chat/completions", json=chat(1)) for _ in range(20)])
    codes = [[resp.status_code for resp in run] for run in runs]
    assert codes[0] == codes[1]
    assert set(codes[0]) == {200, 500}
    error = next(resp for resp in runs[0] if resp.status_code == 500).json()
    assert error == {
        "error": {
            "message": "Simulated internal server error",
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }
    }
    stats = sims[0].stats()
    assert stats["errors"] == codes[0].count(500)
    assert stats["completed"] == codes[0].count(200)


def test_die_after_tokens(fleet: Fleet) -> None:
    sim = fleet["die"]
    data = read_to_end(raw_request(sim.port, "/v1/chat/completions", chat(10, stream=True)))
    assert data.startswith(b"HTTP/1.1 200")
    assert data.count(b'"content":"tok "') == 3
    assert b"[DONE]" not in data and not data.endswith(b"0\r\n\r\n")

    with pytest.raises(httpx2.RemoteProtocolError):
        post(f"{sim.url}/v1/completions", json={"prompt": "x", "max_tokens": 4})
    resp = post(f"{sim.url}/v1/chat/completions", json=chat(3))
    assert resp.json()["choices"][0]["message"]["content"] == "tok " * 3

    stats = sim.wait_for(lambda s: s["running"] == 0)
    assert (stats["cut"], stats["completed"], stats["aborted"]) == (2, 1, 0)
    sim.assert_quiet()


def test_exit_after_requests(launch: Callable[..., Sim]) -> None:
    sim = launch("--exit-after-requests", "2")
    with client(sim.url) as http:
        first = http.post("/v1/chat/completions", json=chat(2, stream=True))
        assert sse_events(first.text)[-1] == "[DONE]"
        second = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert second.json()["choices"][0]["text"] == "tok tok "
    assert sim.proc.wait(timeout=2) == 0
    with pytest.raises(httpx2.ConnectError):
        get(f"{sim.url}/health")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_fast(launch: Callable[..., Sim], signum: int) -> None:
    sim = launch("--tokens-per-second", "10")
    sock = raw_request(sim.port, "/v1/chat/completions", chat(1000, stream=True))
    with sock:
        sim.wait_for(lambda s: s["running"] == 1)
        start = time.monotonic()
        sim.proc.send_signal(signum)
        assert sim.proc.wait(timeout=2) == 0
        assert time.monotonic() - start < 1.0  # ~10 ms when the machine is idle
    sim.assert_quiet()


# -- in-process helper ------------------------------------------------------------


def test_serve_in_process() -> None:
    async def scenario() -> None:
        config = SimulatorConfig(model="m", exit_after_requests=2)
        async with serve(config) as running:
            async with httpx2.AsyncClient(base_url=running.url, verify=False) as http:
                resp = await http.get("/v1/models")
                assert resp.json()["data"][0]["id"] == "m"
                body = {"model": "m", "prompt": "x", "max_tokens": 2}
                assert (await http.post("/v1/completions", json=body)).is_success
                assert running.stats.completed == 1
                assert running.stats.connections == 1
                assert (await http.post("/v1/embeddings", json={"input": "x"})).is_success
            await asyncio.wait_for(running.wait_closed(), 2)
            with pytest.raises(OSError):
                await asyncio.open_connection(running.host, running.port)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"error_rate": 1.5},
        {"tokens_per_second": -1},
        {"exit_after_requests": 0},
        {"die_after_tokens": -1},
        {"model": ""},
    ],
)
def test_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimulatorConfig(**kwargs)
