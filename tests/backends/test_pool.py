"""The backend pool driven directly: starts, health, failures, idle stops, placement, shutdown.

Lifecycles run real processes through the process launcher: the simulator where its switches
matter (start-up delay, failing health, exit after a request), else a server that only answers
/health and starts faster. Placement runs fake launchers whose server is one shared simulator,
with fake GPUs whose memory they take and give back.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from anyio.abc import TaskGroup

from backends.gpu import GpuMemory
from backends.pool import Backend, BackendPool, LauncherFactory, ModelState, should_reap
from backends.process import ProcessLauncher
from kernel.config import Config, ModelSettings
from kernel.errors import GatewayError
from tests.backends.checks import running
from tests.support import chat, eventually, make_config, sim_model, simulator

pytestmark = pytest.mark.anyio

# A process that only answers /health: for the tests that need no simulator, as it starts fastest.
HEALTHY = ["{python}", str(Path(__file__).with_name("health_server.py")), "{port}"]
QUICK_EXIT = ["{python}", "-c", "print('no GPU found', flush=True); raise SystemExit(3)"]
NEVER_HEALTHY = ["{python}", "-c", "import time; time.sleep(60)"]


class RecordingLauncher(ProcessLauncher):
    """The process launcher, counting its starts and keeping the pid of each process."""

    def __init__(self, model: ModelSettings) -> None:
        super().__init__(model, stop_timeout=2.0)
        self.attempts = 0
        self.pids: list[int] = []

    async def start(self, task_group: TaskGroup) -> str:
        self.attempts += 1
        address = await super().start(task_group)
        assert self.pid is not None
        self.pids.append(self.pid)
        return address


@dataclass
class Held:
    """The requests the layers hold for each model outside the pool, as a test sets them: the
    pool's ``accounting`` (queued for a slot or holding one; the oldest one's wait)."""

    demands: dict[str, int] = field(default_factory=dict)
    waits: dict[str, float | None] = field(default_factory=dict)
    told: dict[str, int] = field(default_factory=dict)

    def demand(self, model: str) -> int:
        return self.demands.get(model, 0)

    def oldest_wait(self, model: str) -> float | None:
        return self.waits.get(model)

    def serving(self, model: str, replicas: int) -> None:
        self.told[model] = replicas


@asynccontextmanager
async def running_pool(config: Config, launchers: LauncherFactory = RecordingLauncher,
                       gpu: GpuMemory | None = None,
                       held: Held | None = None) -> AsyncIterator[BackendPool]:
    pool = BackendPool(config, launchers=launchers, gpu=gpu, accounting=held)
    async with pool.running():
        yield pool


def launcher(pool: BackendPool, name: str) -> RecordingLauncher:
    recorded = pool.backends[name].launcher
    assert isinstance(recorded, RecordingLauncher)
    return recorded


def client() -> httpx2.AsyncClient:
    return httpx2.AsyncClient(timeout=10, trust_env=False)


def healthy_model(name: str, **settings: Any) -> dict[str, Any]:
    return {"name": name, "launcher": "process", "command": HEALTHY, **settings}


def pid_of(pool: BackendPool, name: str) -> int:
    pid = launcher(pool, name).pid
    assert pid is not None
    return pid


# -- starts and health ----------------------------------------------------------------------


async def test_concurrent_cold_leases_share_one_start() -> None:
    config = make_config([sim_model("a", "--startup-delay", "0.3")])
    async with running_pool(config) as pool:
        addresses = []

        async def use() -> None:
            async with pool.lease("a") as backend:
                addresses.append(backend.address)
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(use)
        backend = pool.backends["a"]
        assert len(addresses) == 8
        assert len(set(addresses)) == 1
        assert backend.starts == 1
        assert launcher(pool, "a").attempts == 1
        assert len(launcher(pool, "a").pids) == 1
        assert backend.state is ModelState.READY
        assert backend.leases == 0


async def test_a_lease_waits_for_health_and_gets_the_backend_soon_after() -> None:
    config = make_config([sim_model("a", "--startup-delay", "0.3")])
    async with running_pool(config) as pool, client() as http:
        first_healthy: list[float] = []

        async def watch_health() -> None:
            await eventually(lambda: pool.backends["a"].address is not None)
            url = f"{pool.backends['a'].address}/health"
            while True:
                try:
                    if (await http.get(url)).status_code == 200:
                        first_healthy.append(anyio.current_time())
                        return
                except httpx2.TransportError:
                    pass
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_health)
            asked = anyio.current_time()
            async with pool.lease("a") as backend:
                granted = anyio.current_time()
                assert (await http.get(f"{backend.address}/health")).status_code == 200
        # The simulator answers 503 for 0.3 s after its start, which came after the lease asked.
        assert granted - asked >= 0.3
        # Polled every 50 ms: the backend is used soon after it is healthy (generous on a
        # loaded machine; the watcher itself may see the 200 late).
        assert abs(granted - first_healthy[0]) < 0.5


# -- start failures -------------------------------------------------------------------------


async def test_a_command_that_exits_at_once_fails_with_backoff() -> None:
    config = make_config([{"name": "a", "launcher": "process", "command": QUICK_EXIT,
                           "failure_backoff": 1.0}])
    async with running_pool(config) as pool:
        with pytest.raises(GatewayError) as failed:
            await pool.load("a")
        assert failed.value.status == 503
        assert failed.value.code == "model_start_failed"
        assert "exited with status 3 during start-up" in failed.value.message
        recorded = launcher(pool, "a")
        assert "no GPU found" in await recorded.output_tail()
        assert not running(recorded.pids[0])
        assert pool.backends["a"].state is ModelState.FAILED

        # Within the backoff: the same answer at once, and no new start.
        began = anyio.current_time()
        with pytest.raises(GatewayError) as again:
            await pool.load("a")
        assert anyio.current_time() - began < 0.5
        assert again.value.status == 503
        assert "exited with status 3" in again.value.message
        assert again.value.retry_after is not None and 0 < again.value.retry_after <= 1.0
        assert recorded.attempts == 1

        # After the backoff: tried again.
        await anyio.sleep(1.0)
        with pytest.raises(GatewayError):
            await pool.load("a")
        assert recorded.attempts == 2
        assert not any(running(pid) for pid in recorded.pids)


async def test_a_command_that_does_not_exist_fails_with_backoff() -> None:
    config = make_config([{"name": "a", "launcher": "process", "command": ["/nonexistent/vllm"],
                           "failure_backoff": 30.0}])
    async with running_pool(config) as pool:
        for _ in range(2):
            with pytest.raises(GatewayError) as failed:
                await pool.load("a")
            assert failed.value.status == 503
            assert "cannot run '/nonexistent/vllm': No such file" in failed.value.message
        assert launcher(pool, "a").attempts == 1
        assert pool.backends["a"].state is ModelState.FAILED


async def test_a_start_past_its_timeout_fails_every_waiting_request() -> None:
    config = make_config([sim_model("a", "--fail-health", "1000", startup_timeout=1.0,
                                    failure_backoff=30.0)])
    async with running_pool(config) as pool:
        errors: list[GatewayError] = []

        async def use() -> None:
            try:
                await pool.load("a")
            except GatewayError as exc:
                errors.append(exc)

        began = anyio.current_time()
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(use)
        assert 1.0 <= anyio.current_time() - began < 10
        assert [e.status for e in errors] == [503] * 3
        assert all("not healthy within 1 s" in e.message for e in errors)
        recorded = launcher(pool, "a")
        assert recorded.attempts == 1
        assert not running(recorded.pids[0])
        assert pool.backends["a"].state is ModelState.FAILED
        with pytest.raises(GatewayError, match="not healthy within 1 s"):
            await pool.load("a")
        assert recorded.attempts == 1


async def test_a_model_that_dies_while_ready_is_noticed_and_started_again() -> None:
    config = make_config([sim_model("a", "--exit-after-requests", "1")])
    async with running_pool(config) as pool, client() as http:
        async with pool.lease("a") as backend:
            first = pid_of(pool, "a")  # before the request: the server exits right after it
            response = await http.post(f"{backend.address}/v1/chat/completions",
                                         json=chat("a"))
            assert response.status_code == 200
        await eventually(lambda: pool.backends["a"].state is ModelState.STOPPED)
        assert pool.backends["a"].failure == "died: the process exited with status 0"
        assert not running(first)

        async with pool.lease("a") as backend:
            assert (await http.get(f"{backend.address}/health")).status_code == 200
            assert pid_of(pool, "a") != first
        assert backend.starts == 2


async def test_a_killed_model_is_noticed() -> None:
    config = make_config([healthy_model("a")])
    async with running_pool(config) as pool:
        await pool.load("a")
        pid = pid_of(pool, "a")
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: pool.backends["a"].state is ModelState.STOPPED)
        assert pool.backends["a"].failure == "died: the process was killed by signal 9"
        assert not running(pid)


# -- idle stops, unload, shutdown -----------------------------------------------------------


async def test_an_idle_model_is_stopped_after_its_idle_timeout() -> None:
    config = make_config([healthy_model("a", idle_timeout=0.3)])
    async with running_pool(config) as pool:
        await pool.load("a")
        pid = pid_of(pool, "a")
        await eventually(lambda: pool.backends["a"].state is ModelState.STOPPED)
        assert anyio.current_time() - pool.backends["a"].last_used >= 0.3
        assert pool.backends["a"].stop_reason == "idle"
        assert not running(pid)
        assert launcher(pool, "a").pid is None


async def test_a_leased_model_is_never_stopped_for_idleness() -> None:
    config = make_config([healthy_model("a", idle_timeout=0.3)])
    async with running_pool(config) as pool:
        async with pool.lease("a"):
            pid = pid_of(pool, "a")
            for _ in range(10):  # 1 s: more than three idle timeouts
                await anyio.sleep(0.1)
                assert pool.backends["a"].state is ModelState.READY
            assert running(pid)
        released = anyio.current_time()
        await eventually(lambda: pool.backends["a"].state is ModelState.STOPPED)
        # Idle counts from the end of the lease, not its start.
        assert anyio.current_time() - released >= 0.3
        assert not running(pid)


def test_the_reaper_spares_a_model_that_a_request_waits_for() -> None:
    # A request that waits (say, while an unload drains, then is given up) is about to lease
    # the model: stopping it now would cold-start it again for that request.
    model = make_config([healthy_model("a", idle_timeout=10.0)]).models[0]
    backend = Backend(model, RecordingLauncher(model), state=ModelState.READY, last_used=100.0)
    assert should_reap(backend, now=110.0)
    assert not should_reap(backend, now=109.9)
    backend.waiting = 1
    assert not should_reap(backend, now=1000.0)
    backend.waiting, backend.leases = 0, 1
    assert not should_reap(backend, now=1000.0)
    backend.leases, backend.state = 0, ModelState.DRAINING
    assert not should_reap(backend, now=1000.0)


async def test_an_unload_given_up_while_draining_leaves_the_model_serving() -> None:
    config = make_config([healthy_model("a")])
    async with running_pool(config) as pool, pool.lease("a"):
        pid = pid_of(pool, "a")
        with anyio.move_on_after(0.3):
            await pool.unload("a")
        assert pool.backends["a"].state is ModelState.READY
        with anyio.fail_after(2):
            async with pool.lease("a") as backend:
                assert backend.state is ModelState.READY
        assert running(pid)


async def test_unload_drains_the_leases_then_stops() -> None:
    config = make_config([healthy_model("a")])
    async with running_pool(config) as pool:
        unloaded = anyio.Event()

        async def unload() -> None:
            await pool.unload("a")
            unloaded.set()

        async with anyio.create_task_group() as tg:
            async with pool.lease("a"):
                pid = pid_of(pool, "a")
                tg.start_soon(unload)
                await eventually(lambda: pool.backends["a"].state is ModelState.DRAINING)
                # No new lease while draining.
                with anyio.move_on_after(0.3) as waited:
                    async with pool.lease("a"):
                        pytest.fail("leased a draining model")
                assert waited.cancelled_caught
                await anyio.sleep(0.2)
                assert not unloaded.is_set()
                assert running(pid)
            with anyio.fail_after(10):
                await unloaded.wait()
        assert pool.backends["a"].state is ModelState.STOPPED
        assert not running(pid)


async def test_shutdown_stops_every_process_it_started() -> None:
    config = make_config([
        healthy_model("a"),
        {"name": "b", "launcher": "process", "command": NEVER_HEALTHY, "startup_timeout": 60.0},
    ])
    pool = BackendPool(config, launchers=RecordingLauncher)
    errors: list[GatewayError] = []

    async def wait_for_b() -> None:
        try:
            await pool.load("b")
        except GatewayError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        async with pool.running():
            await pool.load("a")
            tg.start_soon(wait_for_b)
            await eventually(lambda: launcher(pool, "b").pid is not None)
            pids = [pid_of(pool, "a"), pid_of(pool, "b")]
            assert all(running(pid) for pid in pids)
    assert not any(running(pid) for pid in pids)
    assert [e.code for e in errors] == ["model_stopped"]
    assert all(b.state is ModelState.STOPPED for b in pool.backends.values())


# -- placement ------------------------------------------------------------------------------


@dataclass
class FakeGpus:
    """GPU memory as NVML reads it: each device's total, and what the fake servers hold."""

    totals: dict[int, int]
    # What each server (a model's replica) holds on each device.
    held: dict[tuple[str, int], dict[int, int]] = field(default_factory=dict)
    measures: bool = True

    def total_mb(self, index: int) -> int | None:
        return self.totals.get(index)

    def used_mb(self, index: int) -> int | None:
        if index not in self.totals:
            return None
        return sum(devices.get(index, 0) for devices in self.held.values())


