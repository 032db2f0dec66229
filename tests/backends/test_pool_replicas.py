"""Replicas of a model in the pool: routing by load and session, scale-up when saturated,
scale-in to ``min_replicas``, placement across ``gpus`` alternatives.

Real processes (the /health-only server, or the simulator) through the process launcher;
placement on fake GPUs with the fake launchers of ``test_pool``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest

from backends.pool import Ask, Backend, BackendPool, ModelState
from middleware.prompt_prefix import chained_blocks
from tests.backends.test_pool import (
    HEALTHY,
    FakeGpus,
    Held,
    RecordingLauncher,
    fakes,
    running_pool,
)
from tests.backends.test_pool_sleep import sleepy_model
from tests.support import ROOT, eventually, make_config, simulator

pytestmark = pytest.mark.anyio

PROMPT = chained_blocks("You are a helpful assistant. " * 20, 64)


@pytest.fixture(scope="module")
def health_url() -> Iterator[str]:
    """One simulator that answers every fake launcher's health checks."""
    with simulator() as sim:
        yield sim.url


def replicated(name: str, **settings: Any) -> dict[str, Any]:
    return {"name": name, "launcher": "process", "command": HEALTHY, "startup_timeout": 20.0,
            "max_replicas": 2, **settings}


def states(pool: BackendPool, name: str) -> list[str]:
    return [r.state.value for r in pool.replicas[name]]


async def hold(stack: AsyncExitStack, pool: BackendPool, name: str, *,
               session: str | None = None, blocks: tuple[int, ...] = ()) -> Backend:
    return await stack.enter_async_context(pool.lease(name, Ask(session, blocks)))


# -- routing --------------------------------------------------------------------------------


async def test_min_replicas_start_with_the_pool_and_requests_go_to_the_least_loaded() -> None:
    config = make_config([replicated("a", min_replicas=2, max_concurrent=4)])
    async with running_pool(config) as pool, AsyncExitStack() as stack:
        await eventually(lambda: states(pool, "a") == ["ready", "ready"])
        a, b = pool.replicas["a"]
        assert a.address != b.address
        got = [(await hold(stack, pool, "a")).replica for _ in range(5)]
        # Least loaded first, the first of equals: 0, 1, 0, 1, 0.
        assert got == [0, 1, 0, 1, 0]
        assert (a.leases, b.leases) == (3, 2)
    assert (a.leases, b.leases) == (0, 0)


async def test_a_session_keeps_to_its_replica_until_it_is_over_the_slack() -> None:
    config = make_config([replicated("a", min_replicas=2, max_concurrent=10,
                                     affinity_slack=1.5)])
    async with running_pool(config) as pool:
        await eventually(lambda: states(pool, "a") == ["ready", "ready"])
        # One after the other: always the same replica, whichever the session's hash picks.
        for session in ("alice", "bob", "carol", "dave"):
            seen = set()
            for _ in range(5):
                async with pool.lease("a", Ask(session)) as backend:
                    seen.add(backend.replica)
            assert len(seen) == 1, session
        # Sessions spread over the replicas.
        homes = set()
        for i in range(20):
            async with pool.lease("a", Ask(f"user-{i}")) as backend:
                homes.add(backend.replica)
        assert homes == {0, 1}
        # At once: the session's replica takes up to ceil(1.5 x the average, the new one
        # counted): 3 of 3 in flight; the 4th would be 4 > ceil(1.5 x 4 / 2), and goes to the
        # other replica.
        async with AsyncExitStack() as stack:
            home = (await hold(stack, pool, "a", session="alice")).replica
            assert [(await hold(stack, pool, "a", session="alice")).replica
                    for _ in range(2)] == [home, home]
            assert (await hold(stack, pool, "a", session="alice")).replica == 1 - home


async def test_a_session_yields_its_replica_once_its_slots_are_taken() -> None:
    config = make_config([replicated("a", min_replicas=2, max_concurrent=1,
                                     affinity_slack=100.0)])
    async with running_pool(config) as pool, AsyncExitStack() as stack:
        await eventually(lambda: states(pool, "a") == ["ready", "ready"])
        home = (await hold(stack, pool, "a", session="s")).replica
        assert (await hold(stack, pool, "a", session="s")).replica == 1 - home


async def test_a_dead_replica_takes_no_new_request_and_is_brought_back() -> None:
    config = make_config([replicated("a", min_replicas=2, failure_backoff=0.1)])
    async with running_pool(config) as pool:
        await eventually(lambda: states(pool, "a") == ["ready", "ready"])
        dead = pool.replicas["a"][1]
        recorded = dead.launcher
        assert isinstance(recorded, RecordingLauncher) and recorded.pid is not None
        pid = recorded.pid
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: dead.state is not ModelState.READY)
        for _ in range(4):
            async with pool.lease("a") as backend:
                assert backend.replica == 0
        # min_replicas is kept: the dead one is started again.
        await eventually(lambda: states(pool, "a") == ["ready", "ready"])
        assert recorded.pid != pid


