"""Sleep as a state of the pool: real simulators with vLLM's sleep API, started by the process
launcher, put to sleep instead of stopped, woken for their requests."""

from __future__ import annotations

import os
import signal
from typing import Any

import anyio
import httpx2
import pytest
import structlog

from backends import sleep as sleep_mode
from backends.pool import BackendPool, ModelState
from tests.backends.checks import running
from tests.backends.test_pool import launcher, pid_of, running_pool, states
from tests.support import HTTP, chat, eventually, make_config, sim_model

pytestmark = pytest.mark.anyio

START_DELAY = 1.5
WAKE_DELAY = 0.1
DEV_MODE = {"VLLM_SERVER_DEV_MODE": "1"}


def sleepy_model(name: str, *sim_args: str, level: int = 1, **settings: Any) -> dict[str, Any]:
    """A simulator with the sleep API that starts in START_DELAY s and wakes in WAKE_DELAY s."""
    return sim_model(name, "--startup-delay", str(START_DELAY), "--enable-sleep-mode",
                     "--wake-delay", str(WAKE_DELAY), *sim_args, sleep_level=level,
                     env=DEV_MODE, **settings)


async def sim_sleep(pool: BackendPool, name: str) -> dict[str, Any]:
    address = pool.backends[name].address
    assert address is not None
    async with httpx2.AsyncClient(timeout=5, trust_env=False) as http:
        return (await http.get(address + "/sim/sleep")).json()


async def ask(pool: BackendPool, name: str) -> None:
    """One request through a lease, as the gateway sends it."""
    async with pool.lease(name) as backend, httpx2.AsyncClient(timeout=10,
                                                                trust_env=False) as http:
        answer = await http.post(f"{backend.address}/v1/chat/completions", json=chat(name))
        assert answer.status_code == 200


async def test_a_swap_by_sleep_keeps_the_server_and_wakes_it_fast() -> None:
    config = make_config([sleepy_model("a"), sleepy_model("b")],
                         gateway={"max_models_concurrent": 1})
    async with running_pool(config) as pool:
        await ask(pool, "a")
        first = pid_of(pool, "a")
        await ask(pool, "b")
        assert states(pool) == {"a": "asleep", "b": "ready"}
        assert running(first)
        began = anyio.current_time()
        async with anyio.create_task_group() as tg:
            for _ in range(3):  # requests that come while it wakes wait for the wake
                tg.start_soon(ask, pool, "a")
        switch = anyio.current_time() - began
        assert states(pool) == {"a": "ready", "b": "asleep"}
        assert pid_of(pool, "a") == first
        assert launcher(pool, "a").attempts == 1
        assert switch < START_DELAY  # b's sleep and a's wake, not a start
        assert (pool.backends["a"].sleeps, pool.backends["a"].wakes) == (1, 1)
        recorded = await sim_sleep(pool, "a")
        assert recorded["calls"] == ["sleep level=1 mode=wait", "wake_up all"]
        assert recorded["held"] == 0  # no request reached it asleep


async def test_an_idle_model_sleeps_then_stops_after_its_asleep_timeout() -> None:
    config = make_config([sleepy_model("a", idle_timeout=0.3, asleep_timeout=0.8)])
    async with running_pool(config) as pool:
        await ask(pool, "a")
        pid = pid_of(pool, "a")
        used = anyio.current_time()
        await eventually(lambda: pool.backends["a"].state is ModelState.ASLEEP)
        asleep = anyio.current_time()
        assert asleep - used >= 0.3
        assert running(pid)
        await eventually(lambda: pool.backends["a"].state is ModelState.STOPPED)
        assert anyio.current_time() - asleep >= 0.8
        await eventually(lambda: not running(pid))
        assert pool.backends["a"].sleeps == 1


async def test_the_sleep_budget_stops_the_model_asleep_longest() -> None:
    config = make_config([sleepy_model(n) for n in "abc"],
                         gateway={"max_models_concurrent": 1, "max_models_asleep": 1})
    async with running_pool(config) as pool:
        await ask(pool, "a")
        pid_a = pid_of(pool, "a")
        await ask(pool, "b")
        assert states(pool) == {"a": "asleep", "b": "ready", "c": "stopped"}
        await ask(pool, "c")
        await eventually(lambda: pool.backends["a"].state is ModelState.STOPPED)
        assert states(pool) == {"a": "stopped", "b": "asleep", "c": "ready"}
        await eventually(lambda: not running(pid_a))


async def test_a_level_2_wake_reloads_the_weights_between_weights_and_kv_cache() -> None:
    config = make_config([sleepy_model("a", level=2)])
    async with running_pool(config) as pool:
        await ask(pool, "a")
        await pool.sleep("a")
        assert pool.backends["a"].state is ModelState.ASLEEP
        await ask(pool, "a")
        recorded = await sim_sleep(pool, "a")
        assert recorded["calls"] == ["sleep level=2 mode=wait", "wake_up weights",
                                     "collective_rpc reload_weights", "wake_up kv_cache"]
        assert recorded["weights_lost"] is False
        assert recorded["held"] == 0


