"""A simulated model that really holds GPU memory: allocate N MiB on a CUDA device through
torch, then run the simulator in the same process, so the memory lives and dies with it.

    python tests/gpu/gpu_holder.py --mib 20000 [--device 0] -- --port 8000 --model m
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

    held = torch.empty(args.mib * 1024 * 1024, dtype=torch.uint8,
                       device=f"cuda:{args.device}")
    held.fill_(1)
    torch.cuda.synchronize()
    from backends.simulator import main as simulator

    return simulator([a for a in rest if a != "--"])


if __name__ == "__main__":
    sys.exit(main())