async def test_a_model_of_one_server_with_min_replicas_is_always_on() -> None:
    config = make_config([replicated("a", max_replicas=1, min_replicas=1, idle_timeout=0.2,
                                     failure_backoff=0.1)])
    async with running_pool(config) as pool:
        backend = pool.backends["a"]
        await eventually(lambda: backend.state is ModelState.READY)
        recorded = backend.launcher
        assert isinstance(recorded, RecordingLauncher) and recorded.pid is not None
        pid = recorded.pid
        await anyio.sleep(0.6)  # past its idle_timeout: kept
        assert backend.state is ModelState.READY
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: backend.state is ModelState.READY and recorded.pid != pid)
        assert backend.starts == 2


async def test_a_failed_connect_goes_to_another_replica_if_one_is_ready() -> None:
    config = make_config([replicated("a", min_replicas=2)])
    async with running_pool(config) as pool:
        await eventually(lambda: states(pool, "a") == ["ready", "ready"])
        for avoid in (0, 1):
            async with pool.lease("a", Ask(avoid=avoid)) as backend:
                assert backend.replica == 1 - avoid
        pool.request_stop(pool.replicas["a"][1], "test")
        await eventually(lambda: pool.replicas["a"][1].state is ModelState.STOPPED)
        # The only one ready is tried again.
        async with pool.lease("a", Ask(avoid=0)) as backend:
            assert backend.replica == 0


# -- scaling --------------------------------------------------------------------------------


async def test_a_replica_is_added_only_when_every_slot_is_taken_past_scale_up_after() -> None:
    config = make_config([replicated("a", max_concurrent=1, scale_up_after=0.3)])
    waited: dict[str, float | None] = {"a": None}
    async with running_pool(config, held=Held(waits=waited)) as pool, \
            AsyncExitStack() as stack:
        await hold(stack, pool, "a")
        assert states(pool, "a") == ["ready", "stopped"]
        # Saturated, but nobody waits long enough: no replica.
        waited["a"] = 0.2
        await anyio.sleep(0.5)
        assert states(pool, "a") == ["ready", "stopped"]
        # Waited long enough: another replica starts, one.
        waited["a"] = 0.4
        await eventually(lambda: states(pool, "a") == ["ready", "ready"])
        assert pool.models["a"].scale_ups == 1
        assert (await hold(stack, pool, "a")).replica == 1
        # max_replicas reached: nothing more to start.
        await anyio.sleep(0.5)
        assert pool.models["a"].scale_ups == 1


async def test_a_long_wait_with_a_free_slot_adds_no_replica() -> None:
    config = make_config([replicated("a", max_concurrent=2, scale_up_after=0.1)])
    async with running_pool(config, held=Held(waits={"a": 10.0})) as pool, \
            AsyncExitStack() as stack:
        await hold(stack, pool, "a")
        await anyio.sleep(0.6)
        assert states(pool, "a") == ["ready", "stopped"]
        assert pool.models["a"].scale_ups == 0


async def test_idle_replicas_stop_down_to_min_replicas() -> None:
    config = make_config([replicated("a", max_replicas=3, min_replicas=1, max_concurrent=1,
                                     scale_up_after=0.05, idle_timeout=0.5)],
                         gateway={"max_models_concurrent": 3})
    waited: dict[str, float | None] = {"a": None}
    async with running_pool(config, held=Held(waits=waited)) as pool:
        await eventually(lambda: states(pool, "a") == ["ready", "stopped", "stopped"])
        async with AsyncExitStack() as stack:
            await hold(stack, pool, "a")
            waited["a"] = 1.0
            await eventually(lambda: states(pool, "a")[1] == "ready")
            await hold(stack, pool, "a")
            await eventually(lambda: states(pool, "a") == ["ready", "ready", "ready"])
            waited["a"] = None
        # Each replica has its own idle timer; the model keeps min_replicas ready.
        await eventually(lambda: states(pool, "a") == ["ready", "stopped", "stopped"])
        assert pool.models["a"].scale_downs == 2
        await anyio.sleep(1.0)
        assert states(pool, "a") == ["ready", "stopped", "stopped"]


async def test_gpu_alternatives_place_one_replica_per_gpu(health_url: str) -> None:
    gpus = FakeGpus({0: 1000, 1: 1000})
    config = make_config([replicated("a", gpus=[[0], [1]], vram_mb=800, min_replicas=2)])
    async with running_pool(config, fakes(health_url, gpus, {"a": 800}), gpu=gpus) as pool:
        await eventually(lambda: states(pool, "a") == ["ready", "ready"])
        assert [r.settings.gpus for r in pool.replicas["a"]] == [(0,), (1,)]
        assert gpus.held == {("a", 0): {0: 800}, ("a", 1): {1: 800}}


