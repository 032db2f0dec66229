"""No thrash: with room for one model, requests for two sleep-capable models are served in runs
per model, through the gateway on a real socket (its slots queue the requests of a run)."""

from __future__ import annotations

from typing import Any

import anyio
import httpx2
import pytest

from tests.support import chat, make_config, serving, sim_model

pytestmark = pytest.mark.anyio

DEV_MODE = {"VLLM_SERVER_DEV_MODE": "1"}


def sleepy(name: str, *args: str) -> dict[str, Any]:
    return sim_model(name, "--startup-delay", "0.5", "--enable-sleep-mode", "--wake-delay",
                     "0.05", *args, sleep_level=1, env=DEV_MODE)


async def test_an_interleaved_burst_for_two_models_costs_at_most_three_sleeps() -> None:
    config = make_config([sleepy("a", "--tokens-per-second", "40"),
                          sleepy("b", "--tokens-per-second", "40")],
                         gateway={"max_models_concurrent": 1, "max_concurrent": 1})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=60) as client:
        statuses: list[int] = []

        async def send(model: str) -> None:
            answer = await client.post(url + "/v1/chat/completions", json=chat(model))
            statuses.append(answer.status_code)

        async with anyio.create_task_group() as tg:
            for model in "ab" * 10:
                tg.start_soon(send, model)
                await anyio.sleep(0.01)
        backends = gateway.pool.backends
    assert statuses == [200] * 20
    assert sum(b.sleeps for b in backends.values()) <= 3
    assert sum(b.starts for b in backends.values()) == 2


async def test_a_busy_model_yields_its_turn_within_the_placement_timeout() -> None:
    # a's run is 12 requests of 0.3 s one after the other (one slot): 3.6 s, past b's 2 s.
    config = make_config([sleepy("a", "--tokens-per-second", "10"), sleepy("b")],
                         gateway={"max_models_concurrent": 1, "max_concurrent": 1,
                                  "placement_timeout": 2.0})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=60) as client:
        answers: dict[str, list[tuple[int, float]]] = {"a": [], "b": []}

        async def send(model: str, tokens: int) -> None:
            began = anyio.current_time()
            answer = await client.post(url + "/v1/chat/completions",
                                       json=chat(model, max_tokens=tokens))
            answers[model].append((answer.status_code, anyio.current_time() - began))

        await gateway.pool.load("a")
        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(send, "a", 3)
            await anyio.sleep(0.3)
            tg.start_soon(send, "b", 1)
    assert answers["b"][0][0] == 200
    assert answers["b"][0][1] < 2.0 + 1.0  # its turn came: a yielded, slept, b woke or started
    assert [status for status, _ in answers["a"]] == [200] * 12
    assert gateway.pool.backends["a"].sleeps >= 1
