"""LoRA adapters on a model's servers, driven through the pool (``lease``) and its adapter
loader (``using``): one load per server for concurrent requests, the least recently used idle
adapter unloaded at ``max_loras``, an adapter in use never unloaded, a failed load the error of
the requests that waited for it and tried again by the next one, and a new run that holds none.

The server is the simulator with vLLM's runtime LoRA API (``simulator/lora.py``): one for the
module as a static model's server where the server's run does not matter; its ``/sim/lora``
says which calls the gateway made.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from backends.adapters import prefer_holding
from backends.launcher import Launcher
from backends.model import Model
from backends.pool import Ask, Backend, BackendPool, ModelState
from backends.process import ProcessLauncher
from backends.static import StaticLauncher
from kernel.config import Config, ModelSettings
from kernel.context import RequestState
from kernel.errors import GatewayError
from tests.backends.test_pool import running_pool
from tests.support import HTTP, eventually, make_config, sim_model, simulator

pytestmark = pytest.mark.anyio

LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
LOAD_DELAY = "0.2"


@pytest.fixture(scope="module")
def lora_sim() -> Iterator[str]:
    """A simulator with the LoRA API whose loads take LOAD_DELAY."""
    with simulator("--enable-lora", "--lora-load-delay", LOAD_DELAY, model="base",
                   env=LORA_ENV) as sim:
        yield sim.url


def launcher(model: ModelSettings) -> Launcher:
    if model.launcher == "static":
        return StaticLauncher(model)
    return ProcessLauncher(model, stop_timeout=2.0)


def pool_of(config: Config) -> Any:
    return running_pool(config, launcher)


def calls(url: str) -> list[str]:
    return HTTP.get(url + "/sim/lora").json()["calls"]


def adapters(root: Path, *names: str, missing: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Each name an adapter: a directory under ``root`` (none for those ``missing``)."""
    for name in names:
        if name not in missing:
            (root / name).mkdir(exist_ok=True)
    return [{"name": name, "path": str(root / name)} for name in names]


def static(url: str, root: Path, *names: str, missing: tuple[str, ...] = (),
           **settings: Any) -> dict[str, Any]:
    return {"name": "base", "launcher": "static", "url": url, "startup_timeout": 5.0,
            "adapters": adapters(root, *names, missing=missing), **settings}


async def serving_adapter(stack: AsyncExitStack, pool: BackendPool, adapter: str,
                          state: RequestState | None = None) -> Backend:
    """A request for the adapter, from its lease to its forwarding (held until ``stack``
    closes)."""
    backend = await stack.enter_async_context(pool.lease("base", Ask(adapter=adapter)))
    await stack.enter_async_context(
        pool.adapters.using(backend, adapter, state or RequestState()))
    return backend


async def test_concurrent_requests_for_an_adapter_share_one_load(
        lora_sim: str, tmp_path: Path) -> None:
    url, root = lora_sim, tmp_path
    config = make_config([static(url, root, "shared")])
    before = calls(url)
    async with pool_of(config) as pool, AsyncExitStack() as stack:
        backends = []
        waiting = [RequestState() for _ in range(5)]

        async def request(state: RequestState) -> None:
            backends.append(await serving_adapter(stack, pool, "shared", state))

        async with anyio.create_task_group() as tg:
            for state in waiting:
                tg.start_soon(request, state)
            await anyio.sleep(0.1)
            # They wait for the load, and say so (the feedback's comment reads it).
            assert [s.adapter_loading for s in waiting] == [True] * 5
        assert [s.adapter_loading for s in waiting] == [False] * 5
        assert calls(url)[len(before):] == ["load shared"]
        backend = backends[0]
        assert pool.adapters.loaded(backend) == ["shared"]
        assert pool.adapters._servers[backend].held["shared"].in_flight == 5
        await stack.aclose()
        assert pool.adapters._servers[backend].held["shared"].in_flight == 0
        # Held: the next request is forwarded at once.
        async with AsyncExitStack() as again:
            await serving_adapter(again, pool, "shared")
        assert calls(url)[len(before):] == ["load shared"]
        assert pool.adapters.loads["shared"] == 1


async def test_at_max_loras_the_least_recently_used_idle_adapter_is_unloaded(
        lora_sim: str, tmp_path: Path) -> None:
    url, root = lora_sim, tmp_path
    config = make_config([static(url, root, "one", "two", "three", max_loras=2)])
    before = calls(url)
    async with pool_of(config) as pool:
        for adapter in ("one", "two", "one", "three"):
            async with AsyncExitStack() as stack:
                backend = await serving_adapter(stack, pool, adapter)
        # "two" was used longest ago when "three" needed its place.
        assert calls(url)[len(before):] == ["load one", "load two", "unload two", "load three"]
        assert pool.adapters.loaded(backend) == ["one", "three"]
        assert HTTP.get(url + "/sim/lora").json()["loaded"][-2:] == ["one", "three"]
        assert pool.adapters.unloads == {"one": 0, "two": 1, "three": 0}


async def test_an_adapter_in_use_is_not_unloaded_until_its_requests_end(
        lora_sim: str, tmp_path: Path) -> None:
    url, root = lora_sim, tmp_path
    config = make_config([static(url, root, "busy", "next")])
    before = calls(url)
    async with pool_of(config) as pool:
        first = AsyncExitStack()
        backend = await serving_adapter(first, pool, "busy")
        done = anyio.Event()

        async def request_next() -> None:
            async with AsyncExitStack() as stack:
                await serving_adapter(stack, pool, "next")
                done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(request_next)
            await anyio.sleep(0.5)
            # "busy" has a request in flight: "next" waits for it, nothing is unloaded.
            assert not done.is_set()
            assert pool.adapters.loaded(backend) == ["busy"]
            await first.aclose()
        assert calls(url)[len(before):] == ["load busy", "unload busy", "load next"]
        assert pool.adapters.loaded(backend) == ["next"]


