"""The pool survives what goes wrong under it: a stop that fails, a start that raises, a server
that turns unhealthy, a second unload. Real processes through the process launcher; the failing
stop is the launcher's own stop followed by an error, as an engine that fails after acting does.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from backends.pool import BackendPool, ModelState
from kernel.config import ModelSettings
from kernel.errors import GatewayError
from tests.backends.checks import running
from tests.backends.test_pool import (
    HEALTHY,
    FakeGpus,
    RecordingLauncher,
    healthy_model,
    launcher,
    pid_of,
    running_pool,
)
from tests.support import eventually, make_config

pytestmark = pytest.mark.anyio


class StopFailsOnce(RecordingLauncher):
    """Stops the server, then raises, the first time only."""

    def __init__(self, model: ModelSettings) -> None:
        super().__init__(model)
        self.failed = model.name != "a"

    async def stop(self) -> None:
        await super().stop()
        if not self.failed:
            self.failed = True
            raise RuntimeError("the engine went away mid-stop")


async def test_a_failed_stop_fails_that_model_only_and_it_recovers_after_the_backoff() -> None:
    config = make_config([healthy_model("a", failure_backoff=1.0), healthy_model("b")])
    async with running_pool(config, StopFailsOnce) as pool:
        await pool.load("a")
        await pool.load("b")
        first = pid_of(pool, "a")
        with anyio.fail_after(10):
            await pool.unload("a")
        a = pool.backends["a"]
        assert a.state is ModelState.FAILED
        assert a.failure == "its stop failed: the engine went away mid-stop"
        assert a.placed is False and a.leases == 0 and a.scope is None
        assert not running(first)
        # The other model serves on.
        with anyio.fail_after(2):
            async with pool.lease("b") as b:
                assert b.state is ModelState.READY
        # Within the backoff, a's requests get 503 at once; the reason is the error's type.
        with pytest.raises(GatewayError) as refused:
            await pool.load("a")
        assert refused.value.status == 503
        assert refused.value.code == "backend_unavailable"
        assert "its stop failed" in refused.value.message
        assert refused.value.retry_after is not None and 0 < refused.value.retry_after <= 1.0
        await anyio.sleep(1.0)
        with anyio.fail_after(10):
            await pool.load("a")
        assert a.state is ModelState.READY
        assert pid_of(pool, "a") != first
        assert launcher(pool, "a").attempts == 2


async def test_a_nul_in_the_environment_fails_the_start_not_the_pool() -> None:
    config = make_config([healthy_model("bad", env={"X": "a\0b"}, failure_backoff=30.0),
                          healthy_model("good")])
    async with running_pool(config) as pool:
        with pytest.raises(GatewayError) as failed:
            await pool.load("bad")
        assert failed.value.code == "model_start_failed"
        assert "null byte" in failed.value.message
        assert pool.backends["bad"].state is ModelState.FAILED
        with anyio.fail_after(10):
            await pool.load("good")


class BrokenNvml(FakeGpus):
    def used_mb(self, index: int) -> int | None:
        raise RuntimeError("NVML_ERROR_GPU_IS_LOST")


async def test_an_nvml_error_fails_the_start_without_the_details() -> None:
    gpus = BrokenNvml({0: 1000})
    config = make_config([healthy_model("a", gpus=[0], vram_mb=100, failure_backoff=30.0),
                          healthy_model("b")])
    async with running_pool(config, gpu=gpus) as pool:
        with pytest.raises(GatewayError) as failed:
            await pool.load("a")
        assert failed.value.code == "model_start_failed"
        assert "an unexpected RuntimeError" in failed.value.message
        assert "NVML_ERROR_GPU_IS_LOST" not in failed.value.message
        assert pool.backends["a"].failure == "NVML_ERROR_GPU_IS_LOST"
        with anyio.fail_after(10):
            await pool.load("b")
        assert pool.problem() is None


async def test_a_server_that_fails_its_health_checks_is_stopped_and_started_again(
        tmp_path: Path) -> None:
    sick = tmp_path / "sick"
    config = make_config([{"name": "a", "launcher": "process", "command": [*HEALTHY, str(sick)],
                           "health_interval": 0.1, "health_failures": 2}])
    async with running_pool(config) as pool:
        await pool.load("a")
        first = pid_of(pool, "a")
        await anyio.sleep(0.5)  # healthy checks keep it ready
        assert pool.backends["a"].state is ModelState.READY
        sick.touch()
        began = anyio.current_time()
        await eventually(lambda: pool.backends["a"].state is ModelState.STOPPED)
        assert anyio.current_time() - began < 3
        assert pool.backends["a"].failure == "unhealthy: its health check answered 503"
        assert not running(first)
        sick.unlink()
        with anyio.fail_after(10):
            await pool.load("a")
        assert pid_of(pool, "a") != first


async def test_a_second_unload_waits_for_the_first_to_drain() -> None:
    config = make_config([healthy_model("a")])
    async with running_pool(config) as pool:
        unloaded: list[int] = []

        async def unload(n: int) -> None:
            await pool.unload("a")
            unloaded.append(n)

        async with anyio.create_task_group() as tg:
            async with pool.lease("a"):
                pid = pid_of(pool, "a")
                tg.start_soon(unload, 1)
                await eventually(lambda: pool.backends["a"].state is ModelState.DRAINING)
                tg.start_soon(unload, 2)
                await anyio.sleep(0.3)
                # The request in flight is not cut off by the second unload.
                assert running(pid)
                assert pool.backends["a"].state is ModelState.DRAINING
                assert unloaded == []
        assert sorted(unloaded) == [1, 2]
        assert pool.backends["a"].state is ModelState.STOPPED
        assert not running(pid)


async def test_the_reaper_failing_is_the_pools_problem_not_its_end() -> None:
    config = make_config([healthy_model("a")])
    pool = BackendPool(config, launchers=RecordingLauncher)

    async def broken_reaper() -> None:
        raise RuntimeError("reaper bug")

    pool._reap = broken_reaper  # type: ignore[method-assign]
    async with pool.running():
        await eventually(lambda: pool.problem() is not None)
        assert pool.problem() == "the idle reaper failed: RuntimeError('reaper bug')"
        with anyio.fail_after(10):
            await pool.load("a")
    assert pool.problem() == "the backend pool is not running"
