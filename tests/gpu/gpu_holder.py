"""A simulated model that really holds GPU memory: allocate N MiB on a CUDA device through
torch, then run the simulator in the same process, so the memory lives and dies with it.

    python tests/gpu/gpu_holder.py --mib 20000 [--device 0] -- --port 8000 --model m

Started with the simulator's ``--enable-sleep-mode`` (and ``VLLM_SERVER_DEV_MODE=1``), it frees
its memory when it is put to sleep and takes it back when it wakes, as vLLM does: the weights
(half of it) and the KV cache (the other half), each with its wake tag. Not yet run on a GPU
(written on a machine without one): the GPU check is what verifies it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, required=True)
    parser.add_argument("--device", type=int, default=0)
    args, rest = parser.parse_known_args()
    import torch

    from simulator import sleep as simulator_sleep

    device = f"cuda:{args.device}"
    weights_mib = args.mib // 2
    sizes = {"weights": weights_mib, "kv_cache": args.mib - weights_mib}
    held: dict[str, torch.Tensor] = {}

    def restore(tag: str) -> None:
        held[tag] = torch.empty(sizes[tag] * 1024 * 1024, dtype=torch.uint8, device=device)
        held[tag].fill_(1)
        torch.cuda.synchronize()

    def release(tag: str) -> None:
        del held[tag]
        torch.cuda.empty_cache()  # back to the device, where NVML sees it free

    for tag in sizes:
        restore(tag)
    simulator_sleep.MEMORY.release = release
    simulator_sleep.MEMORY.restore = restore
    from simulator.server import main as simulator

    return simulator([a for a in rest if a != "--"])


if __name__ == "__main__":
    sys.exit(main())