class FakeLauncher:
    """A server that is the shared simulator; starting takes ``takes_mb`` on each of the
    model's GPUs (and ``delay`` seconds), stopping gives the memory back."""

    def __init__(self, model: ModelSettings, url: str, gpus: FakeGpus | None,
                 takes_mb: int, delay: float) -> None:
        self.model = model
        self.url = url
        self.gpus = gpus
        self.takes_mb = takes_mb
        self.delay = delay
        self.address: str | None = None
        self.starts = 0

    async def start(self, task_group: TaskGroup) -> str:
        self.starts += 1
        await anyio.sleep(self.delay)
        if self.gpus is not None:
            self.gpus.held[self.model.name, self.model.replica] = dict.fromkeys(self.model.gpus,
                                                                              self.takes_mb)
        self.address = self.url
        return self.url

    async def wait_exit(self) -> str:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    def is_alive(self) -> bool:
        return True

    async def stop(self) -> None:
        if self.gpus is not None:
            self.gpus.held.pop((self.model.name, self.model.replica), None)
        self.address = None

    def has_running(self) -> bool:
        return False

    async def output_tail(self) -> str:
        return ""


@pytest.fixture(scope="module")
def health_url() -> Iterator[str]:
    """One simulator that answers every fake launcher's health checks."""
    with simulator() as sim:
        yield sim.url