async def test_adapters_all_in_use_past_the_placement_timeout_are_a_503(
        lora_sim: str, tmp_path: Path) -> None:
    url, root = lora_sim, tmp_path
    config = make_config([static(url, root, "held", "refused")],
                         gateway={"placement_timeout": 0.3})
    async with pool_of(config) as pool, AsyncExitStack() as stack:
        backend = await serving_adapter(stack, pool, "held")
        with pytest.raises(GatewayError) as refused:
            async with AsyncExitStack() as other:
                await serving_adapter(other, pool, "refused")
        assert (refused.value.status, refused.value.code) == (503, "adapter_slots_busy")
        assert refused.value.retry_after == 1
        assert pool.adapters.loaded(backend) == ["held"]
        assert backend.leases == 1  # the refused request's lease is given back


async def test_a_failed_load_fails_its_waiters_once_and_the_next_request_tries_again(
        lora_sim: str, tmp_path: Path) -> None:
    url, root = lora_sim, tmp_path
    config = make_config([static(url, root, "late", missing=("late",))])
    before = calls(url)
    async with pool_of(config) as pool:
        errors: list[GatewayError] = []

        async def request() -> None:
            try:
                async with AsyncExitStack() as stack:
                    await serving_adapter(stack, pool, "late")
            except GatewayError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(request)
        assert [(e.status, e.code) for e in errors] == [(502, "adapter_load_failed")] * 3
        assert errors[0].message == ("The adapter 'late' of model 'base' failed to load: "
                                     "Loading lora late failed: No adapter found for <path>")
        assert len({id(e) for e in errors}) == 3  # each request raises its own
        assert calls(url)[len(before):] == ["load late"]
        assert pool.adapters.failures["late"] == 1
        (root / "late").mkdir()
        async with AsyncExitStack() as stack:
            backend = await serving_adapter(stack, pool, "late")
        assert calls(url)[len(before):] == ["load late", "load late"]
        assert pool.adapters.loaded(backend) == ["late"]


async def test_a_request_that_leaves_while_its_adapter_loads_keeps_no_count(
        lora_sim: str, tmp_path: Path) -> None:
    url, root = lora_sim, tmp_path
    config = make_config([static(url, root, "left")])
    async with pool_of(config) as pool:
        with anyio.move_on_after(0.05):
            async with AsyncExitStack() as left:
                await serving_adapter(left, pool, "left")
        backend = pool.backends["base"]
        assert backend.leases == 0
        # The load goes on for the next request; the one that left holds no part of it.
        async with AsyncExitStack() as again:
            await serving_adapter(again, pool, "left")
        assert pool.adapters._servers[backend].held["left"].in_flight == 0
        assert pool.adapters.loads["left"] == 1


async def test_a_server_that_starts_again_holds_no_adapter_until_it_loads_one(
        tmp_path: Path) -> None:
    config = make_config([sim_model("base", "--enable-lora", adapters=adapters(tmp_path, "a"))])
    async with pool_of(config) as pool:
        async with AsyncExitStack() as stack:
            backend = await serving_adapter(stack, pool, "a")
        first = backend.address
        assert pool.adapters.loaded(backend) == ["a"]
        await pool.unload("base")
        assert pool.adapters.loaded(backend) == []
        async with AsyncExitStack() as stack:
            async with anyio.create_task_group() as tg:
                tg.start_soon(serving_adapter, stack, pool, "a")
                await eventually(lambda: backend.state is ModelState.STARTING)
                assert pool.adapters.loaded(backend) == []  # the next run holds nothing yet
        assert backend.address != first
        assert HTTP.get(backend.address + "/sim/lora").json()["calls"] == ["load a"]
        assert pool.adapters.loaded(backend) == ["a"]


# -- the replica a request for an adapter goes to -------------------------------------------


def replicas(leases: list[int], slots: int = 4) -> list[Backend]:
    settings = ModelSettings(name="m", launcher="process", command=("x",), max_replicas=3)
    model = Model(settings)
    made = [Backend(replace(settings, replica=i), ProcessLauncher(settings), replica=i,
                    slots=slots, model=model) for i in range(len(leases))]
    for backend, held in zip(made, leases, strict=True):
        backend.state = ModelState.READY
        backend.leases = held
    return made


@pytest.mark.parametrize(("leases", "holding", "chosen", "expected"), [
    ([0, 0, 0], {2}, 0, 2),  # the replica that holds it, over routing's choice
    ([1, 0, 3], {0, 2}, 1, 0),  # of those that hold it, the least loaded
    ([0, 0, 0], set(), 1, 1),  # none holds it: routing's choice
    ([0, 0, 1], {1, 2}, 2, 2),  # routing's choice holds it
    ([0, 0, 4], {2}, 0, 0),  # the one that holds it has no free slot
    ([0, 0, 3], {2}, 0, 0),  # past affinity_slack (1.5) times the average load
    ([1, 1, 2], {2}, 0, 2),  # within it
])
def test_a_replica_that_holds_the_adapter_takes_its_request_within_the_load_bound(
        leases: list[int], holding: set[int], chosen: int, expected: int) -> None:
    made = replicas(leases)
    picked = prefer_holding(made, made[chosen], lambda r: r.replica in holding)
    assert picked.replica == expected


def test_a_replica_whose_connect_failed_is_not_preferred() -> None:
    made = replicas([0, 0])
    assert prefer_holding(made, made[0], lambda r: r.replica == 1, avoid=1) is made[0]
