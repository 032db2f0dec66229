"""The simulator's sleep mode (simulator/sleep.py), as real subprocesses over real
sockets: served only with the flag and the variable real vLLM needs, vLLM's shapes, the delays,
requests held while asleep, the modes, the metric, and level 2's wake sequence as recorded."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from tests.support import Simulator, chat, simulator

SLEEP_PATHS = [("POST", "/sleep?level=1"), ("POST", "/wake_up"), ("GET", "/is_sleeping"),
               ("POST", "/collective_rpc")]


@pytest.fixture
def client() -> Iterator[httpx2.Client]:
    with httpx2.Client(timeout=10) as c:
        yield c


@pytest.fixture
def dev_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")


def sleepy(*args: str) -> Any:
    return simulator("--enable-sleep-mode", *args)


def sleep_state(client: httpx2.Client, sim: Simulator) -> dict[str, float]:
    lines = client.get(sim.url + "/metrics").text.splitlines()
    return {line.split('sleep_state="')[1].split('"')[0]: float(line.split()[-1])
            for line in lines if line.startswith("vllm:engine_sleep_state{")}


@pytest.mark.parametrize(("flag", "dev"), [(False, False), (True, False), (False, True)],
                         ids=["neither", "flag only", "variable only"])
def test_the_sleep_api_needs_the_flag_and_the_variable(
        monkeypatch: pytest.MonkeyPatch, client: httpx2.Client, flag: bool, dev: bool) -> None:
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1" if dev else "0")
    with simulator(*(["--enable-sleep-mode"] if flag else [])) as sim:
        for method, path in SLEEP_PATHS:
            assert client.request(method, sim.url + path).status_code == 404, path
        assert "vllm:engine_sleep_state" not in client.get(sim.url + "/metrics").text


def test_level_1_sleep_and_wake_in_vllms_shapes(dev_mode: None, client: httpx2.Client) -> None:
    with sleepy("--sleep-delay", "0.3", "--wake-delay", "0.4") as sim:
        assert client.get(sim.url + "/is_sleeping").json() == {"is_sleeping": False}
        assert sleep_state(client, sim) == {"awake": 1, "weights_offloaded": 0,
                                            "discard_all": 0}
        began = time.monotonic()
        answer = client.post(sim.url + "/sleep", params={"level": 1, "mode": "wait"})
        assert time.monotonic() - began >= 0.3
        assert answer.json() == {"status": "sleeping", "level": 1}
        assert client.get(sim.url + "/is_sleeping").json() == {"is_sleeping": True}
        assert sleep_state(client, sim) == {"awake": 0, "weights_offloaded": 1,
                                            "discard_all": 0}
        assert client.get(sim.url + "/health").status_code == 200  # /health says nothing
        began = time.monotonic()
        assert client.post(sim.url + "/wake_up").json() == {"status": "awake", "tags": None}
        assert time.monotonic() - began >= 0.4
        assert client.get(sim.url + "/is_sleeping").json() == {"is_sleeping": False}
        assert sleep_state(client, sim)["awake"] == 1


def test_a_request_is_held_while_asleep_and_answered_after_the_wake(
        dev_mode: None, client: httpx2.Client) -> None:
    with sleepy() as sim:
        client.post(sim.url + "/sleep", params={"level": 1})
        answers: list[httpx2.Response] = []
        sender = threading.Thread(target=lambda: answers.append(httpx2.post(
            sim.url + "/v1/chat/completions", json=chat("sim"), timeout=10)))
        sender.start()
        time.sleep(0.5)
        assert not answers  # held, not answered
        assert sim.stats()["waiting"] == 1
        assert client.get(sim.url + "/sim/sleep").json()["held"] == 1
        client.post(sim.url + "/wake_up")
        sender.join(5)
        assert answers[0].status_code == 200
        assert sim.stats()["completed"] == 1
        assert client.get(sim.url + "/sim/sleep").json()["held"] == 1


def test_level_2_wakes_weights_reloads_them_then_wakes_the_kv_cache(
        dev_mode: None, client: httpx2.Client) -> None:
    with sleepy() as sim:
        assert client.post(sim.url + "/sleep", params={"level": 2, "mode": "wait"}).json() == \
            {"status": "sleeping", "level": 2}
        assert sleep_state(client, sim)["discard_all"] == 1
        partial = client.post(sim.url + "/wake_up", params={"tags": "weights"})
        assert partial.json() == {"status": "sleeping", "tags": ["weights"]}
        assert client.get(sim.url + "/is_sleeping").json() == {"is_sleeping": True}
        rpc = client.post(sim.url + "/collective_rpc", json={"method": "reload_weights"})
        assert rpc.json() == {"results": [None]}
        assert client.post(sim.url + "/wake_up", params={"tags": "kv_cache"}).json() == \
            {"status": "awake", "tags": ["kv_cache"]}
        record = client.get(sim.url + "/sim/sleep").json()
        assert record["calls"] == ["sleep level=2 mode=wait", "wake_up weights",
                                   "collective_rpc reload_weights", "wake_up kv_cache"]
        assert record["weights_lost"] is False and record["asleep"] == []
        assert client.post(sim.url + "/v1/chat/completions", json=chat("sim")).status_code \
            == 200


def test_a_level_2_wake_without_the_reload_is_recorded(
        dev_mode: None, client: httpx2.Client) -> None:
    with sleepy() as sim:
        client.post(sim.url + "/sleep", params={"level": 2})
        assert client.post(sim.url + "/collective_rpc",
                           json={"method": "reload_weights"}).status_code == 500
        client.post(sim.url + "/wake_up")
        assert client.get(sim.url + "/sim/sleep").json()["weights_lost"] is True


def generation_during_sleep(client: httpx2.Client, sim: Simulator, mode: str,
                            wake_after: float = 0.0) -> tuple[httpx2.Response | Exception, float]:
    """A 1-s streamed generation, a sleep with ``mode`` 0.3 s into it, a wake ``wake_after``
    s after the sleep answered; the generation's outcome and how long the sleep took."""
    outcome: list[Any] = []

    def generate() -> None:
        try:
            with httpx2.stream("POST", sim.url + "/v1/chat/completions", timeout=10,
                               json=chat("sim", max_tokens=10, stream=True)) as response:
                response.read()
                outcome.append(response)
        except httpx2.HTTPError as exc:
            outcome.append(exc)

    sender = threading.Thread(target=generate)
    sender.start()
    time.sleep(0.3)
    began = time.monotonic()
    client.post(sim.url + "/sleep", params={"level": 1, "mode": mode})
    took = time.monotonic() - began
    time.sleep(wake_after)
    client.post(sim.url + "/wake_up")
    sender.join(10)
    return outcome[0], took