def fakes(url: str, gpus: FakeGpus | None = None, takes_mb: dict[str, int] | None = None,
          delay: float = 0.0) -> LauncherFactory:
    return lambda model: FakeLauncher(model, url, gpus, (takes_mb or {}).get(model.name, 0),
                                      delay)


def fake_model(name: str, **settings: Any) -> dict[str, Any]:
    return {"name": name, "launcher": "static", "url": "http://unused.invalid", **settings}


def starts_of(pool: BackendPool, name: str) -> int:
    fake = pool.backends[name].launcher
    assert isinstance(fake, FakeLauncher)
    return fake.starts


def states(pool: BackendPool) -> dict[str, str]:
    return {name: b.state.value for name, b in pool.backends.items()}


async def test_a_model_over_the_budget_waits_for_the_leased_one_to_be_idle(
        health_url: str) -> None:
    config = make_config([fake_model("a"), fake_model("b")],
                         gateway={"max_models_concurrent": 1, "placement_timeout": 30.0})
    async with running_pool(config, fakes(health_url)) as pool:
        got_b = anyio.Event()

        async def use_b() -> None:
            async with pool.lease("b"):
                got_b.set()

        async with anyio.create_task_group() as tg:
            async with pool.lease("a"):
                tg.start_soon(use_b)
                await anyio.sleep(0.5)
                assert states(pool) == {"a": "ready", "b": "starting"}
                assert not got_b.is_set()
                assert pool.backends["a"].evictions == 0
                assert starts_of(pool, "b") == 0
            with anyio.fail_after(10):
                await got_b.wait()
        assert states(pool) == {"a": "stopped", "b": "ready"}
        assert pool.backends["a"].evictions == 1


