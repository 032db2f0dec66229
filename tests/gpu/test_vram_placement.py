"""On a real NVIDIA GPU: the pool measures each model's VRAM through py3nvml and swaps models
when the memory fits only one. Not part of the normal suite (it needs a GPU and torch):

    python -m pytest tests/gpu -s

Two simulated models each hold HOLD_MIB of GPU memory through torch; their configured estimate
(ESTIMATE_MIB) is lower than what they really take (the CUDA context adds to it), and the
device cannot hold two of them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import anyio
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from backends.gpu import NvmlMemory  # noqa: E402
from backends.pool import BackendPool, ModelState  # noqa: E402
from backends.process import ProcessLauncher  # noqa: E402
from kernel.config import config_from_mapping  # noqa: E402

HOLDER = str(Path(__file__).with_name("gpu_holder.py"))


def holder_model(name: str, hold_mib: int, estimate_mib: int) -> dict:
    return {"name": name, "launcher": "process", "gpus": [0], "vram_mb": estimate_mib,
            "startup_timeout": 120.0,
            "command": [sys.executable, HOLDER, "--mib", str(hold_mib), "--",
                        "--port", "{port}", "--model", "{name}"]}


def test_measured_vram_drives_the_swap() -> None:
    memory = NvmlMemory()
    total = memory.total_mb(0)
    assert total is not None
    hold = int(total * 0.55)
    estimate = int(total * 0.45)
    config = config_from_mapping(
        {"models": [holder_model("a", hold, estimate), holder_model("b", hold, estimate)],
         "gateway": {"max_models_concurrent": 2, "placement_timeout": 60.0}}, source="test")
    log: list[str] = []

    def report(step: str, pool: BackendPool) -> None:
        used = memory.used_mb(0)
        line = (f"{time.strftime('%H:%M:%S')} {step}: device used {used} MiB of {total}; "
                + "; ".join(f"{b.name}={b.state.value} measured={b.measured_vram_mb} "
                            f"evictions={b.evictions}" for b in pool.backends.values()))
        log.append(line)
        print(line, flush=True)

    async def scenario() -> None:
        pool = BackendPool(config, launchers=ProcessLauncher, gpu=memory)
        async with pool.running():
            report("start", pool)
            async with pool.lease("a"):
                report("a leased", pool)
            a = pool.backends["a"]
            assert a.measured_vram_mb is not None and a.measured_vram_mb >= hold
            async with pool.lease("b"):
                report("b leased", pool)
            assert a.state is ModelState.STOPPED and a.evictions == 1
            b = pool.backends["b"]
            assert b.measured_vram_mb is not None and b.measured_vram_mb >= hold
            async with pool.lease("a"):
                report("a leased again", pool)
            assert b.state is ModelState.STOPPED and b.evictions == 1
            assert memory.used_mb(0) < total * 0.8
        report("pool closed", pool)

    anyio.run(scenario)