async def test_a_replica_that_does_not_fit_is_not_added(health_url: str) -> None:
    """Both replicas on GPU 0, which holds one: the saturated model stays at one, and no other
    model is made to give up its turn for a replica."""
    gpus = FakeGpus({0: 1000})
    config = make_config([replicated("a", gpus=[0], vram_mb=800, max_concurrent=1,
                                     scale_up_after=0.05)],
                         gateway={"placement_timeout": 0.3})
    async with running_pool(config, fakes(health_url, gpus, {"a": 800}), gpu=gpus,
                            held=Held(waits={"a": 1.0})) as pool, AsyncExitStack() as stack:
        await hold(stack, pool, "a")
        await anyio.sleep(1.0)
        assert states(pool, "a")[0] == "ready"
        assert pool.replicas["a"][1].state in (ModelState.STOPPED, ModelState.STARTING)
        assert pool.replicas["a"][1].starts == 0
        assert (await hold(stack, pool, "a")).replica == 0


async def test_unload_drains_and_stops_every_replica() -> None:
    config = make_config([replicated("a", max_concurrent=1, scale_up_after=0.05)])
    held = Held()
    async with running_pool(config, held=held) as pool:
        async with AsyncExitStack() as stack:
            await hold(stack, pool, "a")
            held.waits["a"] = 10.0
            await eventually(lambda: states(pool, "a") == ["ready", "ready"])
            held.waits["a"] = None
        await pool.unload("a")
        assert states(pool, "a") == ["stopped", "stopped"]


async def test_an_idle_replica_sleeps_first_and_is_woken_for_the_next_scale_up() -> None:
    config = make_config([sleepy_model("a", max_replicas=2, min_replicas=1, max_concurrent=1,
                                       scale_up_after=0.05, idle_timeout=0.5)])
    waited: dict[str, float | None] = {"a": None}
    async with running_pool(config, held=Held(waits=waited)) as pool:
        await eventually(lambda: states(pool, "a") == ["ready", "stopped"], within=20)
        second = pool.replicas["a"][1]
        index = pool.models["a"].prefixes
        assert index is not None
        for _ in range(2):
            async with AsyncExitStack() as stack:
                await hold(stack, pool, "a")
                waited["a"] = 1.0
                await eventually(lambda: second.state is ModelState.READY, within=20)
                assert (await hold(stack, pool, "a", blocks=PROMPT)).replica == 1
                assert index.longest(PROMPT, 0b11) == (len(PROMPT), 0b10)
                waited["a"] = None
            # Idle: the second replica sleeps (its server runs on); the first is kept. Its KV
            # cache went with its sleep: the prefix index forgets it.
            await eventually(lambda: states(pool, "a") == ["ready", "asleep"]
                             and second.sleeping is None)
            assert index.longest(PROMPT, 0b11) == (0, 0)
        # The second scale-up woke it: one start, one wake.
        assert (second.starts, second.wakes, second.sleeps) == (1, 1, 2)
        assert pool.models["a"].scale_ups == 3  # min_replicas' first start, then two


async def test_a_scale_up_makes_room_by_stopping_an_idle_model_but_not_a_busy_one() -> None:
    config = make_config([replicated("a", max_concurrent=1, scale_up_after=0.05),
                          replicated("b", max_replicas=1)],
                         gateway={"max_models_concurrent": 2, "placement_timeout": 0.5})
    async with running_pool(config, held=Held(waits={"a": 1.0})) as pool, \
            AsyncExitStack() as stack:
        held_b = AsyncExitStack()
        await hold(held_b, pool, "b")
        await hold(stack, pool, "a")
        # b is busy: the replica waits for room and gives up, b serves on.
        await anyio.sleep(1.0)
        assert states(pool, "b") == ["ready"]
        assert states(pool, "a")[0] == "ready"
        assert pool.replicas["a"][1].starts == 0
        # b idle: it makes room for a's second replica.
        await held_b.aclose()
        await eventually(lambda: states(pool, "a") == ["ready", "ready"])
        assert states(pool, "b") == ["stopped"]
        assert pool.backends["b"].evictions == 1


ROUTE_IN_A_PROCESS = """
import json, sys
from types import SimpleNamespace
from backends.pool import Ask, ModelState, route
settings = SimpleNamespace(affinity_slack=1.5)
replicas = [SimpleNamespace(state=ModelState.READY, yields_to=None, replica=i, leases=0,
                            slots=4, settings=settings) for i in range(4)]
print(json.dumps([route(replicas, Ask(f"user-{n}")).replica for n in range(40)]))
"""


def test_a_session_keeps_its_replica_in_another_gateway_process() -> None:
    """A restarted gateway (which adopts its containers) sends each session to the replica it
    went to before, whose prefix cache holds it: the hash is not salted per process."""
    chosen = []
    for seed in ("1", "2"):
        ran = subprocess.run([sys.executable, "-c", ROUTE_IN_A_PROCESS], cwd=ROOT, check=True,
                             capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed})
        chosen.append(json.loads(ran.stdout))
    assert chosen[0] == chosen[1]
    assert len(set(chosen[0])) == 4  # and the sessions spread over the replicas