async def test_a_model_is_used_by_its_waiting_requests_before_it_can_be_evicted(
        health_url: str) -> None:
    config = make_config([fake_model("a"), fake_model("b")],
                         gateway={"max_models_concurrent": 1, "placement_timeout": 30.0})
    async with running_pool(config, fakes(health_url, delay=0.3)) as pool:
        used: list[str] = []

        async def use(name: str) -> None:
            async with pool.lease(name):
                used.append(name)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(use, "b")
                await eventually(lambda: starts_of(pool, "b") == 1)
                # a's start now waits for b's to end; then b is idle, but its request is owed it.
                tg.start_soon(use, "a")
        assert used == ["b", "a"]
        assert [starts_of(pool, n) for n in "ab"] == [1, 1]
        assert states(pool) == {"a": "ready", "b": "stopped"}


async def test_the_least_recently_used_idle_model_is_evicted(health_url: str) -> None:
    config = make_config([fake_model(n) for n in "abc"], gateway={"max_models_concurrent": 2})
    async with running_pool(config, fakes(health_url)) as pool:
        for name in "aba":  # b is now the least recently used
            await pool.load(name)
            await anyio.sleep(0.01)
        await pool.load("c")
        assert states(pool) == {"a": "ready", "b": "stopped", "c": "ready"}
        await anyio.sleep(0.01)
        await pool.load("b")  # a was used before c
        assert states(pool) == {"a": "stopped", "b": "ready", "c": "ready"}
        assert [pool.backends[n].evictions for n in "abc"] == [1, 1, 0]


