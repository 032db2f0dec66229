"""One owner task per server run, cancelled as a unit: a stop during a start, a sleep asked
during a request, the gateway stopping during a wake. Real processes (the process launcher),
on asyncio and trio."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from backends import sleep as sleep_mode
from backends.pool import BackendPool, ModelState
from kernel.errors import GatewayError
from tests.backends.checks import running
from tests.backends.test_pool import NEVER_HEALTHY, RecordingLauncher, pid_of, running_pool
from tests.backends.test_pool_sleep import ask, sleepy_model
from tests.support import eventually, make_config

pytestmark = pytest.mark.anyio


async def refused(pool: BackendPool, name: str, into: list[GatewayError]) -> None:
    try:
        async with pool.lease(name):
            pass
    except GatewayError as exc:
        into.append(exc)


async def test_a_stop_during_a_start_ends_the_run_and_answers_its_requests() -> None:
    config = make_config([{"name": "a", "launcher": "process", "command": NEVER_HEALTHY,
                           "startup_timeout": 60.0}])
    async with running_pool(config) as pool:
        backend = pool.backends["a"]
        errors: list[GatewayError] = []
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(refused, pool, "a", errors)
            await eventually(lambda: backend.address is not None)
            pid = pid_of(pool, "a")
            with anyio.fail_after(5):
                await pool.unload("a")
        assert [e.code for e in errors] == ["model_stopped"] * 2
        assert backend.state is ModelState.STOPPED
        assert backend.scope is None and backend.commands is None
        assert not running(pid)


async def test_a_sleep_asked_during_a_request_is_refused_and_the_request_finishes() -> None:
    config = make_config([sleepy_model("a")])
    async with running_pool(config) as pool:
        await ask(pool, "a")
        pid = pid_of(pool, "a")
        async with pool.lease("a") as backend:
            with pytest.raises(GatewayError) as not_idle:
                await pool.sleep("a")
            assert not_idle.value.code == "model_not_idle"
            assert backend.state is ModelState.READY
        await pool.sleep("a")
        assert backend.state is ModelState.ASLEEP
        await ask(pool, "a")  # woken by its own run, the same server
        assert pid_of(pool, "a") == pid
        assert (backend.sleeps, backend.wakes) == (1, 1)


async def test_a_request_during_a_sleep_waits_for_it_then_wakes_the_same_server(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The wake is the run's next command: it waits for the sleep in flight, never races it."""
    config = make_config([sleepy_model("a")])
    slow = sleep_mode.sleep
    calls: list[str] = []

    async def slow_sleep(*args: Any) -> None:
        calls.append("sleep begins")
        await anyio.sleep(0.3)
        await slow(*args)
        calls.append("sleep ends")

    async def woken(*args: Any) -> None:
        calls.append("wake")
        await wake(*args)

    wake = sleep_mode.wake
    monkeypatch.setattr(sleep_mode, "sleep", slow_sleep)
    monkeypatch.setattr(sleep_mode, "wake", woken)
    async with running_pool(config) as pool:
        await ask(pool, "a")
        pid = pid_of(pool, "a")
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.sleep, "a")
            await eventually(lambda: calls == ["sleep begins"])
            await ask(pool, "a")
        assert calls == ["sleep begins", "sleep ends", "wake"]
        assert pid_of(pool, "a") == pid
        assert pool.backends["a"].state is ModelState.READY


async def test_the_gateway_stopping_during_a_wake_answers_it_and_stops_the_server(
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config([sleepy_model("a")])
    waking = anyio.Event()

    async def never_awake(*args: Any) -> None:
        waking.set()
        await anyio.sleep_forever()

    errors: list[GatewayError] = []
    pool = BackendPool(config, launchers=RecordingLauncher)
    async with anyio.create_task_group() as tg:
        async with pool.running():
            await ask(pool, "a")
            pid = pid_of(pool, "a")
            await pool.sleep("a")
            monkeypatch.setattr(sleep_mode, "wake", never_awake)
            tg.start_soon(refused, pool, "a", errors)
            await waking.wait()
            assert pool.backends["a"].state is ModelState.WAKING
    assert [e.code for e in errors] == ["model_stopped"]
    assert "stopped while waking" in errors[0].message
    assert pool.backends["a"].state is ModelState.STOPPED
    assert not running(pid)
