"""The GPU ledger: each device's memory, per host: (engine, device index) -> size and use.

Owns the invariant that a device is read where it is: a device of this host (a process or
static model, or a container engine whose API is a local socket or loopback) through the
local reader (NVML, else ``gateway.gpu_memory_mb``); a device of a remote engine from that
engine's ``gpu_memory_mb`` (else ``gateway.gpu_memory_mb``), never this host's NVML, whose
device 0 is another GPU. NVML is read in a worker thread, never on the event loop, and a
figure is kept for ``CACHE_S`` (dropped at once when a server's state changes, as its memory
then does); a measurement (a start's before and after) reads afresh.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

import anyio

from kernel.config import EngineSettings

from .gpu import ConfiguredMemory, GpuMemory
from .planners import Device, Memory

CACHE_S = 0.2
LOOPBACK = ("localhost", "127.0.0.1", "::1")


def is_local(engine: EngineSettings) -> bool:
    """An engine on this host: its API is a unix socket or a loopback address."""
    parts = urlsplit(engine.url)
    return parts.scheme == "unix" or parts.hostname in LOOPBACK


class GpuLedger:
    def __init__(self, local: GpuMemory, engines: Mapping[str, EngineSettings],
                 configured_mb: int | None) -> None:
        self.local = local
        self._remote = {name: ConfiguredMemory(e.gpu_memory_mb or configured_mb)
                        for name, e in engines.items() if not is_local(e)}
        self._cache: dict[Device, tuple[float, Memory]] = {}

    def reader(self, engine: str | None) -> GpuMemory:
        """Who reads the devices of the engine (None: this host)."""
        return self._remote.get(engine, self.local) if engine is not None else self.local

    def forget(self) -> None:
        """Servers changed: the next read is fresh."""
        self._cache.clear()

    async def read(self, devices: Iterable[Device], *, fresh: bool = False) -> dict[Device, Memory]:
        """The devices' figures: kept ones younger than ``CACHE_S`` unless ``fresh``."""
        now = anyio.current_time()
        figures = {}
        for device in devices:
            kept = None if fresh else self._cache.get(device)
            if kept is None or now - kept[0] >= CACHE_S:
                kept = now, await self._read(device)
                self._cache[device] = kept
            figures[device] = kept[1]
        return figures

    async def _read(self, device: Device) -> Memory:
        engine, index = device
        reader = self.reader(engine)
        if not reader.measures:  # configured figures: nothing to wait for
            return _both(reader, index)
        return await anyio.to_thread.run_sync(_both, reader, index)


def _both(reader: GpuMemory, index: int) -> Memory:
    return Memory(reader.total_mb(index), reader.used_mb(index))