def test_mode_wait_lets_the_generation_finish_first(dev_mode: None,
                                                    client: httpx2.Client) -> None:
    with sleepy("--tokens-per-second", "10") as sim:
        outcome, took = generation_during_sleep(client, sim, "wait")
        assert isinstance(outcome, httpx2.Response) and outcome.text.endswith("[DONE]\n\n")
        assert took >= 0.5  # it waited for the rest of the generation


def test_mode_abort_cuts_the_generation(dev_mode: None, client: httpx2.Client) -> None:
    with sleepy("--tokens-per-second", "10") as sim:
        outcome, took = generation_during_sleep(client, sim, "abort")
        assert isinstance(outcome, Exception) or "[DONE]" not in outcome.text
        assert took < 0.5 and sim.stats()["aborted"] == 1


def test_mode_keep_pauses_the_generation_until_the_wake(dev_mode: None,
                                                        client: httpx2.Client) -> None:
    with sleepy("--tokens-per-second", "10") as sim:
        began = time.monotonic()
        outcome, took = generation_during_sleep(client, sim, "keep", wake_after=1.0)
        assert isinstance(outcome, httpx2.Response) and outcome.text.endswith("[DONE]\n\n")
        assert took < 0.5
        assert time.monotonic() - began >= 1.8  # 1 s of tokens + 1 s asleep


@pytest.mark.parametrize("query", [{"level": 3}, {"level": "x"}, {"mode": "later"}])
def test_a_bad_level_or_mode_is_refused(dev_mode: None, client: httpx2.Client,
                                        query: dict[str, Any]) -> None:
    with sleepy() as sim:
        assert client.post(sim.url + "/sleep", params=query).status_code == 422
        assert client.get(sim.url + "/is_sleeping").json() == {"is_sleeping": False}


def test_a_failing_wake_answers_500_and_the_engine_sleeps_on(dev_mode: None,
                                                             client: httpx2.Client) -> None:
    with sleepy("--fail-wake") as sim:
        client.post(sim.url + "/sleep", params={"level": 1})
        answer = client.post(sim.url + "/wake_up")
        assert answer.status_code == 500
        assert answer.json()["error"]["message"] == "Simulated wake failure"
        assert client.get(sim.url + "/is_sleeping").json() == {"is_sleeping": True}