async def test_the_wait_for_room_is_bounded(health_url: str) -> None:
    config = make_config([fake_model("a"), fake_model("b")],
                         gateway={"max_models_concurrent": 1, "placement_timeout": 0.5})
    async with running_pool(config, fakes(health_url)) as pool:
        async with pool.lease("a"):
            began = anyio.current_time()
            with pytest.raises(GatewayError) as refused:
                await pool.load("b")
            assert 0.5 <= anyio.current_time() - began < 5
            assert refused.value.status == 503
            assert refused.value.code == "no_capacity"
            assert states(pool) == {"a": "ready", "b": "stopped"}
            assert starts_of(pool, "b") == 0


async def test_a_start_waiting_for_room_does_not_hold_up_one_that_fits(health_url: str) -> None:
    gpus = FakeGpus({0: 1000, 1: 1000})
    config = make_config([fake_model("a", gpus=[0], vram_mb=800),
                          fake_model("b", gpus=[0], vram_mb=800),
                          fake_model("c", gpus=[1], vram_mb=800)],
                         gateway={"placement_timeout": 30.0})
    async with running_pool(config, fakes(health_url, gpus, {"a": 800, "b": 800, "c": 800}),
                            gpu=gpus) as pool:
        async with anyio.create_task_group() as tg, pool.lease("a"):
            tg.start_soon(pool.load, "b")
            await eventually(lambda: pool.backends["b"].state is ModelState.STARTING)
            with anyio.fail_after(5):
                await pool.load("c")
            assert states(pool) == {"a": "ready", "b": "starting", "c": "ready"}
            tg.cancel_scope.cancel()


async def test_gpu_memory_evicts_the_lru_idle_model_of_the_same_device(health_url: str) -> None:
    gpus = FakeGpus({0: 1000, 1: 1000})
    config = make_config([fake_model("a", gpus=[0], vram_mb=600),
                          fake_model("b", gpus=[1], vram_mb=600),
                          fake_model("c", gpus=[0], vram_mb=600)])
    async with running_pool(config, fakes(health_url, gpus, {"a": 600, "b": 600, "c": 600}),
                            gpu=gpus) as pool:
        for name in "ba":  # b is the least recently used, but on the other device
            await pool.load(name)
            await anyio.sleep(0.01)
        await pool.load("c")
        assert states(pool) == {"a": "stopped", "b": "ready", "c": "ready"}
        assert gpus.used_mb(0) == 600


async def test_a_model_on_two_gpus_makes_room_on_both(health_url: str) -> None:
    gpus = FakeGpus({0: 1000, 1: 1000})
    config = make_config([fake_model("a", gpus=[0], vram_mb=600),
                          fake_model("b", gpus=[1], vram_mb=600),
                          fake_model("c", gpus=[2], vram_mb=600),
                          fake_model("ab", gpus=[0, 1], vram_mb=600)])
    async with running_pool(config, fakes(health_url, gpus, dict.fromkeys(
            ["a", "b", "c", "ab"], 600)), gpu=gpus) as pool:
        for name in "cab":
            await pool.load(name)
        await pool.load("ab")
        assert states(pool) == {"a": "stopped", "b": "stopped", "c": "ready", "ab": "ready"}
        assert gpus.used_mb(0) == gpus.used_mb(1) == 600


