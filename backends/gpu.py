"""GPU memory, read through NVML (py3nvml) when there is a driver, else from the configuration.

With NVML the pool sees each device's real free memory and measures what a model took when it
started. Without it, a configured per-device size (``gateway.gpu_memory_mb``) and the models'
configured ``vram_mb`` are the accounts; with neither, only the model budget places models.
"""

from __future__ import annotations

from typing import Any, Protocol

import structlog

log = structlog.get_logger("gateway.gpu")
MIB = 1024 * 1024


class GpuMemory(Protocol):
    measures: bool
    """True when ``used_mb`` reads the device (so a start can be measured)."""

    def total_mb(self, index: int) -> int | None: ...

    def used_mb(self, index: int) -> int | None: ...


class NvmlMemory:
    measures = True

    def __init__(self) -> None:
        from py3nvml import py3nvml as nvml

        nvml.nvmlInit()
        self._nvml = nvml
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i)
                         for i in range(nvml.nvmlDeviceGetCount())]

    @property
    def devices(self) -> int:
        return len(self._handles)

    def _info(self, index: int) -> Any:
        if index >= len(self._handles):
            return None
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handles[index])

    def total_mb(self, index: int) -> int | None:
        info = self._info(index)
        return None if info is None else info.total // MIB

    def used_mb(self, index: int) -> int | None:
        info = self._info(index)
        return None if info is None else info.used // MIB

    def close(self) -> None:
        self._nvml.nvmlShutdown()


class ConfiguredMemory:
    """No driver: every device has the configured size, and nothing is measured."""

    measures = False

    def __init__(self, total_mb: int | None) -> None:
        self._total = total_mb

    def total_mb(self, index: int) -> int | None:
        return self._total

    def used_mb(self, index: int) -> int | None:
        return None


def probe_gpus(configured_mb: int | None) -> GpuMemory:
    """NVML if it loads, else the configured figures; says which, once."""
    try:
        memory = NvmlMemory()
    except Exception as exc:  # any NVML failure (no library, no driver) means no NVML here
        if configured_mb is None:
            log.info("no NVML; placing models by the model budget only", reason=str(exc))
        else:
            log.info("no NVML; placing models by configured VRAM figures",
                     gpu_memory_mb=configured_mb, reason=str(exc))
        return ConfiguredMemory(configured_mb)
    log.info("NVML found", devices=memory.devices)
    return memory
