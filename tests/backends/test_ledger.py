"""The GPU ledger per host: a remote engine's GPUs are planned with its configured figures,
this host's with NVML, read off the event loop and kept briefly."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from backends.gpu import ConfiguredMemory
from backends.ledger import CACHE_S, GpuLedger, is_local
from backends.planners import Memory
from kernel.errors import GatewayError
from tests.backends.test_pool import FakeGpus, fakes, running_pool
from tests.support import make_config, simulator

pytestmark = pytest.mark.anyio

ENGINES = {"here": {"url": "unix:///run/podman/podman.sock"},
           "loop": {"url": "tcp://127.0.0.1:2375"},
           "gpu2": {"url": "tcp://gpu2.example:2375", "gpu_memory_mb": 1000}}


@pytest.fixture(scope="module")
def health_url() -> Iterator[str]:
    with simulator() as sim:
        yield sim.url


def container(name: str, engine: str, **settings: Any) -> dict[str, Any]:
    return {"name": name, "launcher": "container", "engine": engine, "image": "vllm", "gpus": [0],
            **settings}


def test_an_engine_is_local_when_its_api_is_a_socket_or_loopback() -> None:
    engines = make_config([container("a", "here")], engines=ENGINES).engines
    assert [is_local(e) for e in engines.values()] == [True, True, False]


class CountingGpus(FakeGpus):
    """NVML as the ledger reads it: where (which thread) and how often."""

    def __init__(self) -> None:
        super().__init__({0: 80_000})
        self.threads: set[int] = set()

    def used_mb(self, index: int) -> int | None:
        self.threads.add(threading.get_ident())
        return super().used_mb(index)


async def test_nvml_is_read_off_the_loop_and_kept_briefly() -> None:
    local = CountingGpus()
    ledger = GpuLedger(local, make_config([container("a", "here")], engines=ENGINES).engines,
                       None)
    assert await ledger.read([(None, 0)]) == {(None, 0): Memory(80_000, 0)}
    assert threading.get_ident() not in local.threads
    local.held["x", 0] = {0: 500}
    assert (await ledger.read([("here", 0)]))[("here", 0)].used_mb == 500
    local.held["y", 0] = {0: 100}
    assert (await ledger.read([("here", 0)]))[("here", 0)].used_mb == 500  # kept
    assert (await ledger.read([("here", 0)], fresh=True))[("here", 0)].used_mb == 600
    local.held.clear()
    await anyio.sleep(CACHE_S)
    assert (await ledger.read([("here", 0)]))[("here", 0)].used_mb == 0
    local.held["z", 0] = {0: 7}
    ledger.forget()
    assert (await ledger.read([("here", 0)]))[("here", 0)].used_mb == 7


async def test_a_remote_engine_is_never_read_through_this_hosts_nvml() -> None:
    local = CountingGpus()
    ledger = GpuLedger(local, make_config([container("a", "here")], engines=ENGINES).engines,
                       2000)
    assert await ledger.read([("gpu2", 0), ("loop", 0)]) == {
        ("gpu2", 0): Memory(1000, None), ("loop", 0): Memory(80_000, 0)}
    assert len(local.threads) == 1  # the loopback engine's only
    assert isinstance(ledger.reader("gpu2"), ConfiguredMemory)


async def test_placement_uses_the_gpus_of_the_engine_a_model_runs_on(health_url: str) -> None:
    """This host's GPU 0 has 80 GB free; the remote engine's GPU 0 has 1000 MiB: a second 600
    MiB model there waits for room (and gets 503), one on this host starts."""
    local = FakeGpus({0: 80_000})
    config = make_config([container("a", "gpu2", vram_mb=600), container("b", "gpu2", vram_mb=600),
                          container("c", "here", vram_mb=600),
                          container("big", "gpu2", vram_mb=2000)],
                         engines=ENGINES, gateway={"placement_timeout": 0.3})
    async with running_pool(config, fakes(health_url), gpu=local) as pool, pool.lease("a"):
        with pytest.raises(GatewayError) as refused:
            async with pool.lease("b"):
                pass
        assert refused.value.code == "no_capacity"
        assert "every loaded model is busy" in refused.value.message
        async with pool.lease("c") as c:
            assert c.settings.engine == "here"
        with pytest.raises(GatewayError) as too_big:
            async with pool.lease("big"):
                pass
        assert "needs 2000 MiB on GPU 0, which has 1000 MiB" in too_big.value.message


def test_the_admin_view_shows_each_engines_gpus_as_the_ledger_reads_them() -> None:
    from proxy.app import Gateway

    config = make_config([container("a", "here", vram_mb=300), container("b", "gpu2", gpus=[1])],
                         engines=ENGINES, gateway={"gpu_memory_mb": 500})
    gateway = Gateway(config, gpu=ConfiguredMemory(500))
    gpus = gateway.admin.snapshot()["gpus"]
    assert [(g["engine"], g["index"], g["total_mb"]) for g in gpus] == [
        ("gpu2", 1, 1000), ("here", 0, 500)]
    assert all(g["models"] == [] and g["used_mb"] == 0 for g in gpus)