async def test_a_server_without_sleep_mode_is_stopped_with_one_warning() -> None:
    # Started without VLLM_SERVER_DEV_MODE: /is_sleeping is 404, as on vLLM.
    config = make_config([sim_model("a", "--enable-sleep-mode", sleep_level=1,
                                    idle_timeout=0.2)])
    async with running_pool(config) as pool:
        with structlog.testing.capture_logs() as logs:
            for _ in range(2):
                await ask(pool, "a")
                pid = pid_of(pool, "a")
                await eventually(lambda: pool.backends["a"].state is ModelState.STOPPED)
                await eventually(lambda pid=pid: not running(pid))
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert len(warnings) == 1
        assert "--enable-sleep-mode and VLLM_SERVER_DEV_MODE=1" in warnings[0]["needs"]
        assert pool.backends["a"].sleeps == 0
        assert launcher(pool, "a").attempts == 2


async def test_a_failed_wake_stops_the_server_and_starts_it_cold() -> None:
    config = make_config([sleepy_model("a", "--fail-wake")])
    async with running_pool(config) as pool:
        await ask(pool, "a")
        first = pid_of(pool, "a")
        await pool.sleep("a")
        await ask(pool, "a")  # served, by a fresh server
        assert pid_of(pool, "a") != first
        assert not running(first)
        backend = pool.backends["a"]
        assert (backend.state, backend.sleeps, backend.wakes, backend.starts) == (
            ModelState.READY, 1, 0, 2)


class SleepyGpu:
    """One 1000 MiB device, as NVML would read it: each simulator takes 600 MiB awake and keeps
    100 MiB asleep (its CUDA context)."""

    measures = True

    def __init__(self) -> None:
        self.pool: BackendPool | None = None

    def total_mb(self, index: int) -> int | None:
        return 1000 if index == 0 else None

    def used_mb(self, index: int) -> int | None:
        assert self.pool is not None
        used = 0
        for backend in self.pool.backends.values():
            if backend.address is None:
                continue
            try:
                asleep = HTTP.get(backend.address + "/is_sleeping").json()["is_sleeping"]
            except (httpx2.TransportError, ValueError):
                continue  # not listening yet: it holds nothing
            used += 100 if asleep else 600
        return used if index == 0 else None


async def test_gpu_memory_is_measured_after_the_sleep_and_a_wake_makes_room() -> None:
    gpu = SleepyGpu()
    config = make_config([sleepy_model("a", gpus=[0], vram_mb=600),
                          sleepy_model("b", gpus=[0], vram_mb=600)])
    async with running_pool(config, gpu=gpu) as pool:
        gpu.pool = pool
        await ask(pool, "a")
        assert pool.backends["a"].measured_vram_mb == 600
        await ask(pool, "b")  # 400 MiB free: a sleeps, and keeps 100
        assert states(pool) == {"a": "asleep", "b": "ready"}
        assert pool.backends["a"].asleep_vram_mb == 100
        assert pool.backends["b"].measured_vram_mb == 600
        await ask(pool, "a")  # a needs 500 more, 300 are free: b sleeps first
        assert states(pool) == {"a": "ready", "b": "asleep"}
        assert gpu.used_mb(0) == 700


async def test_a_server_found_asleep_at_its_start_is_woken_before_it_serves() -> None:
    # As a container that an earlier gateway put to sleep, adopted: healthy, but asleep.
    config = make_config([sleepy_model("a", "--start-asleep")])
    async with running_pool(config) as pool:
        await ask(pool, "a")
        recorded = await sim_sleep(pool, "a")
        assert recorded["calls"] == ["wake_up all"]
        assert recorded["held"] == 0
        assert pool.backends["a"].state is ModelState.READY


async def test_a_sleep_that_fails_after_the_server_died_and_started_again_stops_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server dies in its sleep and a request starts it again: the sleep was a step of the
    dead run and ended with it, and the new server serves on."""
    config = make_config([sleepy_model("a")])
    async with running_pool(config) as pool:
        await ask(pool, "a")
        first = pid_of(pool, "a")
        backend = pool.backends["a"]

        async def dying_in_its_sleep(*args: Any) -> None:
            os.kill(first, signal.SIGKILL)
            await anyio.sleep_forever()  # no answer: the run's end ends the call

        monkeypatch.setattr(sleep_mode, "sleep", dying_in_its_sleep)
        await pool.sleep("a")
        await ask(pool, "a")  # started again
        await anyio.sleep(0.5)
        assert backend.state is ModelState.READY
        assert running(pid_of(pool, "a")) and pid_of(pool, "a") != first
        assert backend.sleeps == 0


async def test_a_wake_that_meets_a_failed_sleep_starts_the_model_cold(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A request arrives while the sleep is under way, and the sleep then fails: the server is
    stopped, and the request is served by a fresh one (not refused)."""
    config = make_config([sleepy_model("a")])
    async with running_pool(config) as pool:
        await ask(pool, "a")
        first = pid_of(pool, "a")
        asleep = anyio.Event()

        async def failing(*args: Any) -> None:
            asleep.set()
            await anyio.sleep(0.3)
            raise httpx2.ReadTimeout("no answer to the sleep")

        monkeypatch.setattr(sleep_mode, "sleep", failing)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.sleep, "a")
            await asleep.wait()
            await ask(pool, "a")
        assert pid_of(pool, "a") != first
        assert not running(first)