async def test_a_model_that_can_never_fit_is_refused_at_once(health_url: str) -> None:
    gpus = FakeGpus({0: 1000})
    config = make_config([fake_model("a", gpus=[0], vram_mb=600),
                          fake_model("huge", gpus=[0], vram_mb=2000)],
                         gateway={"placement_timeout": 30.0})
    async with running_pool(config, fakes(health_url, gpus, {"a": 600}), gpu=gpus) as pool:
        await pool.load("a")
        began = anyio.current_time()
        with pytest.raises(GatewayError) as refused:
            await pool.load("huge")
        assert anyio.current_time() - began < 2
        assert refused.value.status == 503
        assert refused.value.code == "no_capacity"
        assert refused.value.should_retry is False
        assert "needs 2000 MiB on GPU 0, which has 1000 MiB" in refused.value.message
        assert states(pool) == {"a": "ready", "huge": "stopped"}


async def test_the_measured_vram_replaces_the_configured_figure(health_url: str) -> None:
    gpus = FakeGpus({0: 1000})
    config = make_config([fake_model("a", gpus=[0], vram_mb=300),
                          fake_model("b", gpus=[0], vram_mb=400)])
    async with running_pool(config, fakes(health_url, gpus, {"a": 700, "b": 400}),
                            gpu=gpus) as pool:
        await pool.load("a")
        assert pool.backends["a"].measured_vram_mb == 700
        assert pool.backends["a"].vram_mb == 700
        await pool.unload("a")
        await pool.load("b")
        # With the configured 300 MiB, a would fit beside b's 400; it takes 700, so b must go.
        await pool.load("a")
        assert states(pool) == {"a": "ready", "b": "stopped"}
        assert pool.backends["b"].evictions == 1


async def test_without_nvml_the_configured_figures_place_models(health_url: str) -> None:
    config = make_config([fake_model("a", gpus=[0], vram_mb=600),
                          fake_model("b", gpus=[1], vram_mb=600),
                          fake_model("c", gpus=[0], vram_mb=600),
                          fake_model("huge", gpus=[1], vram_mb=2000)],
                         gateway={"gpu_memory_mb": 1000, "placement_timeout": 30.0})
    async with running_pool(config, fakes(health_url)) as pool:
        for name in "ba":
            await pool.load(name)
            await anyio.sleep(0.01)
        await pool.load("c")
        assert states(pool) == {"a": "stopped", "b": "ready", "c": "ready", "huge": "stopped"}
        assert pool.backends["c"].measured_vram_mb is None
        began = anyio.current_time()
        with pytest.raises(GatewayError, match="needs 2000 MiB on GPU 1, which has 1000 MiB"):
            await pool.load("huge")
        assert anyio.current_time() - began < 2
        assert states(pool)["b"] == "ready"


async def test_a_model_with_requests_queued_in_the_gateway_is_not_evicted(
        health_url: str) -> None:
    config = make_config([fake_model("a"), fake_model("b")],
                         gateway={"max_models_concurrent": 1, "placement_timeout": 30.0})
    held = Held(demands={"a": 1})  # a request for a waits for a slot of a
    async with running_pool(config, fakes(health_url), held=held) as pool:
        await pool.load("a")
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.load, "b")
            await anyio.sleep(0.5)
            assert states(pool) == {"a": "ready", "b": "starting"}
            held.demands["a"] = 0
            await eventually(lambda: states(pool) == {"a": "stopped", "b": "ready"})


async def test_only_one_busy_model_yields_its_turn_to_a_start_over_the_budget(
        health_url: str) -> None:
    """Two models busy, room for two, a third waits: one place is needed, so only one of them
    (the one with fewer requests) stops taking new ones; the other serves on."""
    config = make_config([fake_model("a"), fake_model("b"), fake_model("c")],
                         gateway={"max_models_concurrent": 2, "placement_timeout": 1.0})
    async with running_pool(config, fakes(health_url)) as pool:
        await pool.load("a")
        await pool.load("b")
        async with AsyncExitStack() as held, anyio.create_task_group() as tg:
            for name in ("a", "a", "b"):
                await held.enter_async_context(pool.lease(name))
            tg.start_soon(pool.load, "c")
            await eventually(lambda: pool.backends["b"].yields_to is not None)
            assert pool.backends["a"].yields_to is None
            with anyio.fail_after(1):
                async with pool.lease("a"):  # a serves on
                    pass
            tg.cancel_scope.cancel()
